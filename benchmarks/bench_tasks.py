"""Multi-label runs: the train step's cost against single-label, and the mAP against plain PyTorch.

1. step: the multi-label train step (sigmoid BCE over (N, L) float32 targets, unknowns
   masked) against the single-label one (softmax cross-entropy of int32 labels), same
   model (`simple_cnn`, 10 outputs), batch 64, 32x32x3 uint8, in one process; timed blocks
   alternate and the medians' ratio is printed (issue 29 asks for <= 1.05x).
2. map: the digit mosaics of `scripts/make_multilabel_digits.py` (real scans, label sets
   known by construction), stored once by `cnnpipe preprocess --label-delim '|'`; cnnpipe
   trains `simple_cnn` with BCE, Adam 1e-3, batch 64 for E epochs (`cnnpipe train`), and
   `benchmarks/peer_torch_multilabel.py` trains the same CNN the same way on the same store's
   arrays in its own process. Both report the validation split's macro mAP (issue 29:
   cnnpipe within 0.01 of the peer, or above). Several seeds give the spread.

    .venv/bin/pip install torch==2.13.0   # the peer (a local CPU wheel)
    .venv/bin/python benchmarks/bench_tasks.py --only step
    .venv/bin/python benchmarks/bench_tasks.py --only map --epochs 15 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench_step(blocks: int = 9, steps: int = 30) -> None:
    import jax
    import numpy as np
    from flax import nnx

    from cnnpipe.config import OptimizerConfig
    from cnnpipe.models.cnn import build_model
    from cnnpipe.tasks import Task
    from cnnpipe.training import steps as st
    from cnnpipe.training.task_steps import make_task_train_step

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 64).astype(np.int32)
    targets = (rng.random((64, 10)) < 0.3).astype(np.float32)
    targets[rng.random((64, 10)) < 0.05] = np.nan
    mesh = st.make_mesh(1)
    task = Task("multilabel", tuple(f"l{i}" for i in range(10)))

    def runner(multi: bool):
        model = build_model("simple_cnn", in_channels=3, num_classes=10, input_size=(32, 32), bit_depth=8,
                            rngs=nnx.Rngs(0), mean=[127.0] * 3, std=[64.0] * 3)
        tx = st.make_optimizer(OptimizerConfig(), 1000)
        graphdef, state = st.create_train_state(model, tx, 0)
        state = st.replicate(mesh, state)
        step = make_task_train_step(graphdef, tx, mesh, task) if multi else st.make_train_step(graphdef, tx, mesh)
        batch = st.shard_batch(mesh, x, targets if multi else labels)
        box = [state]

        def block() -> float:
            t = time.perf_counter()
            for _ in range(steps):
                box[0], m = step(box[0], *batch)
            jax.block_until_ready(m["loss"])
            return (time.perf_counter() - t) / steps

        block()   # compile and warm up
        return block

    single, multi = runner(False), runner(True)
    times = {"single": [], "multi": []}
    for i in range(blocks):   # alternating which goes first, so neither always follows the other
        for name in (("single", "multi") if i % 2 == 0 else ("multi", "single")):
            times[name].append((single if name == "single" else multi)())
    s, m = statistics.median(times["single"]), statistics.median(times["multi"])
    print(f"train step, simple_cnn, batch 64, 32x32x3, {jax.devices()[0].platform}: single-label {1e3 * s:.2f} ms, "
          f"multi-label {1e3 * m:.2f} ms (medians of {blocks} blocks of {steps}); multi/single = {m / s:.3f}x")


def _run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return out.stdout


def bench_map(epochs: int, seeds: list[int], n: int) -> None:
    py = sys.executable
    cli = [py, "-m", "cnnpipe.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        data, store = Path(tmp) / "data", Path(tmp) / "store"
        _run([py, "scripts/make_multilabel_digits.py", str(data), "--n", str(n)])
        _run([*cli, "preprocess", str(data / "images"), str(store), "--labels", str(data / "labels.csv"),
              "--label-col", "labels", "--label-delim", "|", "--size", "16", "--channels", "gray", "--val-fraction",
              "0.2"])
        rows = []
        for seed in seeds:
            cfg = Path(tmp) / f"cfg{seed}.yaml"
            cfg.write_text(f"seed: {seed}\ndata: {{source: store, path: {store}}}\n"
                           f"train: {{epochs: {epochs}, batch_size: 64, thresholds: 0.5}}\n")
            t = time.perf_counter()
            _run([*cli, "train", str(cfg), "--workdir", str(Path(tmp) / f"run{seed}")])
            ours_s = time.perf_counter() - t
            ours = json.loads((Path(tmp) / f"run{seed}" / "summary.json").read_text())["val_map"]
            t = time.perf_counter()
            peer = json.loads(_run([py, "benchmarks/peer_torch_multilabel.py", str(store), "--epochs", str(epochs),
                                    "--seed", str(seed)]).strip().splitlines()[-1])["map"]
            rows.append((seed, ours, peer, ours_s, time.perf_counter() - t))
            print(f"seed {seed}: cnnpipe mAP {ours:.4f} ({ours_s:.1f} s whole process), PyTorch mAP {peer:.4f} "
                  f"({rows[-1][4]:.1f} s); difference {ours - peer:+.4f}")
        diffs = [r[1] - r[2] for r in rows]
        print(f"{n} mosaics, {epochs} epochs, {len(seeds)} seeds: cnnpipe mAP median "
              f"{statistics.median(r[1] for r in rows):.4f}, PyTorch {statistics.median(r[2] for r in rows):.4f}; "
              f"cnnpipe - PyTorch median {statistics.median(diffs):+.4f} (min {min(diffs):+.4f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("step", "map"))
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=3000)
    args = ap.parse_args()
    os.environ.setdefault("CNNPIPE_COMPILE_CACHE", "off")
    if args.only in (None, "step"):
        bench_step()
    if args.only in (None, "map"):
        bench_map(args.epochs, args.seeds, args.n)


if __name__ == "__main__":
    main()
