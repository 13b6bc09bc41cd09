"""Train-step throughput: cnnpipe (jax/XLA) vs the same CNN in PyTorch CPU, same process.

The reference CNN of issue 4: input 32x32x3; conv 3x3 32 SAME + ReLU; max pool 2;
conv 3x3 64 SAME + ReLU; max pool 2; dense 128 + ReLU; dense 10; batch 128; Adam 1e-3;
fp32. cnnpipe's side is built with `build_model` + `make_train_step` exactly as
`cnnpipe train` builds it. Timed blocks alternate between the two frameworks (the
machine may be shared) and the medians are reported, with achieved GFLOP/s
(conv + dense multiply-adds x 2, x 3 for forward + backward).

    .venv/bin/pip install torch==2.13.0        # CPU build, a local file (optional peer)
    .venv/bin/python benchmarks/bench_train.py                 # one XLA device per core
    .venv/bin/python benchmarks/bench_train.py --devices 1     # one XLA device, all cores
    .venv/bin/python benchmarks/bench_train.py --no-tune       # XLA:CPU's default (YNNPACK) kernels
    .venv/bin/python benchmarks/bench_train.py --breakdown     # + forward / backward / update split
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

BATCH, H, W, C, CLASSES = 128, 32, 32, 3, 10
LAYERS = [
    {"type": "conv", "filters": 32, "kernel": 3}, {"type": "relu"}, {"type": "max_pool", "window": 2},
    {"type": "conv", "filters": 64, "kernel": 3}, {"type": "relu"}, {"type": "max_pool", "window": 2},
    {"type": "flatten"}, {"type": "dense", "units": 128}, {"type": "relu"}, {"type": "dense", "units": CLASSES},
]


def forward_flops_per_image() -> int:
    """Multiply-adds x 2 of the convs and dense layers (activations and pools ignored)."""
    conv1 = H * W * (3 * 3 * C) * 32 * 2
    conv2 = (H // 2) * (W // 2) * (3 * 3 * 32) * 64 * 2
    dense1 = (H // 4) * (W // 4) * 64 * 128 * 2
    dense2 = 128 * CLASSES * 2
    return conv1 + conv2 + dense1 + dense2


def _nproc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _torch_runner(nproc: int, x_np, y_np, steps: int):
    """(a timed block of `steps` PyTorch train steps of the same CNN, a version line), or None without torch."""
    try:
        import torch
    except ImportError:
        print("PyTorch not installed (`.venv/bin/pip install torch==2.13.0`); timing cnnpipe only")
        return None
    import numpy as np

    torch.set_num_threads(nproc)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(C, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64 * (H // 4) * (W // 4), 128), torch.nn.ReLU(),
        torch.nn.Linear(128, CLASSES))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    xt = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2)))   # NCHW uint8
    yt = torch.from_numpy(y_np.astype(np.int64))
    lossf = torch.nn.CrossEntropyLoss()

    def torch_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = lossf(net(xt.float() / 255.0), yt)   # same on-the-fly scaling as cnnpipe
        loss.backward()
        opt.step()

    for _ in range(3):
        torch_step()

    def torch_block() -> float:
        t = time.perf_counter()
        for _ in range(steps):
            torch_step()
        return time.perf_counter() - t

    return torch_block, f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=0,
                    help="XLA CPU devices (data parallel); 0 = one per core (default)")
    ap.add_argument("--blocks", type=int, default=7, help="timed blocks per framework (default 7)")
    ap.add_argument("--steps", type=int, default=10, help="train steps per block (default 10)")
    ap.add_argument("--no-torch", action="store_true", help="time cnnpipe only")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time forward only and forward+backward (where the time goes)")
    ap.add_argument("--no-tune", action="store_true",
                    help="leave XLA:CPU's default kernels (YNNPACK) on, for comparison")
    ap.add_argument("--hlo", action="store_true", help="print the compiled step's op counts (fusions, convs)")
    args = ap.parse_args()

    nproc = _nproc()
    devices = args.devices or nproc
    # must happen before jax starts its backend: the flag is read once
    from cnnpipe.training.mesh import setup_cpu_devices
    setup_cpu_devices(devices, tune=not args.no_tune)   # what `cnnpipe train` does on CPU

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from cnnpipe.config import OptimizerConfig
    from cnnpipe.models.cnn import build_model, count_params
    from cnnpipe.training.steps import (
        create_train_state,
        make_mesh,
        make_optimizer,
        make_train_step,
        replicate,
        shard_batch,
    )

    rng = np.random.default_rng(0)
    x_np = rng.integers(0, 256, (BATCH, H, W, C), dtype=np.uint8)
    y_np = rng.integers(0, CLASSES, BATCH).astype(np.int32)

    model = build_model(LAYERS, in_channels=C, num_classes=CLASSES, input_size=(H, W), bit_depth=8,
                        rngs=nnx.Rngs(0))
    n_params = count_params(model)
    tx = make_optimizer(OptimizerConfig(name="adam", learning_rate=1e-3), total_steps=10**6)
    mesh = make_mesh(0)
    graphdef, state = create_train_state(model, tx, seed=0)
    state = replicate(mesh, state)
    step = make_train_step(graphdef, tx, mesh)
    xs, ys = shard_batch(mesh, x_np, y_np)

    t0 = time.perf_counter()
    state, m = step(state, xs, ys)
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0

    holder = {"state": state}

    def jax_block() -> float:
        s = holder["state"]
        t = time.perf_counter()
        for _ in range(args.steps):
            s, met = step(s, xs, ys)
        jax.block_until_ready(met["loss"])
        holder["state"] = s
        return time.perf_counter() - t

    runners = {"cnnpipe": jax_block}
    torch_info = ""
    if not args.no_torch:
        peer = _torch_runner(nproc, x_np, y_np, args.steps)
        if peer is not None:
            runners["pytorch"], torch_info = peer

    load_before = os.getloadavg()[0]
    times = _alternating_blocks(runners, args.blocks)
    print(f"reference CNN: {n_params:,} params, batch {BATCH}, "
          f"{forward_flops_per_image() * 3 / 1e6:.1f} MFLOP/image (fwd+bwd)")
    print(f"jax {jax.__version__}, {len(mesh.devices.flat)} XLA {jax.default_backend()} device(s) on "
          f"{nproc} cores; {torch_info or 'no torch'}; compile {compile_s:.2f} s")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load average before/after: "
          f"{load_before:.2f}/{os.getloadavg()[0]:.2f} (a shared machine skews both sides)")
    _print_medians(times, args.steps)

    if args.breakdown:
        _breakdown(jax, jnp, nnx, graphdef, holder["state"], mesh, xs, ys, step, args.steps, args.blocks)
    if args.hlo:
        _hlo_summary(step, holder["state"], xs, ys)
    return 0


def _alternating_blocks(runners: dict, blocks: int) -> dict[str, list[float]]:
    """A warm-up block each, then `blocks` rounds of one timed block per runner, in turn."""
    for run in runners.values():
        run()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(blocks):
        for name, run in runners.items():
            times[name].append(run())
    return times


def _print_medians(times: dict[str, list[float]], steps: int) -> None:
    flops = forward_flops_per_image() * 3
    ips = {k: BATCH * steps / statistics.median(v) for k, v in times.items()}
    print(f"{len(next(iter(times.values())))} alternating blocks of {steps} steps, medians:")
    for name, v in ips.items():
        spread = [BATCH * steps / t for t in times[name]]
        print(f"  {name:<8} {v:9.0f} images/s  {v * flops / 1e9:6.1f} GFLOP/s  "
              f"(blocks {min(spread):.0f}..{max(spread):.0f})")
    if "pytorch" in ips:
        print(f"  ratio cnnpipe / pytorch: {ips['cnnpipe'] / ips['pytorch']:.2f}x")


def _breakdown(jax, jnp, nnx, graphdef, state, mesh, xs, ys, step, steps, blocks) -> None:
    """Time forward only, forward + backward and the full step under the same sharding."""
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    repl, batched = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))

    def loss(params, ms, x, y):
        model = nnx.merge(graphdef, params, ms, copy=True)
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    fwd = jax.jit(loss, in_shardings=(repl, repl, batched, batched))
    fwd_bwd = jax.jit(jax.grad(loss), in_shardings=(repl, repl, batched, batched), out_shardings=repl)
    parts = {"forward": lambda: fwd(state.params, state.model_state, xs, ys),
             "forward+backward": lambda: fwd_bwd(state.params, state.model_state, xs, ys)}
    for f in parts.values():
        jax.block_until_ready(f())
    med = {}
    for name, f in parts.items():
        ts = []
        for _ in range(blocks):
            t = time.perf_counter()
            for _ in range(steps):
                out = f()
            jax.block_until_ready(out)
            ts.append((time.perf_counter() - t) / steps)
        med[name] = statistics.median(ts)
    full = []
    s = state
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(steps):
            s, m = step(s, xs, ys)
        jax.block_until_ready(m["loss"])
        full.append((time.perf_counter() - t) / steps)
    med["full step"] = statistics.median(full)
    print("where the time goes (ms per step of 128 images, medians):")
    print(f"  forward              {med['forward'] * 1e3:7.2f}")
    print(f"  backward             {(med['forward+backward'] - med['forward']) * 1e3:7.2f}")
    print(f"  update + metrics     {(med['full step'] - med['forward+backward']) * 1e3:7.2f}")
    print(f"  full step            {med['full step'] * 1e3:7.2f}")


def _hlo_summary(step, state, xs, ys) -> None:
    import collections
    import re

    text = step.jitted.lower(state, xs, ys).compile().as_text()
    ops = collections.Counter(re.findall(r"= \S+ (convolution|fusion|all-reduce|reduce-window|"
                                         r"select-and-scatter|dot|custom-call)\(", text))
    print("compiled train step, op counts:", dict(ops))


if __name__ == "__main__":
    sys.exit(main())
