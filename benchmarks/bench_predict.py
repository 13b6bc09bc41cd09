"""Predict throughput: `cnnpipe predict` (every core, one worker) vs a plain loop, same run, same files.

The plain loop is what a user writes by hand: Pillow decode + resize to the model's
size + one jitted forward per batch, in one process. Each contender runs in turn over
the same folder, in alternating rounds, in this process (the run's model compiled once
beforehand, so no contender pays for compiling); medians of images/s and their ratio to
the plain loop are printed. Peak RSS of `cnnpipe predict` as a whole process at two
folder sizes shows memory does not grow with the file count.

    python benchmarks/bench_predict.py [--quick] [--n-jpeg 2000] [--n-png 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _photo(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    planes = [(np.sin(x / (9 + 5 * k) + k) + np.cos(y / (7 + 3 * k))) / 4 + 0.5 for k in range(3)]
    a = np.stack(planes, -1) + rng.normal(0, 0.04, (h, w, 3))
    return np.clip(a * 255, 0, 255).astype(np.uint8)


def make_folder(root: Path, n: int, kind: str) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    base = _photo(768, 1024, rng) if kind == "jpeg" else None
    for i in range(n):
        if kind == "jpeg":  # photo-sized: 1024x768, each a little different
            Image.fromarray(np.roll(base, i * 7, axis=1)).save(root / f"{i:05d}.jpg", quality=90)
        else:
            Image.fromarray(_photo(40, 48, rng)).save(root / f"{i:05d}.png")
    return root


def plain_loop(run, files: list[str], batch: int = 64) -> int:
    """Pillow decode + resize + jitted forward, one process: what cnnpipe predict is compared with."""
    from flax import nnx

    from cnnpipe.training.steps import forward

    h, w = (int(s) for s in run.info["size"])
    graphdef, state = nnx.split(run.model())
    x = np.zeros((batch, h, w, 3), np.float32)
    n = 0
    for start in range(0, len(files), batch):
        chunk = files[start:start + batch]
        for i, f in enumerate(chunk):
            with Image.open(f) as im:
                x[i] = np.asarray(im.convert("RGB").resize((w, h), Image.Resampling.BICUBIC))
        np.asarray(forward(graphdef, (state,), x.copy(), ())[0])
        n += len(chunk)
    return n


def cnnpipe_predict(run, files: list[str], workers: int) -> int:
    from cnnpipe.runs.predict import predict_files

    return sum(1 for p in predict_files(run, files, workers=workers, top_k=3) if not p.error)


def peak_rss_mib(run_dir: Path, folder: Path) -> float:
    """Peak RSS (MiB) of `cnnpipe predict` over `folder`, as a whole process (its workers not counted)."""
    code = ("import resource, sys; from cnnpipe.cli import main; "
            f"rc = main(['predict', {str(run_dir)!r}, {str(folder)!r}, '--out', {str(folder) + '.csv'!r}]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small folders, one round (a smoke run)")
    ap.add_argument("--n-jpeg", type=int, default=None, help="photo-sized JPEGs (default 2000, quick 200)")
    ap.add_argument("--n-png", type=int, default=None, help="small PNGs (default 2000, quick 300)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3, quick 1)")
    args = ap.parse_args()
    n_jpeg = args.n_jpeg or (200 if args.quick else 2000)
    n_png = args.n_png or (300 if args.quick else 2000)
    rounds = args.rounds or (1 if args.quick else 3)
    from cnnpipe.cli import main as cli
    from cnnpipe.runs.load import load_run

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        assert cli(["train", "--workdir", str(tmp / "run"), "--set", "train.epochs=1", "--set", "data.num_train=512",
                    "--set", "data.size=[64,64]", "--compile-cache", "off"]) == 0
        run = load_run(tmp / "run")
        t0 = time.perf_counter()
        folders = {"jpeg": make_folder(tmp / "jpeg", n_jpeg, "jpeg"), "png": make_folder(tmp / "png", n_png, "png")}
        print(f"made {n_jpeg} JPEGs (1024x768) and {n_png} PNGs (48x40) in {time.perf_counter() - t0:.1f} s; "
              f"model input 64x64x3, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
        cnnpipe_predict(run, [str(next(folders['png'].iterdir()))], 1)  # compile once, outside the timing
        for kind, folder in folders.items():
            files = sorted(str(p) for p in folder.iterdir())
            contenders = {"plain loop": lambda: plain_loop(run, files),
                          "cnnpipe 1 worker": lambda: cnnpipe_predict(run, files, 1),
                          "cnnpipe all cores": lambda: cnnpipe_predict(run, files, 0)}
            rates: dict[str, list[float]] = {k: [] for k in contenders}
            for _ in range(rounds):
                for name, fn in contenders.items():
                    t = time.perf_counter()
                    n = fn()
                    rates[name].append(n / (time.perf_counter() - t))
            med = {k: statistics.median(v) for k, v in rates.items()}
            print(f"{kind:<5} {len(files):>5} files: " + " | ".join(
                f"{k} {v:7.1f} img/s" + ("" if k == "plain loop" else f" ({v / med['plain loop']:.2f}x)")
                for k, v in med.items()))
        small, big = make_folder(tmp / "rss_small", 300, "png"), make_folder(tmp / "rss_big", 3000, "png")
        print(f"peak RSS of `cnnpipe predict`: {peak_rss_mib(tmp / 'run', small):.0f} MiB at 300 files, "
              f"{peak_rss_mib(tmp / 'run', big):.0f} MiB at 3,000 files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
