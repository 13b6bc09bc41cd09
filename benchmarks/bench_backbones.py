"""Train images/s of pretrained backbones: cnnpipe (jax/XLA) vs timm + PyTorch, same batches, same run.

resnet18 and convnext_atto at 64x64 and 224x224, fp32, Adam, 10 classes. cnnpipe's side
is `build_model` + `make_train_step` exactly as `cnnpipe train` builds them; the peer is
`timm.create_model(name, num_classes=10)` with `torch.optim.Adam`, in a process of its
own (timm needs its own venv here: `pip install timm safetensors` brings a torchvision
that loads with its torch), kept alive and asked for one timed block at a time, so the
two sides alternate and share the machine's noise. Medians over the blocks.

    /tmp/timmvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm safetensors
    .venv/bin/python benchmarks/bench_backbones.py --peer-python /tmp/timmvenv/bin/python
    .venv/bin/python benchmarks/bench_backbones.py --precision bf16       # on a GPU: bf16 too

The peer subprocess runs this same file with --serve-peer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = (("resnet18", 64, 32), ("convnext_atto", 64, 32), ("resnet18", 224, 16), ("convnext_atto", 224, 16))
CLASSES = 10


def _nproc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---------------------------------------------------------------- the peer (timm + torch)

def serve_peer() -> None:
    """Read 'arch size batch steps' lines; answer each with the seconds of that many train steps."""
    import timm
    import torch

    torch.set_num_threads(_nproc())
    print(json.dumps({"version": f"torch {torch.__version__}, timm {timm.__version__}"}), flush=True)
    nets: dict = {}
    for line in sys.stdin:
        arch, size, batch, steps = line.split()
        size, batch, steps = int(size), int(batch), int(steps)
        if (arch, size, batch) not in nets:
            torch.manual_seed(0)
            net = timm.create_model(arch, num_classes=CLASSES).train()
            opt = torch.optim.Adam(net.parameters(), lr=1e-3)
            x = torch.rand(batch, 3, size, size)
            y = torch.randint(0, CLASSES, (batch,))
            nets[(arch, size, batch)] = (net, opt, x, y)
        net, opt, x, y = nets[(arch, size, batch)]

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()

        step()   # warm
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)


class Peer:
    def __init__(self, python: str):
        self.proc = subprocess.Popen([python, __file__, "--serve-peer"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.version = json.loads(self.proc.stdout.readline())["version"]

    def block(self, arch: str, size: int, batch: int, steps: int) -> float:
        self.proc.stdin.write(f"{arch} {size} {batch} {steps}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# ---------------------------------------------------------------- cnnpipe

def cnnpipe_runner(arch: str, size: int, batch: int, precision: str, devices: int):
    """(a function timing `steps` train steps, compile seconds)."""
    import jax
    import numpy as np
    from flax import nnx

    from cnnpipe.config import OptimizerConfig
    from cnnpipe.models.cnn import build_model
    from cnnpipe.training import steps as st

    mesh = st.make_mesh(devices)
    model = build_model(arch, in_channels=3, num_classes=CLASSES, input_size=(size, size), bit_depth=8,
                        rngs=nnx.Rngs(0))
    tx = st.make_optimizer(OptimizerConfig(), 1000)
    graphdef, state = st.create_train_state(model, tx, 0)
    state = st.replicate(mesh, state)
    rng = np.random.default_rng(0)
    x, y = st.shard_batch(mesh, rng.integers(0, 256, (batch, size, size, 3), np.uint8),
                          rng.integers(0, CLASSES, batch).astype(np.int32))
    train_step = st.make_train_step(graphdef, tx, mesh, precision=precision)
    t0 = time.perf_counter()
    train_step.compile(state, x, y)
    compile_s = time.perf_counter() - t0
    box = [state]

    def block(steps: int) -> float:
        s, m = train_step(box[0], x, y)
        jax.block_until_ready(m)
        t = time.perf_counter()
        for _ in range(steps):
            s, m = train_step(s, x, y)
        jax.block_until_ready(m)
        box[0] = s
        return time.perf_counter() - t

    return block, compile_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve-peer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--peer-python", default=os.environ.get("CNNPIPE_TIMM_PYTHON"),
                    help="a python with torch and timm (default $CNNPIPE_TIMM_PYTHON); none: cnnpipe only")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="train steps per timed block")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    ap.add_argument("--archs", nargs="+", default=["resnet18", "convnext_atto"])
    ap.add_argument("--devices", type=int, default=0, help="XLA devices (0: one per core, as cnnpipe train)")
    ap.add_argument("--no-tune", action="store_true", help="XLA:CPU's default kernels (YNNPACK)")
    args = ap.parse_args()
    if args.serve_peer:
        serve_peer()
        return
    from cnnpipe.training.mesh import setup_cpu_devices

    setup_cpu_devices(args.devices or None, tune=not args.no_tune)   # what `cnnpipe train` does on CPU
    import jax

    peer = Peer(args.peer_python) if args.peer_python else None
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({_nproc()} cores, {len(jax.devices())} devices), "
          f"{args.precision}; "
          f"peer: {peer.version if peer else 'none (give --peer-python)'}")
    try:
        for arch, size, batch in (c for c in CASES if c[1] in args.sizes and c[0] in args.archs):
            block, compile_s = cnnpipe_runner(arch, size, batch, args.precision, args.devices)
            ours, theirs = [], []
            for _ in range(args.blocks):   # alternate: both sides see the same machine
                ours.append(batch * args.steps / block(args.steps))
                if peer:
                    theirs.append(batch * args.steps / peer.block(arch, size, batch, args.steps))
            line = (f"{arch:14s} {size:3d}x{size:<3d} batch {batch:3d}: cnnpipe {statistics.median(ours):7.1f} img/s "
                    f"(compile {compile_s:.1f}s)")
            if theirs:
                line += (f", timm+torch {statistics.median(theirs):7.1f} img/s, ratio "
                         f"{statistics.median(ours) / statistics.median(theirs):.2f}x")
            print(line, flush=True)
    finally:
        if peer:
            peer.close()


if __name__ == "__main__":
    main()
