"""Time to result: whole-process wall time of `cnnpipe train` vs a plain PyTorch script.

Every run is a fresh process timed from outside, as a user waits for it: imports,
data, compiling, steps, evaluation, checkpoints and plots. The data is scikit-learn's
1,797 handwritten digits (8x8, values 0..16) written as 32x32 gray PNGs (x4 nearest)
and preprocessed into a store once; both sides train the default `simple_cnn` on that
store's arrays for the same epochs (batch 64, Adam 1e-3, evaluation every epoch).

- cnnpipe cold: an empty compilation cache (`CNNPIPE_COMPILE_CACHE` set to a fresh
  directory); warm: the second run on that cache. PyTorch runs twice per round.
- Runs alternate within each round (the machine may be shared); medians are reported.
- Where cnnpipe's time goes comes from its summary.json ("seconds"); "startup" is the
  outer wall time minus the time `train_and_evaluate` measured (interpreter, imports
  of jax/flax/optax, config).

    .venv/bin/pip install torch==2.13.0 scikit-learn      # the peer and the digits (optional)
    .venv/bin/python benchmarks/bench_e2e.py                # digits, 15 epochs, 3 rounds
    .venv/bin/python benchmarks/bench_e2e.py --default      # + the default `cnnpipe train`
    .venv/bin/python benchmarks/bench_e2e.py --data shapes  # no scikit-learn: the shapes data as PNGs
    .venv/bin/python benchmarks/bench_e2e.py --variant host:data.on_device=false \
        --variant one:train.steps_per_dispatch=1             # + warm runs with config overrides
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

import numpy as np

PEER = Path(__file__).with_name("peer_torch_train.py")
PHASES = ("startup", "imports", "data", "build", "compile", "steps", "eval", "checkpoints", "plots", "other")


def write_pngs(root: Path, source: str) -> int:
    """The benchmark's image folder: one sub-folder per class of 32x32 8-bit gray PNGs."""
    from PIL import Image

    if source == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = np.rint(d.images * (255 / 16)).astype(np.uint8)
        images = np.kron(images, np.ones((1, 4, 4), np.uint8))
        labels, names = d.target, [str(c) for c in d.target_names]
    else:
        from cnnpipe.datasets.shapes import make_shapes

        x, labels = make_shapes(2000, size=(32, 32), bit_depth=8, seed=0, split="train")
        images = x.mean(axis=-1).astype(np.uint8)
        names = [f"class{c}" for c in range(int(labels.max()) + 1)]
    for i, (img, y) in enumerate(zip(images, labels)):
        folder = root / names[int(y)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    return len(images)


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def cnnpipe_run(args_: list[str], cache: Path, work: Path, tag: str) -> dict:
    env = {**os.environ, "CNNPIPE_COMPILE_CACHE": str(cache)}
    run_dir = work / f"run-{tag}"
    wall, _ = timed([sys.executable, "-m", "cnnpipe.cli", "train", *args_, "--workdir", str(run_dir)], env, work)
    summary = json.loads((run_dir / "summary.json").read_text())
    seconds = dict(summary.get("seconds", {}))   # absent in runs of older versions (a "before" checkout)
    seconds["startup"] = wall - seconds.get("total", summary["wall_seconds"])
    seconds.setdefault("compile", summary["compile_seconds"])
    return {"wall": wall, "accuracy": summary["final_val_accuracy"], "seconds": seconds,
            "compile_seconds": summary["compile_seconds"]}


def torch_run(store: Path, epochs: int, work: Path) -> dict:
    wall, out = timed([sys.executable, str(PEER), str(store), "--epochs", str(epochs),
                       "--out", str(work / "peer.pt")], dict(os.environ), work)
    rec = json.loads(out.strip().splitlines()[-1])
    return {"wall": wall, "accuracy": rec["accuracy"], "seconds": rec["seconds"]}


def med(runs: list[dict], key: str = "wall") -> float:
    return statistics.median(r[key] for r in runs)


def breakdown(runs: list[dict]) -> str:
    keys = [k for k in PHASES if any(k in r["seconds"] for r in runs)]
    return ", ".join(f"{k} {statistics.median(r['seconds'].get(k, 0.0) for r in runs):.2f}" for k in keys)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["digits", "shapes"], default="digits")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--default", action="store_true", help="also time the default `cnnpipe train` (shapes)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                    help="also time warm runs with these config overrides, e.g. host:data.on_device=false")
    args = ap.parse_args()
    variants = {v.split(":", 1)[0]: [a for kv in v.split(":", 1)[1].split(",") for a in ("--set", kv)]
                for v in args.variant}
    has_torch = not args.no_torch
    if has_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("PyTorch not installed (`.venv/bin/pip install torch==2.13.0`): timing cnnpipe only")
            has_torch = False
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        work = Path(tmp)
        n = write_pngs(work / "images", args.data)
        store = work / "store"
        timed([sys.executable, "-m", "cnnpipe.cli", "preprocess", str(work / "images"), str(store), "--size", "32",
               "--channels", "gray", "--seed", "0"], dict(os.environ), work)
        train_args = ["--set", "data.source=store", "--set", f"data.path={store}", "--set", f"train.epochs={args.epochs}"]
        runs: dict[str, list[dict]] = {"cold": [], "warm": [], "torch": [], "default cold": [], "default warm": [],
                                       **{name: [] for name in variants}}
        for name, extra in variants.items():   # an untimed first run fills the variant's compilation cache
            cnnpipe_run(train_args + extra, work / f"vcache-{name}", work, f"{name}-first")
        for r in range(args.rounds):
            cache = work / f"cache-{r}"
            runs["cold"].append(cnnpipe_run(train_args, cache, work, f"cold{r}"))
            if has_torch:
                runs["torch"].append(torch_run(store, args.epochs, work))
            runs["warm"].append(cnnpipe_run(train_args, cache, work, f"warm{r}"))
            if has_torch:
                runs["torch"].append(torch_run(store, args.epochs, work))
            for name, extra in variants.items():
                runs[name].append(cnnpipe_run(train_args + extra, work / f"vcache-{name}", work, f"{name}{r}"))
            if args.default:
                dcache = work / f"dcache-{r}"
                runs["default cold"].append(cnnpipe_run([], dcache, work, f"dcold{r}"))
                runs["default warm"].append(cnnpipe_run([], dcache, work, f"dwarm{r}"))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]['wall']:.1f}s" for k, v in runs.items() if v),
                  flush=True)
    print(f"\n{args.data}: {n} images as 32x32 PNGs -> store; {args.epochs} epochs; {os.cpu_count()} cores; "
          f"medians of {args.rounds} rounds (load average now {os.getloadavg()[0]:.2f})")
    for name, rs in runs.items():
        if rs:
            print(f"  {name:<13} {med(rs):6.2f} s  accuracy {med(rs, 'accuracy'):.4f}   [{breakdown(rs)}]")
    if runs["torch"]:
        t = med(runs["torch"])
        print(f"ratio cnnpipe / pytorch (whole process, lower is faster): cold {med(runs['cold']) / t:.2f}x "
              f"(target <= 1.5), warm {med(runs['warm']) / t:.2f}x (target <= 1.0)")
    if runs["default cold"]:
        print(f"default `cnnpipe train`: cold {med(runs['default cold']):.1f} s (target < 20), "
              f"warm {med(runs['default warm']):.1f} s (target < 12)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
