"""GPU training benchmark: the project's own Keras 3 models (components/trainer/models.py) under JAX.

Measures images/s of full training steps (forward, backward, Adam update) of `cnn` and `vgg16`
at the notebook's batch sizes (70 / 65, from fer_pipeline.core.config.TrainConfig) and a sweep of larger
ones, in fp32 and mixed bf16, jit-compiled; then the notebook's full schedules (CNN 115 epochs
at the best batch size, VGG16 25 epochs) and the same at the notebook's batch sizes, with
test accuracy. Optionally compares with benchmarks/torch_reference.py (same architectures in
PyTorch, bf16 autocast, torch.compile) and reports our figure as a ratio of it.

Data: NOT FER-2013. Synthetic faces drawn ON THE DEVICE MACHINE by
fer_pipeline.pipeline.synthetic.draw_faces (numpy only): a class-balanced training set (default 100,676
images, the notebook's balanced training split size), validation and test sets with FER-2013's
class proportions (default 3,589 each, the size of PublicTest / PrivateTest). Pixels are z-score
normalized with one mean and one std (flags; default: the full-pass statistic over the generated
training images, what our TFT transform computes). The whole dataset is put on the device once
(jax.device_put), batches are gathered on the device from a per-epoch permutation made on the
device; optional on-device augmentation (random flip + shift, jax.random) with --augment.

Training loop: a custom loop (Keras 3 JAX pattern: model.stateless_call + optimizer.stateless_apply
under jax.jit) that runs --steps-per-call steps inside one jitted lax.scan, so Python dispatches
once per K steps and nothing goes to the host between steps. model.fit on a device-resident
array is also measured (--compare-fit, one row per model at the notebook batch size): fit
dispatches once per step (steps_per_execution=1) through Keras' data adapter and callbacks,
which is why we expect the custom loop to win at small batches; the table shows both so the
choice is checked, not assumed. Under KERAS_BACKEND=tensorflow (this machine, CI, --smoke) the
same structure runs with tf.function(jit_compile=True) steps.

GPU SESSION: how to run it (H100, Python 3.12, JAX + torch, no TF, no network)
---------------------------------------------------------------------------
Once, here (not on the device), in /work/main: fetch the three wheels Keras needs there
(absl-py, rich, h5py, ml-dtypes, packaging, numpy are already in the device image):

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d .whl keras==3.15.1 namex==0.1.0 optree==0.20.0

(checked 2026-11-24: gives keras-3.15.1-py3-none-any.whl, namex-0.1.0-py3-none-any.whl,
optree-0.20.0-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl, 2.9 MB together.)

Then three `run` tool calls (each under the 10-minute limit; carry: [".whl"]; kind left out).
Every command starts with the same prefix PRE:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \
      export KERAS_BACKEND=jax PYTHONUNBUFFERED=1; nvidia-smi -L; \
      python3 -c "import jax, keras; print(jax.devices(), keras.__version__)";

1. sweep (+ torch reference, + fit comparison), about 5-7 min:
    PRE python3 benchmarks/train_gpu.py --phases sweep --compare-fit \
      --out $OUT/sweep.json 2>&1 | tee $OUT/sweep.log
2. full schedules at the best batch sizes (best = fastest bf16/fp32 row of the sweep; pass
   them explicitly from call 1's table), about 3-5 min:
    PRE python3 benchmarks/train_gpu.py --phases schedule_best --cnn-batch 1024 \
      --vgg-batch 512 --precision bf16 --out $OUT/best.json 2>&1 | tee $OUT/best.log
3. full schedules at the notebook batch sizes (70 / 65, notebook learning rates). At the
   rates measured earlier (docs/benchmarks.md), CNN 115 epochs at b70 is ~7 min, too long next to VGG in one call: run
   CNN and VGG as separate calls, or shorten with --epochs-fraction 0.25:
    PRE python3 benchmarks/train_gpu.py --phases schedule_notebook --models cnn \
      --precision bf16 --out $OUT/nb_cnn.json 2>&1 | tee $OUT/nb_cnn.log
    PRE python3 benchmarks/train_gpu.py --phases schedule_notebook --models vgg16 \
      --precision bf16 --out $OUT/nb_vgg.json 2>&1 | tee $OUT/nb_vgg.log
Data generation takes ~1 min on 16 cores; it is cached in /tmp/fer_gpu_data_<sizes>.npz, so a
call on a still-warm machine reuses it (a fresh machine regenerates; same seed, same data).
Commit the JSON files under benchmarks/results/ and update the GPU table in docs/benchmarks.md.

Smoke (CPU, any backend, no torch needed; what tests/test_train_gpu_smoke.py runs):
    KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/train_gpu.py --smoke --out /tmp/s.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fer_pipeline.core import quiet  # noqa: E402

quiet.install()  # core/quiet.py's filters, before TensorFlow loads

from fer_pipeline.pipeline.synthetic import FER_CLASS_COUNTS, allocate, draw_faces  # noqa: E402
from fer_pipeline.core.config import TrainConfig  # noqa: E402
from fer_pipeline.core.contract import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, NUM_PIXELS  # noqa: E402

NOTEBOOK = TrainConfig()  # the notebook's batch sizes, epochs and learning rates
MODEL_NAMES = ("cnn", "vgg16")
_GEN_CHUNK = 2048


# ----------------------------------------------------------------------------------------- data
def _draw_chunk(job):
    labels, seed = job
    return draw_faces(labels, np.random.default_rng(seed))


def _labels(n: int, balanced: bool, rng: np.random.Generator) -> np.ndarray:
    if balanced:
        counts = [n // NUM_CLASSES + (1 if i < n % NUM_CLASSES else 0) for i in range(NUM_CLASSES)]
    else:
        alloc = allocate(FER_CLASS_COUNTS, n)
        counts = [alloc[c] for c in CLASS_NAMES]
    labels = np.repeat(np.arange(NUM_CLASSES), counts)
    return rng.permutation(labels)


def generate_data(n_train: int, n_val: int, n_test: int, seed: int, workers: int) -> dict:
    """uint8 images [n, 2304] and int32 labels per split; chunk seeds are independent of workers."""
    root = np.random.SeedSequence(seed)
    label_seq, draw_seq = root.spawn(2)
    label_rng = np.random.default_rng(label_seq)
    splits = {"train": _labels(n_train, True, label_rng),
              "validation": _labels(n_val, False, label_rng),
              "test": _labels(n_test, False, label_rng)}
    jobs, owners = [], []
    for split, labels in splits.items():
        for i in range(0, len(labels), _GEN_CHUNK):
            jobs.append(labels[i:i + _GEN_CHUNK])
            owners.append(split)
    seeds = draw_seq.generate_state(len(jobs), dtype=np.uint64)
    jobs = list(zip(jobs, [int(s) for s in seeds]))
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        # fork before any accelerator runtime is initialized (nothing GPU is imported yet).
        with mp.get_context("fork").Pool(workers) as pool:
            chunks = pool.map(_draw_chunk, jobs, chunksize=1)
    else:
        chunks = [_draw_chunk(j) for j in jobs]
    data = {}
    for split, labels in splits.items():
        imgs = [c for c, o in zip(chunks, owners) if o == split]
        x = (np.concatenate(imgs) if imgs else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8))
        data[split] = (x.reshape(len(labels), NUM_PIXELS), labels.astype(np.int32))
    return data


def load_or_generate(args) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    cache = Path(args.data_cache.format(train=args.train_size, val=args.val_size,
                                        test=args.test_size, seed=args.seed)) \
        if args.data_cache else None
    source = "generated"
    if cache and cache.exists():
        z = np.load(cache)
        data = {s: (z[f"{s}_x"], z[f"{s}_y"]) for s in ("train", "validation", "test")}
        source = f"cache {cache}"
    else:
        data = generate_data(args.train_size, args.val_size, args.test_size, args.seed,
                             args.workers)
        if cache:
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, **{f"{s}_{k}": v for s, (x, y) in data.items()
                             for k, v in (("x", x), ("y", y))})
            os.replace(tmp, cache)
    seconds = time.perf_counter() - t0
    xtr = data["train"][0]
    # Full-pass statistic over every training pixel (float64 accumulation), as tft.mean/tft.var.
    mean = float(xtr.mean(dtype=np.float64)) if args.mean is None else args.mean
    std = float(np.sqrt(xtr.var(dtype=np.float64))) if args.std is None else args.std
    info = {
        "description": ("synthetic FER-2013-format faces from fer_pipeline.pipeline.synthetic.draw_faces "
                        "(NOT the real FER-2013); train class-balanced, validation/test with "
                        "FER-2013 class proportions"),
        "seed": args.seed, "source": source, "seconds": round(seconds, 2),
        "sizes": {s: int(len(v[1])) for s, v in data.items()},
        "train_class_counts": np.bincount(data["train"][1], minlength=NUM_CLASSES).tolist(),
        "test_class_counts": np.bincount(data["test"][1], minlength=NUM_CLASSES).tolist(),
        "normalization": {"kind": "zscore", "mean": mean, "std": std,
                          "from": "flags" if (args.mean is not None or args.std is not None)
                          else "full pass over the generated training images"},
        "augment": bool(args.augment),
    }
    return data, info


# ------------------------------------------------------------------------------------- runners
def set_precision(precision: str) -> None:
    import keras
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bf16"
                                            else "float32")


def build(name: str, batch: int, lr: float, jit: bool):
    from fer_pipeline.components.trainer.models import build_model
    cfg = NOTEBOOK
    section = dataclasses.replace(cfg.models[name], batch_size=batch, learning_rate=lr)
    tc = dataclasses.replace(cfg, models={name: section})
    return build_model(name, tc, jit_compile=jit)


class JaxRunner:
    """Custom loop: K steps per jitted call (lax.scan), batches gathered on device."""

    def __init__(self, model, dev, batch, steps_per_call, augment, max_shift, seed):
        import jax
        import jax.numpy as jnp
        import keras
        self.jax, self.jnp = jax, jnp
        self.model, self.batch, self.k = model, batch, steps_per_call
        self.x, self.y = dev["train"]
        self.n = int(self.x.shape[0])
        self.steps_per_perm = self.n // batch
        opt = model.optimizer
        opt.build(model.trainable_variables)
        loss_fn = keras.losses.SparseCategoricalCrossentropy()
        self.state = ([v.value for v in model.trainable_variables],
                      [v.value for v in model.non_trainable_variables],
                      [v.value for v in opt.variables])
        self.key = jax.random.PRNGKey(seed)

        def loss_aux(tv, ntv, x, y):
            y_pred, ntv = model.stateless_call(tv, ntv, x, training=True)
            return loss_fn(y, y_pred), (y_pred, ntv)

        grad_fn = jax.value_and_grad(loss_aux, has_aux=True)

        def train_steps(state, x_all, y_all, perm, start, key, num_steps):
            def body(carry, i):
                tv, ntv, ov, loss_sum, correct = carry
                idx = jax.lax.dynamic_slice_in_dim(perm, (start + i) * batch, batch)
                xb = jnp.take(x_all, idx, axis=0)
                yb = jnp.take(y_all, idx, axis=0)
                if augment:
                    xb = _augment_jax(xb, jax.random.fold_in(key, start + i), max_shift)
                (loss, (y_pred, ntv)), grads = grad_fn(tv, ntv, xb, yb)
                tv, ov = opt.stateless_apply(ov, grads, tv)
                correct = correct + jnp.sum(jnp.argmax(y_pred, -1) == yb)
                return (tv, ntv, ov, loss_sum + loss, correct), None

            tv, ntv, ov = state
            init = (tv, ntv, ov, jnp.float32(0), jnp.int32(0))
            (tv, ntv, ov, loss_sum, correct), _ = jax.lax.scan(body, init, jnp.arange(num_steps))
            return (tv, ntv, ov), loss_sum, correct

        self._train = jax.jit(train_steps, static_argnames=("num_steps",), donate_argnums=(0,))

        def predict(tv, ntv, x):
            y_pred, _ = model.stateless_call(tv, ntv, x, training=False)
            return jnp.argmax(y_pred, -1)

        self._predict = jax.jit(predict)
        self._perm = jax.jit(lambda key: jax.random.permutation(key, self.n))
        self.epoch = 0
        self.new_perm()

    def new_perm(self):
        self.perm = self._perm(self.jax.random.fold_in(self.key, 10_000 + self.epoch))
        self.epoch += 1
        self.pos = 0

    def run(self, num_steps):
        """Enqueues num_steps steps from the current position (no sync)."""
        if self.pos + num_steps > self.steps_per_perm:
            self.new_perm()
        self.state, self.last_loss, self.last_correct = self._train(
            self.state, self.x, self.y, self.perm, self.jnp.int32(self.pos), self.key,
            num_steps=num_steps)
        self.pos += num_steps

    def block(self):
        self.jax.block_until_ready(self.state)

    def accuracy(self, split_dev, chunk=4096):
        x, y = split_dev
        correct = 0
        for i in range(0, int(x.shape[0]), chunk):
            pred = self._predict(self.state[0], self.state[1], x[i:i + chunk])
            correct += int(self.jnp.sum(pred == y[i:i + chunk]))
        return correct / max(1, int(x.shape[0]))


def _augment_jax(x, key, max_shift):
    """Random horizontal flip and integer shift (zero = mean in z-space) of [B, 2304]."""
    import jax
    import jax.numpy as jnp
    b = x.shape[0]
    img = x.reshape(b, IMAGE_SIZE, IMAGE_SIZE)
    k1, k2, k3 = jax.random.split(key, 3)
    flip = jax.random.bernoulli(k1, 0.5, (b,))
    img = jnp.where(flip[:, None, None], img[:, :, ::-1], img)
    if max_shift:
        s = max_shift
        dy = jax.random.randint(k2, (b,), 0, 2 * s + 1)
        dx = jax.random.randint(k3, (b,), 0, 2 * s + 1)
        pad = jnp.pad(img, ((0, 0), (s, s), (s, s)))
        img = jax.vmap(lambda im, a, c: jax.lax.dynamic_slice(im, (a, c), (IMAGE_SIZE, IMAGE_SIZE))
                       )(pad, dy, dx)
    return img.reshape(b, NUM_PIXELS)


class TFRunner:
    """Same structure under KERAS_BACKEND=tensorflow: tf.function(jit_compile) step, gathers."""

    def __init__(self, model, dev, batch, steps_per_call, augment, max_shift, seed, jit=True):
        import keras
        import tensorflow as tf
        self.tf, self.model, self.batch, self.k = tf, model, batch, steps_per_call
        self.x, self.y = dev["train"]
        self.n = int(self.x.shape[0])
        self.steps_per_perm = self.n // batch
        opt = model.optimizer
        opt.build(model.trainable_variables)
        loss_fn = keras.losses.SparseCategoricalCrossentropy()
        tv = model.trainable_variables
        self.seed = seed

        @tf.function(jit_compile=jit)
        def step(xb, yb):
            with tf.GradientTape() as tape:
                y_pred = model(xb, training=True)
                loss = loss_fn(yb, y_pred)
            grads = tape.gradient(loss, tv)
            opt.apply(grads, tv)
            correct = tf.reduce_sum(tf.cast(tf.equal(tf.cast(tf.argmax(y_pred, -1), tf.int32),
                                                     yb), tf.int32))
            return loss, correct

        @tf.function
        def train_steps(perm, start, num_steps):
            loss_sum, correct = tf.constant(0.0), tf.constant(0)
            for i in tf.range(num_steps):
                idx = perm[(start + i) * batch:(start + i + 1) * batch]
                xb, yb = tf.gather(self.x, idx), tf.gather(self.y, idx)
                if augment:
                    xb = _augment_tf(xb, tf.stack([seed, start + i]), max_shift)
                loss, c = step(xb, yb)
                loss_sum += tf.cast(loss, tf.float32)
                correct += c
            return loss_sum, correct

        self._train = train_steps
        self._predict = tf.function(lambda x: tf.argmax(model(x, training=False), -1),
                                    jit_compile=jit)
        self.epoch = 0
        self.new_perm()

    def new_perm(self):
        tf = self.tf
        self.perm = tf.random.experimental.stateless_shuffle(
            tf.range(self.n), seed=[self.seed, 10_000 + self.epoch])
        self.epoch += 1
        self.pos = 0

    def run(self, num_steps):
        if self.pos + num_steps > self.steps_per_perm:
            self.new_perm()
        self.last_loss, self.last_correct = self._train(
            self.perm, self.tf.constant(self.pos), self.tf.constant(num_steps))
        self.pos += num_steps

    def block(self):
        float(self.last_loss.numpy())

    def accuracy(self, split_dev, chunk=4096):
        x, y = split_dev
        n = int(x.shape[0])
        correct = 0
        for i in range(0, n, chunk):
            pred = self._predict(x[i:i + chunk]).numpy()
            correct += int((pred == y[i:i + chunk].numpy()).sum())
        return correct / max(1, n)


def _augment_tf(x, seed, max_shift):
    import tensorflow as tf
    b = tf.shape(x)[0]
    img = tf.reshape(x, (b, IMAGE_SIZE, IMAGE_SIZE))
    flip = tf.random.stateless_uniform((b,), seed) < 0.5
    img = tf.where(flip[:, None, None], tf.reverse(img, [2]), img)
    if max_shift:
        s = max_shift
        d = tf.random.stateless_uniform((2, b), seed + 1, 0, 2 * s + 1, dtype=tf.int32)
        pad = tf.pad(img, [[0, 0], [s, s], [s, s]])
        # one-hot row/column selectors: out[b,i,j] = pad[b, i+dy, j+dx]
        rows = tf.one_hot(tf.range(IMAGE_SIZE)[None, :] + d[0][:, None], IMAGE_SIZE + 2 * s)
        cols = tf.one_hot(tf.range(IMAGE_SIZE)[None, :] + d[1][:, None], IMAGE_SIZE + 2 * s)
        img = tf.einsum("bip,bpq,bjq->bij", rows, pad, cols)
    return tf.reshape(img, (b, NUM_PIXELS))


def to_device(data: dict, mean: float, std: float, backend: str) -> tuple[dict, float]:
    """Puts uint8 images on the device once and normalizes them there; returns (dev, seconds)."""
    t0 = time.perf_counter()
    dev = {}
    if backend == "jax":
        import jax
        import jax.numpy as jnp
        norm = jax.jit(lambda u: (u.astype(jnp.float32) - mean) / std)
        for split, (x, y) in data.items():
            dev[split] = (norm(jax.device_put(x)), jax.device_put(y))
        jax.block_until_ready(dev)
    else:
        import tensorflow as tf
        for split, (x, y) in data.items():
            dev[split] = ((tf.cast(tf.constant(x), tf.float32) - mean) / std, tf.constant(y))
    return dev, time.perf_counter() - t0


def make_runner(backend, model, dev, batch, args):
    if backend == "jax":
        return JaxRunner(model, dev, batch, args.steps_per_call, args.augment, args.max_shift,
                         args.seed)
    return TFRunner(model, dev, batch, args.steps_per_call, args.augment, args.max_shift,
                    args.seed, jit=not args.no_jit)


def scaled_lr(name: str, batch: int, rule: str) -> float:
    nb = NOTEBOOK.models[name]
    if rule == "linear":
        return nb.learning_rate * batch / nb.batch_size
    if rule == "sqrt":
        return nb.learning_rate * (batch / nb.batch_size) ** 0.5
    return nb.learning_rate


# ------------------------------------------------------------------------------------- measure
def measure_custom(backend, name, batch, precision, dev, args) -> dict:
    import keras
    set_precision(precision)
    keras.utils.clear_session()
    lr = scaled_lr(name, batch, args.lr_scaling)
    t0 = time.perf_counter()
    runner = make_runner(backend, build(name, batch, lr, jit=not args.no_jit), dev, batch, args)
    k = max(1, min(args.steps_per_call, runner.steps_per_perm))
    runner.run(k)
    runner.block()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup_calls):
        runner.run(k)
    runner.block()
    rates = []
    for _ in range(args.windows):
        t = time.perf_counter()
        for _ in range(args.calls_per_window):
            runner.run(k)
        runner.block()
        rates.append(args.calls_per_window * k * batch / (time.perf_counter() - t))
    set_precision("fp32")
    return {"framework": f"keras-{backend}", "loop": "custom", "model": name, "batch_size": batch,
            "precision": precision, "learning_rate": lr, "steps_per_call": k,
            "images_per_s": statistics.median(rates), "window_images_per_s": rates,
            "first_call_s": round(compile_s, 2)}


def measure_fit(backend, name, batch, precision, dev, args) -> dict:
    """model.fit on the device-resident arrays; timed per step with a callback (syncs)."""
    import keras
    set_precision(precision)
    keras.utils.clear_session()
    lr = scaled_lr(name, batch, args.lr_scaling)
    model = build(name, batch, lr, jit=not args.no_jit)
    x, y = dev["train"]
    steps_per_window = args.calls_per_window * args.steps_per_call
    warm = args.warmup_calls * args.steps_per_call + 1
    total = warm + args.windows * steps_per_window
    n = min(int(x.shape[0]), total * batch)
    stamps = []

    class Stamp(keras.callbacks.Callback):
        def on_train_batch_end(self, batch_i, logs=None):
            stamps.append(time.perf_counter())

    model.fit(x[:n], y[:n], batch_size=batch, epochs=1, shuffle=False, verbose=0,
              steps_per_epoch=min(total, n // batch), callbacks=[Stamp()])
    set_precision("fp32")
    rates = []
    for w in range(args.windows):
        a = warm - 1 + w * steps_per_window
        b = a + steps_per_window
        if b < len(stamps):
            rates.append(steps_per_window * batch / (stamps[b] - stamps[a]))
    return {"framework": f"keras-{backend}", "loop": "fit", "model": name, "batch_size": batch,
            "precision": precision, "learning_rate": lr,
            "images_per_s": statistics.median(rates) if rates else 0.0,
            "window_images_per_s": rates,
            "note": "model.fit(x, y) with x, y already on the device; callback stamps each step"}


def run_schedule(backend, name, batch, lr, epochs, precision, dev, args, label) -> dict:
    import keras
    set_precision(precision)
    keras.utils.clear_session()
    t0 = time.perf_counter()
    runner = make_runner(backend, build(name, batch, lr, jit=not args.no_jit), dev, batch, args)
    steps = runner.steps_per_perm
    k = max(1, min(args.steps_per_call, steps))
    history = []
    for epoch in range(epochs):
        runner.new_perm()
        done = 0
        while done < steps:
            m = min(k, steps - done)
            runner.run(m)
            done += m
        if args.val_every and ((epoch + 1) % args.val_every == 0 or epoch + 1 == epochs):
            history.append({"epoch": epoch + 1,
                            "val_accuracy": round(runner.accuracy(dev["validation"]), 4)})
    runner.block()
    train_s = time.perf_counter() - t0
    test_acc = runner.accuracy(dev["test"])
    val_acc = runner.accuracy(dev["validation"])
    wall = time.perf_counter() - t0
    set_precision("fp32")
    return {"schedule": label, "model": name, "batch_size": batch, "learning_rate": lr,
            "epochs": epochs, "precision": precision, "steps_per_epoch": steps,
            "images_per_epoch": steps * batch, "train_s": round(train_s, 2),
            "wall_s": round(wall, 2), "test_accuracy": round(test_acc, 4),
            "val_accuracy": round(val_acc, 4), "val_history": history,
            "images_per_s": round(epochs * steps * batch / train_s, 1),
            "augment": bool(args.augment)}


# -------------------------------------------------------------------------------------- report
def versions(backend: str) -> dict:
    import keras
    v = {"python": platform.python_version(), "keras": keras.__version__,
         "numpy": np.__version__, "backend": backend}
    if backend == "jax":
        import jax
        import jaxlib
        v.update(jax=jax.__version__, jaxlib=jaxlib.__version__)
        v["devices"] = [str(d) for d in jax.devices()]
        v["device_kind"] = jax.devices()[0].device_kind
    else:
        import tensorflow as tf
        v["tensorflow"] = tf.__version__
        v["devices"] = [d.name for d in tf.config.list_logical_devices()]
        v["device_kind"] = "CPU" if not tf.config.list_logical_devices("GPU") else "GPU"
    return v


def markdown(report: dict) -> str:
    lines = []
    rows = report["throughput"]
    torch_rows = {(r["model"], r["batch_size"]): r for r in report.get("torch", [])}
    batches = sorted({r["batch_size"] for r in rows} | {b for _, b in torch_rows})
    if rows or torch_rows:
        lines.append(f"Device: {report['versions'].get('device_kind')} "
                     f"({', '.join(report['versions'].get('devices', []))}); data: "
                     f"{report['data']['sizes']} synthetic faces, seed {report['data']['seed']}")
        lines.append("")
        lines.append("| images/s | " + " | ".join(f"b{b}" for b in batches) + " |")
        lines.append("|---|" + "---|" * len(batches))
        keys = []
        for r in rows:
            key = (r["model"], r["framework"], r["loop"], r["precision"])
            if key not in keys:
                keys.append(key)
        for key in keys:
            cells = []
            for b in batches:
                r = next((r for r in rows if (r["model"], r["framework"], r["loop"],
                                               r["precision"]) == key and r["batch_size"] == b),
                         None)
                if r is None:
                    cells.append("-")
                    continue
                cell = f"{r['images_per_s']:,.0f}"
                t = torch_rows.get((key[0], b))
                if t:
                    cell += f" ({r['images_per_s'] / t['images_per_s']:.2f}x torch)"
                cells.append(cell)
            lines.append(f"| {key[0]} {key[1]} {key[2]} {key[3]} | " + " | ".join(cells) + " |")
        for model in MODEL_NAMES:
            if any(m == model for m, _ in torch_rows):
                cells = [f"{torch_rows[(model, b)]['images_per_s']:,.0f}"
                         if (model, b) in torch_rows else "-" for b in batches]
                lines.append(f"| {model} torch.compile bf16 | " + " | ".join(cells) + " |")
    if report["schedules"]:
        lines.append("")
        lines.append("| schedule | model | batch | lr | epochs | precision | train s | wall s "
                     "| images/s | val acc | test acc |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for s in report["schedules"]:
            lines.append(f"| {s['schedule']} | {s['model']} | {s['batch_size']} | "
                         f"{s['learning_rate']:.2e} | {s['epochs']} | {s['precision']} | "
                         f"{s['train_s']} | {s['wall_s']} | {s['images_per_s']:,.0f} | "
                         f"{s['val_accuracy']:.4f} | {s['test_accuracy']:.4f} |")
    lines.append("")
    lines.append(f"Input: data {report['data']['source']} in {report['data']['seconds']} s, "
                 f"device_put + normalize {report['input']['device_put_s']} s; normalization "
                 f"mean {report['data']['normalization']['mean']:.3f} std "
                 f"{report['data']['normalization']['std']:.3f} "
                 f"({report['data']['normalization']['from']})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes on CPU, any backend, torch skipped; for tests")
    p.add_argument("--phases", default="sweep,schedule_best,schedule_notebook",
                   help="comma list of sweep, schedule_best, schedule_notebook")
    p.add_argument("--models", default="cnn,vgg16")
    p.add_argument("--precisions", default="fp32,bf16", help="sweep precisions")
    p.add_argument("--precision", default="bf16", help="precision of the schedules")
    p.add_argument("--batch-sizes", default="256,512,1024,2048",
                   help="sweep sizes, added to each model's notebook batch size")
    p.add_argument("--lr-scaling", default="linear", choices=("linear", "sqrt", "none"),
                   help="learning rate vs the notebook's, by batch size")
    p.add_argument("--train-size", type=int, default=100_676)
    p.add_argument("--val-size", type=int, default=3_589)
    p.add_argument("--test-size", type=int, default=3_589)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--mean", type=float, default=None, help="z-score mean (default: computed)")
    p.add_argument("--std", type=float, default=None, help="z-score std (default: computed)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--data-cache", default="/tmp/fer_gpu_data_{train}_{val}_{test}_{seed}.npz",
                   help="'' to disable")
    p.add_argument("--augment", action="store_true", help="random flip + shift on the device")
    p.add_argument("--max-shift", type=int, default=3)
    p.add_argument("--steps-per-call", type=int, default=20,
                   help="training steps per jitted call (lax.scan); 1 = one dispatch per step")
    p.add_argument("--warmup-calls", type=int, default=3)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--calls-per-window", type=int, default=5)
    p.add_argument("--compare-fit", action="store_true",
                   help="also time model.fit at each model's notebook batch size (fp32)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-jit", action="store_true",
                   help="no XLA (TF backend only; --smoke sets it: XLA compiles of VGG16 take "
                   "tens of seconds on 2 shared CPU cores)")
    p.add_argument("--torch-compile-mode", default="default")
    p.add_argument("--cnn-batch", type=int, default=0, help="schedule_best batch (0: sweep's best)")
    p.add_argument("--vgg-batch", type=int, default=0, help="schedule_best batch (0: sweep's best)")
    p.add_argument("--epochs-fraction", type=float, default=1.0,
                   help="shorten every schedule to this fraction of the notebook's epochs")
    p.add_argument("--val-every", type=int, default=5, help="validation accuracy every N epochs")
    p.add_argument("--out", default="train_gpu.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.train_size, args.val_size, args.test_size = 64, 32, 32
        args.batch_sizes = "8"
        args.phases = "sweep,schedule_best"
        args.no_jit = True
        args.precisions = "fp32"
        args.precision = "fp32"
        args.steps_per_call, args.warmup_calls, args.windows, args.calls_per_window = 2, 1, 2, 1
        args.workers, args.data_cache, args.no_torch = 1, "", True
        args.epochs_fraction = 0.0  # every schedule: 1 epoch
        args.val_every = 1
        args.compare_fit = True
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    phases = [s for s in args.phases.split(",") if s]
    models = [m for m in args.models.split(",") if m]
    data, data_info = load_or_generate(args)  # before any accelerator runtime: fork is safe
    print(f"[data] {data_info['description']}: {data_info['sizes']} ({data_info['source']}, "
          f"{data_info['seconds']} s); z-score mean {data_info['normalization']['mean']:.3f} "
          f"std {data_info['normalization']['std']:.3f}", flush=True)
    mean, std = data_info["normalization"]["mean"], data_info["normalization"]["std"]
    extra = [int(b) for b in args.batch_sizes.split(",") if b]
    # --smoke: only the tiny batch size (the notebook's 70/65 exceed the smoke training set)
    sweep_batches = {m: sorted(set(extra) if args.smoke
                               else {NOTEBOOK.models[m].batch_size, *extra}) for m in models}
    report = {"command": [sys.executable, *sys.argv], "argv": sys.argv[1:],
              "smoke": args.smoke, "data": data_info, "throughput": [], "torch": [],
              "schedules": [], "input": {}}

    # torch first, so JAX's preallocation does not starve it (torch frees its cache after).
    if "sweep" in phases and not args.no_torch:
        try:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import torch_reference
            if torch_reference.available():
                xtr = ((data["train"][0].astype(np.float32) - mean) / std)
                for m in models:
                    print(f"[torch] {m} {sweep_batches[m]}", flush=True)
                    report["torch"] += torch_reference.measure(
                        m, xtr, data["train"][1], sweep_batches[m],
                        lambda b, m=m: scaled_lr(m, b, args.lr_scaling),
                        compile_mode=None if args.torch_compile_mode == "none"
                        else args.torch_compile_mode)
                report["torch_versions"] = torch_reference.versions()
                del xtr
            else:
                report["torch_skipped"] = "torch not importable or no CUDA device"
        except Exception as exc:  # noqa: BLE001 - the reference is optional
            report["torch_skipped"] = f"{type(exc).__name__}: {exc}"
            print(f"[torch] skipped: {report['torch_skipped']}", flush=True)
    else:
        report["torch_skipped"] = "--no-torch or no sweep phase"

    import keras
    backend = keras.backend.backend()
    if backend not in ("jax", "tensorflow"):
        raise SystemExit(f"KERAS_BACKEND={backend} is not supported (jax or tensorflow)")
    report["versions"] = versions(backend)
    print(f"[env] {report['versions']}", flush=True)
    dev, put_s = to_device(data, mean, std, backend)
    report["input"]["device_put_s"] = round(put_s, 3)

    def save():
        report["total_s"] = round(time.perf_counter() - started, 2)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)

    if "sweep" in phases:
        for m in models:
            for prec in [p for p in args.precisions.split(",") if p]:
                for b in sweep_batches[m]:
                    if b > len(data["train"][1]):
                        continue
                    try:
                        r = measure_custom(backend, m, b, prec, dev, args)
                    except Exception as exc:  # noqa: BLE001 - e.g. out of memory at one size
                        if args.smoke:
                            raise
                        print(f"[sweep] {m} b{b} {prec} FAILED: {exc}", flush=True)
                        report.setdefault("errors", []).append(
                            {"model": m, "batch_size": b, "precision": prec,
                             "error": f"{type(exc).__name__}: {exc}"})
                        set_precision("fp32")
                        continue
                    report["throughput"].append(r)
                    print(f"[sweep] {m} b{b} {prec}: {r['images_per_s']:,.0f} images/s "
                          f"(first call {r['first_call_s']} s)", flush=True)
                    save()
            if args.compare_fit:
                b = NOTEBOOK.models[m].batch_size if not args.smoke else sweep_batches[m][0]
                try:
                    r = measure_fit(backend, m, b, "fp32", dev, args)
                except Exception as exc:  # noqa: BLE001 - keep the sweep's other rows
                    if args.smoke:
                        raise
                    r = {"framework": f"keras-{backend}", "loop": "fit", "model": m,
                         "batch_size": b, "precision": "fp32", "images_per_s": 0.0,
                         "error": f"{type(exc).__name__}: {exc}"}
                report["throughput"].append(r)
                print(f"[fit] {m} b{b} fp32: {r['images_per_s']:,.0f} images/s", flush=True)
                save()

    def epochs_for(m):
        return max(1, round(NOTEBOOK.models[m].epochs * args.epochs_fraction))

    def best_batch(m):
        explicit = args.cnn_batch if m == "cnn" else args.vgg_batch
        if explicit:
            return explicit
        rows = [r for r in report["throughput"] if r["model"] == m and r["loop"] == "custom"
                and r["precision"] == args.precision]
        return max(rows, key=lambda r: r["images_per_s"])["batch_size"] if rows \
            else NOTEBOOK.models[m].batch_size

    for phase in ("schedule_best", "schedule_notebook"):
        if phase not in phases:
            continue
        for m in models:
            if phase == "schedule_best":
                b = best_batch(m)
                lr = scaled_lr(m, b, args.lr_scaling)
            else:
                b = NOTEBOOK.models[m].batch_size
                lr = NOTEBOOK.models[m].learning_rate
            b = min(b, len(data["train"][1]))
            s = run_schedule(backend, m, b, lr, epochs_for(m), args.precision, dev, args, phase)
            report["schedules"].append(s)
            print(f"[{phase}] {m} b{b} {s['epochs']} epochs: train {s['train_s']} s, wall "
                  f"{s['wall_s']} s, test accuracy {s['test_accuracy']:.4f}", flush=True)
            save()

    save()
    table = markdown(report)
    report["markdown"] = table
    save()
    print()
    print(table)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
