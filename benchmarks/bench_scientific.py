"""Float and signed pixels: what keeping them exact costs, against uint16 and a hand-written peer.

1. prepare: one 4-band 256x256 float32 GeoTIFF-like file (NaN stripe, nodata pixels) through
   the one image path to 64x64 (`prepare_bytes`: decode, nodata -> NaN, NaN-aware resampling)
   against (a) the same values rescaled to uint16, through the same path, and (b) the code a
   user writes by hand: ``tifffile.imread`` + Pillow "F" resize per plane (no nodata handling:
   its NaN spread over the whole image). Timed blocks alternate; medians and ratios.
2. step: the train step (simple_cnn, batch 64, 32x32x3) on float32 input with NaN (filled
   inside the model) against uint8 input, in one process.
3. preprocess: whole-process `cnnpipe preprocess` of a folder of float32 files against the
   same folder as uint16 (wall time of each command, medians of runs alternating).
4. accuracy: scikit-learn's real digit scans (classes 0-3) as float32 "reflectance" in [-1, 1]
   and the same values rescaled by hand to uint16; `cnnpipe train` on each with the same seed
   (issue 30: float within 0.01 of uint16), for several seeds.

    .venv/bin/python benchmarks/bench_scientific.py [--only prepare|step|preprocess|accuracy]
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _bands(seed: int, h: int = 256, w: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.normal(-12, 4, (h, w, 4)).astype(np.float32)
    a[40:48] = np.nan
    a[rng.random((h, w)) < 0.01] = -9999.0   # outside the swath: every band at once
    return a


def _tiff(arr: np.ndarray, nodata: bool) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tags = [(42113, "s", 0, "-9999", True)] if nodata else []
    tifffile.imwrite(buf, arr, planarconfig="contig", extratags=tags)
    return buf.getvalue()


def _alternate(fns: dict, blocks: int) -> dict[str, float]:
    times = {k: [] for k in fns}
    names = list(fns)
    for i in range(blocks):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(fns[name]())
    return {k: statistics.median(v) for k, v in times.items()}


def bench_prepare(blocks: int = 9, reps: int = 20) -> None:
    import tifffile
    from PIL import Image

    from cnnpipe.images.transform import ImageSpec, prepare_bytes

    bands = _bands(0)
    u16 = np.rint(np.clip((np.nan_to_num(bands, nan=-40.0) + 40) * 1000, 0, 65535)).astype(np.uint16)
    f_data, u_data = _tiff(bands, True), _tiff(u16, False)
    f_spec = ImageSpec((64, 64), "crop", "native", 32, 4, dtype="float32")
    u_spec = ImageSpec((64, 64), "crop", "native", 16, 4)

    def timed(fn):
        def block() -> float:
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - t) / reps
        return block

    def by_hand() -> np.ndarray:
        arr = tifffile.imread(io.BytesIO(f_data))
        return np.stack([np.asarray(Image.fromarray(arr[..., k], "F").resize((64, 64), Image.Resampling.BICUBIC,
                                                                             reducing_gap=2.0))
                         for k in range(arr.shape[-1])], -1)

    ours = prepare_bytes(f_data, f_spec, "f.tif").pixels
    peer = by_hand()
    med = _alternate({"float32": timed(lambda: prepare_bytes(f_data, f_spec, "f.tif")),
                      "uint16": timed(lambda: prepare_bytes(u_data, u_spec, "u.tif")), "by hand": timed(by_hand)},
                     blocks)
    print(f"prepare 256x256x4 -> 64x64: float32 {1e3 * med['float32']:.2f} ms, uint16 {1e3 * med['uint16']:.2f} ms, "
          f"by hand (tifffile + Pillow F) {1e3 * med['by hand']:.2f} ms (medians of {blocks} blocks of {reps}); "
          f"float32/uint16 = {med['float32'] / med['uint16']:.2f}x, float32/by hand = "
          f"{med['float32'] / med['by hand']:.2f}x")
    print(f"  NaN in the 64x64 result: cnnpipe {np.isnan(ours).mean():.1%} of samples (the stripe), "
          f"by hand {np.isnan(peer).mean():.1%}")


def bench_step(blocks: int = 9, steps: int = 30) -> None:
    import jax
    from flax import nnx

    from cnnpipe.config import OptimizerConfig
    from cnnpipe.models.cnn import build_model
    from cnnpipe.training import steps as st

    rng = np.random.default_rng(0)
    x8 = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    xf = x8.astype(np.float32)
    xf[:, 3:5] = np.nan
    labels = rng.integers(0, 10, 64).astype(np.int32)
    mesh = st.make_mesh(1)

    def runner(x: np.ndarray):
        model = build_model("simple_cnn", in_channels=3, num_classes=10, input_size=(32, 32),
                            bit_depth=8 if x.dtype == np.uint8 else 32, rngs=nnx.Rngs(0), mean=[127.0] * 3,
                            std=[64.0] * 3)
        tx = st.make_optimizer(OptimizerConfig(), 1000)
        graphdef, state = st.create_train_state(model, tx, 0)
        box = [st.replicate(mesh, state)]
        step = st.make_train_step(graphdef, tx, mesh)
        batch = st.shard_batch(mesh, x, labels)

        def block() -> float:
            t = time.perf_counter()
            for _ in range(steps):
                box[0], m = step(box[0], *batch)
            jax.block_until_ready(m["loss"])
            assert np.isfinite(float(m["loss"]))
            return (time.perf_counter() - t) / steps

        block()
        return block

    med = _alternate({"uint8": runner(x8), "float32": runner(xf)}, blocks)
    print(f"train step, simple_cnn, batch 64, 32x32x3, {jax.devices()[0].platform}: uint8 {1e3 * med['uint8']:.2f} ms, "
          f"float32 with NaN {1e3 * med['float32']:.2f} ms (medians of {blocks} blocks of {steps}); "
          f"float32/uint8 = {med['float32'] / med['uint8']:.3f}x")


def bench_preprocess(files: int = 200, runs: int = 3) -> None:
    import tifffile

    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("float32", "uint16"):
            for i in range(files):
                bands = _bands(i, 128, 128)
                if kind == "uint16":
                    bands = np.rint(np.clip((np.nan_to_num(bands, nan=-40.0) + 40) * 1000, 0, 65535)).astype(np.uint16)
                path = Path(tmp) / kind / f"c{i % 2}" / f"{i:04d}.tif"
                path.parent.mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(path, bands, planarconfig="contig",
                                 extratags=[(42113, "s", 0, "-9999", True)] if kind == "float32" else [])
        times = {"float32": [], "uint16": []}
        for r in range(runs):
            for kind in ("float32", "uint16") if r % 2 == 0 else ("uint16", "float32"):
                out = Path(tmp) / f"{kind}.{r}.store"
                t = time.perf_counter()
                subprocess.run([sys.executable, "-m", "cnnpipe.cli", "preprocess", str(Path(tmp) / kind), str(out),
                                "--size", "64", "--channels", "native"], check=True, capture_output=True, cwd=ROOT)
                times[kind].append(time.perf_counter() - t)
        f, u = statistics.median(times["float32"]), statistics.median(times["uint16"])
        print(f"cnnpipe preprocess, {files} files 128x128x4 -> 64x64, whole process: float32 {f:.2f} s, "
              f"uint16 {u:.2f} s (medians of {runs}); float32/uint16 = {f / u:.2f}x")


def bench_accuracy(seeds: tuple[int, ...] = (0, 1, 2), epochs: int = 8) -> None:
    import json

    import tifffile
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.flatnonzero(d.target < 4)
    cli = [sys.executable, "-m", "cnnpipe.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("float32", "uint16"):
            for i in keep:
                f = (d.images[i] / 16.0 * 2.0 - 1.0).astype(np.float32)
                arr = f if kind == "float32" else np.rint((f + 1.0) / 2.0 * 65535).astype(np.uint16)
                path = Path(tmp) / kind / str(d.target[i]) / f"{i:04d}.tif"
                path.parent.mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(path, arr)
            subprocess.run([*cli, "preprocess", str(Path(tmp) / kind), str(Path(tmp) / f"{kind}.store"), "--size", "8",
                            "--channels", "gray", "--val-fraction", "0.25"], check=True, capture_output=True, cwd=ROOT)
        for seed in seeds:
            acc = {}
            for kind in ("float32", "uint16"):
                run = Path(tmp) / f"{kind}.{seed}"
                subprocess.run([*cli, "train", "--workdir", str(run), "--set", f"seed={seed}", "--set",
                                "data.source=store", "--set", f"data.path={Path(tmp) / f'{kind}.store'}", "--set",
                                f"train.epochs={epochs}", "--set", "augment.flip=false", "--set", "model=simple_cnn"],
                               check=True, capture_output=True, cwd=ROOT)
                acc[kind] = json.loads((run / "summary.json").read_text())["val_accuracy"]
            print(f"digits 0-3 ({len(keep)} real scans, 8x8), seed {seed}, {epochs} epochs: val accuracy float32 "
                  f"{acc['float32']:.4f}, uint16 rescaled by hand {acc['uint16']:.4f}, difference "
                  f"{acc['float32'] - acc['uint16']:+.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["prepare", "step", "preprocess", "accuracy"])
    args = ap.parse_args()
    for name, fn in (("prepare", bench_prepare), ("step", bench_step), ("preprocess", bench_preprocess),
                     ("accuracy", bench_accuracy)):
        if args.only in (None, name):
            fn()


if __name__ == "__main__":
    main()
