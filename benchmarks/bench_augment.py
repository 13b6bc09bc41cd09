"""Augmentation cost: cnnpipe's device ops against torchvision's per-image transforms, and inside a train step.

1. Augmentation alone, images/s: cnnpipe's `augment_batch` (one jitted call per batch, raw
   uint8 pixels, every local device) against torchvision.transforms.v2 applied image by
   image to uint8 tensors, as a DataLoader worker does (`--peer-python`: a Python with
   torch + torchvision, run as its own process; one worker per core is the best a
   DataLoader gets, so its rate is also given times the core count). Same ops on both
   sides: random resized crop (scale 0.5-1), horizontal and vertical flip, brightness and
   contrast 0.2, random erasing p=0.25. Timed blocks alternate; medians of `--repeats`.
2. The train step of the reference CNN (issue 4's, batch 128, 32x32x3) with every cnnpipe
   augmentation, mixup and cutmix on, against the same step with none, same process:
   what augmenting on the device costs a step.

    .venv/bin/python benchmarks/bench_augment.py --peer-python /work/timmvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PEER = r"""
import json, sys, time, statistics, torch
from torchvision.transforms import v2
size, batch, repeats = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[4])
seconds = float(sys.argv[3])
torch.set_num_threads(1)
torch.manual_seed(0)
t = v2.Compose([v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                v2.RandomVerticalFlip(), v2.ColorJitter(brightness=0.2, contrast=0.2), v2.RandomErasing(p=0.25)])
x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
for im in x[:8]:
    t(im)
rates = []
for _ in range(repeats):
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for im in x:
            t(im)
        n += batch
    rates.append(n / (time.perf_counter() - t0))
import torchvision
print(json.dumps({"rate": statistics.median(rates), "version": f"torch {torch.__version__}, torchvision {torchvision.__version__}"}))
"""


def _nproc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _rate(fn, batch: int, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += batch
    return n / (time.perf_counter() - t0)


def augment_alone(size: int, batch: int, seconds: float, repeats: int, peer: str | None) -> None:
    import jax
    import numpy as np

    from cnnpipe.config import AugmentConfig, RandomResizedCropConfig
    from cnnpipe.training.augment import augment_batch
    from cnnpipe.training.mesh import make_mesh, shard_batch

    cfg = AugmentConfig(random_resized_crop=RandomResizedCropConfig(scale=(0.5, 1.0)), flip=True, vflip=True,
                        brightness=0.2, contrast=0.2, random_erasing=0.25)
    mesh = make_mesh(0)
    x, _ = shard_batch(mesh, np.random.default_rng(0).integers(0, 256, (batch, size, size, 3)).astype(np.uint8),
                       np.zeros(batch, np.int32))
    fn = jax.jit(lambda im, k: augment_batch(im, k, cfg))
    key = [jax.random.PRNGKey(0)]

    def step():
        key[0] = jax.random.fold_in(key[0], 1)
        jax.block_until_ready(fn(x, key[0]))

    step()
    ours = [_rate(step, batch, seconds) for _ in range(repeats)]
    line = f"augmentation alone, {size}x{size}x3 uint8, batch {batch}: cnnpipe {statistics.median(ours):,.0f} images/s"
    if peer:
        out = subprocess.run([peer, "-c", PEER, str(size), str(batch), str(seconds), str(repeats)],
                             capture_output=True, text=True, check=True)
        theirs = json.loads(out.stdout.strip().splitlines()[-1])
        best = theirs["rate"] * _nproc()
        line += (f"; torchvision per image {theirs['rate']:,.0f} images/s on one core, {best:,.0f} on "
                 f"{_nproc()} ({theirs['version']}); ratio {statistics.median(ours) / best:.2f}x the "
                 f"{_nproc()}-worker peer")
    print(line, flush=True)


def train_step_cost(seconds: float, repeats: int) -> None:
    import jax
    import numpy as np
    from flax import nnx

    from cnnpipe.config import AugmentConfig, OptimizerConfig, RandomResizedCropConfig
    from cnnpipe.models.cnn import build_model
    from cnnpipe.training import steps

    sys.path.insert(0, os.path.dirname(__file__))
    from bench_train import BATCH, CLASSES, LAYERS

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (BATCH, 32, 32, 3)).astype(np.uint8)
    y = rng.integers(0, CLASSES, BATCH).astype(np.int32)
    every = AugmentConfig(flip=True, vflip=True, rot90=True, crop_padding=2, brightness=0.2, contrast=0.2,
                          gamma=0.2, noise=0.02, random_erasing=0.25, mixup=0.2, cutmix=1.0,
                          random_resized_crop=RandomResizedCropConfig(scale=(0.5, 1.0)))
    runners = {}
    for name, aug in (("plain", AugmentConfig()), ("every augmentation", every)):
        model = build_model(LAYERS, in_channels=3, num_classes=CLASSES, input_size=(32, 32), bit_depth=8,
                            rngs=nnx.Rngs(0))
        tx = steps.make_optimizer(OptimizerConfig(), 10**6)
        mesh = steps.make_mesh(0)
        graphdef, state = steps.create_train_state(model, tx, 0)
        holder = {"state": steps.replicate(mesh, state)}
        step = steps.make_train_step(graphdef, tx, mesh, augment=aug, label_smoothing=0.1 if aug != AugmentConfig()
                                     else 0.0)
        batch = steps.shard_batch(mesh, x, y)

        def run(step=step, holder=holder, batch=batch):
            holder["state"], m = step(holder["state"], *batch)
            jax.block_until_ready(m)

        run()
        runners[name] = run
    rates: dict[str, list[float]] = {n: [] for n in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            rates[name].append(_rate(run, BATCH, seconds))
    plain, aug = statistics.median(rates["plain"]), statistics.median(rates["every augmentation"])
    print(f"train step, reference CNN, batch {BATCH}, {jax.device_count()} device(s): plain {plain:,.0f} images/s, "
          f"every augmentation + mixup/cutmix + label smoothing {aug:,.0f} images/s; ratio {aug / plain:.2f}x",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", help="a Python with torch and torchvision (the per-image peer)")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--devices", type=int, default=0, help="XLA CPU devices (0: one per core, as cnnpipe train)")
    args = parser.parse_args()
    from cnnpipe.training.mesh import setup_cpu_devices

    setup_cpu_devices(args.devices or _nproc())
    for size, batch in ((32, 128), (224, 32)):
        augment_alone(size, batch, args.seconds, args.repeats, args.peer_python)
    train_step_cost(args.seconds, args.repeats)


if __name__ == "__main__":
    main()
