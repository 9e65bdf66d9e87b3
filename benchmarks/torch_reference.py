"""PyTorch reference for the GPU benchmark: the project's two architectures, hand-written in torch.

This is the "practical limit of the GPU" that benchmarks/train_gpu.py divides its Keras 3 + JAX
figures by. It re-states components/trainer/models.py's architectures in PyTorch (it cannot import Keras
models into torch); keep the two in step:

- cnn:   [B,2304] -> [B,1,48,48] -> 4 x (Conv 3x3 'valid' + ReLU, MaxPool 2x2), 64/128/256/512
         -> flatten (1x1x512) -> 256 ReLU, dropout 0.5 -> 128 ReLU, dropout 0.5 -> 7
- vgg16: [B,2304] -> [B,1,48,48] -> learned 1x1 conv to 3 channels -> VGG16 conv base
         (13 x Conv 3x3 'same' + ReLU, 5 max-pools; FROZEN, random init) -> 512 -> 4096 ReLU
         -> 4096 ReLU -> 7

Training step: cross-entropy on logits (Keras: softmax then cross-entropy, the same function),
Adam (fused), bf16 autocast (or fp32), channels_last, torch.compile on the model. The whole
dataset is resident on the GPU; each batch is a gather with indices of a per-pass permutation
made on the GPU, so no host round trip per step. Timing: warm-up steps excluded,
torch.cuda.synchronize() around each timed window, median of the windows.

Standalone: python benchmarks/torch_reference.py --batch-sizes 70,256,512 (random-pixel data
of FER size; train_gpu.py passes its own synthetic faces instead).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

IMAGE_SIZE = 48
NUM_CLASSES = 7
CNN_CONV_FILTERS = (64, 128, 256, 512)
CNN_DENSE_UNITS = (256, 128)
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
             512, 512, 512, "M")
VGG_DENSE_UNITS = (4096, 4096)


def available() -> bool:
    """True when torch is importable and sees a CUDA device."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - any import failure means "no reference here"
        return False
    return bool(torch.cuda.is_available())


def build(name: str):
    import torch.nn as nn

    layers: list = [nn.Unflatten(1, (1, IMAGE_SIZE, IMAGE_SIZE))]
    if name == "cnn":
        channels = 1
        for filters in CNN_CONV_FILTERS:
            layers += [nn.Conv2d(channels, filters, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = filters
        layers.append(nn.Flatten())
        width = channels  # 1x1 spatial map after the fourth pool
        for units in CNN_DENSE_UNITS:
            layers += [nn.Linear(width, units), nn.ReLU(inplace=True), nn.Dropout(0.5)]
            width = units
        layers.append(nn.Linear(width, NUM_CLASSES))
        return nn.Sequential(*layers)
    if name == "vgg16":
        layers.append(nn.Conv2d(1, 3, 1))
        base: list = []
        channels = 3
        for item in VGG16_CFG:
            if item == "M":
                base.append(nn.MaxPool2d(2))
            else:
                base += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=True)]
                channels = item
        base_seq = nn.Sequential(*base)
        for p in base_seq.parameters():
            p.requires_grad_(False)  # frozen, as in the Keras model
        layers += [base_seq, nn.Flatten()]
        width = channels
        for units in VGG_DENSE_UNITS:
            layers += [nn.Linear(width, units), nn.ReLU(inplace=True)]
            width = units
        layers.append(nn.Linear(width, NUM_CLASSES))
        return nn.Sequential(*layers)
    raise ValueError(f"unknown model {name!r}")


def measure(name: str, x: np.ndarray, y: np.ndarray, batch_sizes, lr_for, *,
            bf16: bool = True, compile_mode: str | None = "default", warmup_steps: int = 30,
            windows: int = 5, steps_per_window: int = 50, seed: int = 0) -> list[dict]:
    """images/s of full training steps of `name` at each batch size; x: float32 [N, 2304]."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cuda")
    xs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    ys = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)
    n = xs.shape[0]
    results = []
    for batch in batch_sizes:
        if batch > n:
            continue
        model = build(name).to(device).to(memory_format=torch.channels_last)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=float(lr_for(batch)), fused=True)
        fwd = torch.compile(model, mode=compile_mode) if compile_mode else model
        model.train()
        steps_per_pass = n // batch
        state = {"perm": torch.randperm(n, device=device), "pos": 0}

        def step():
            if state["pos"] >= steps_per_pass:
                state["perm"] = torch.randperm(n, device=device)
                state["pos"] = 0
            idx = state["perm"][state["pos"] * batch:(state["pos"] + 1) * batch]
            state["pos"] += 1
            xb = xs.index_select(0, idx)
            yb = ys.index_select(0, idx)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                logits = fwd(xb)
            loss = F.cross_entropy(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        t0 = time.perf_counter()
        for _ in range(warmup_steps):
            step()
        torch.cuda.synchronize()
        warmup_s = time.perf_counter() - t0
        rates = []
        for _ in range(windows):
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(steps_per_window):
                loss = step()
            torch.cuda.synchronize()
            rates.append(steps_per_window * batch / (time.perf_counter() - t))
        results.append({
            "framework": "torch", "model": name, "batch_size": batch,
            "precision": "bf16-autocast" if bf16 else "fp32", "compile": compile_mode or "eager",
            "learning_rate": float(lr_for(batch)), "images_per_s": statistics.median(rates),
            "window_images_per_s": rates, "warmup_s": warmup_s,
            "final_loss": float(loss.detach().float().cpu())})
        # Dropped by rebinding, not del: step() closes over them.
        model = opt = fwd = None
        torch.cuda.empty_cache()
    xs = ys = None
    torch.cuda.empty_cache()
    return results


def versions() -> dict:
    import torch

    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,vgg16")
    parser.add_argument("--batch-sizes", default="70,256,512,1024,2048")
    parser.add_argument("--n", type=int, default=100_676)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    parser.add_argument("--compile-mode", default="default", help="'none' for eager")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, IMAGE_SIZE * IMAGE_SIZE), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, args.n)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    out = {"versions": versions(), "results": []}
    for name in args.models.split(","):
        out["results"] += measure(name, x, y, batches, lambda b: 1e-3, bf16=not args.fp32,
                                  compile_mode=None if args.compile_mode == "none"
                                  else args.compile_mode)
    for r in out["results"]:
        print(f"{r['model']:6s} b{r['batch_size']:<5d} {r['precision']:14s} "
              f"{r['images_per_s']:>12,.0f} images/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
