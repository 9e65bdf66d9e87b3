"""The least a Python gRPC server can do per request and still batch: an upper bound for
any request path written in Python on this machine, not a server to use.

It answers Predict on one SavedModel's serving_default and nothing else: no input checks,
no deadlines, no request logs, no metrics, no model versions. Requests are batched the
way fer-serve's `--batch-policy fill` does (a batch runs at once when none is running, else
when the running one ends or it holds `--max-batch-size` rows), but inside one asyncio
event loop (grpc.aio): a request costs no thread switch, only the batch crosses to the
model's thread and back. benchmarks/serving.py runs it beside fer-serve with the same
clients, so the gap between the two is what fer-serve's own per-request work costs, and
the gap between this and the in-process rate is what Python's gRPC stack costs.

    .venv/bin/python benchmarks/bare_batching_server.py SAVED_MODEL_DIR [--max-batch-size 16]

Prints "gRPC on 127.0.0.1:PORT" once it serves; runs until killed.
"""
from __future__ import annotations

import argparse
import asyncio
import os
from concurrent import futures
from typing import Any

import numpy as np

HOST = "127.0.0.1"


class FillBatchingPredict:
    """PredictionService.Predict with batches formed in the event loop."""

    def __init__(self, signature: Any, max_batch_size: int) -> None:
        self.signature = signature
        self.max_batch_size = max_batch_size
        self.waiting: list[tuple[np.ndarray, asyncio.Future]] = []
        self.running = False
        self.model_thread = futures.ThreadPoolExecutor(1, thread_name_prefix="model")

    def _run_model(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        from fer_pipeline.serving.tensors import eager_tensor
        import tensorflow as tf
        outputs = self.signature(pixels=eager_tensor(pixels, tf.int32))
        return {key: value.numpy() for key, value in outputs.items()}

    def _start_next(self) -> None:
        if self.running or not self.waiting:
            return
        batch = self.waiting[:self.max_batch_size]
        del self.waiting[:self.max_batch_size]
        self.running = True
        pixels = np.concatenate([rows for rows, _ in batch])
        done = asyncio.get_running_loop().run_in_executor(self.model_thread, self._run_model,
                                                          pixels)
        done.add_done_callback(lambda finished: self._answer(batch, finished))

    def _answer(self, batch: list, finished: asyncio.Future) -> None:
        self.running = False
        error = finished.exception()
        start = 0
        for rows, waiter in batch:
            if error is not None:
                waiter.set_exception(error)
            else:
                end = start + len(rows)
                waiter.set_result({key: value[start:end]
                                   for key, value in finished.result().items()})
                start = end
        self._start_next()

    async def Predict(self, request, context):  # noqa: N802 - the gRPC method's name
        from tensorflow_serving.apis import predict_pb2

        from fer_pipeline.serving.tensors import tensor_proto
        import tensorflow as tf
        rows = tf.make_ndarray(request.inputs["pixels"])
        waiter = asyncio.get_running_loop().create_future()
        self.waiting.append((rows, waiter))
        self._start_next()
        outputs = await waiter
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tensor_proto(value))
        return response


async def serve(saved_model: str, max_batch_size: int) -> None:
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    signature = tf.saved_model.load(saved_model).signatures["serving_default"]
    service = FillBatchingPredict(signature, max_batch_size)
    server = grpc.aio.server(maximum_concurrent_rpcs=64)
    servicer = prediction_service_pb2_grpc.PredictionServiceServicer()
    servicer.Predict = service.Predict
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    print(f"gRPC on {HOST}:{port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("saved_model")
    parser.add_argument("--max-batch-size", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from fer_pipeline.core import quiet
    quiet.install()
    asyncio.run(serve(args.saved_model, args.max_batch_size))


if __name__ == "__main__":
    main()
