"""Decode throughput: cnnpipe.read_image vs Pillow on the same bytes, same process.

For each case (8-bit PNG, 8-bit JPEG, 16-bit PNG, 16-bit TIFF; 512^2 and 2048^2)
both decoders run in alternating timed blocks over the same in-memory bytes and
the median images/s of each is reported with their ratio. Pillow's number is
its natural read, ``np.asarray(Image.open(f))``, which for 16-bit RGB files
silently returns only the high byte: the target is that cnnpipe's *exact*
16-bit path is at least as fast as that lossy read, and 8-bit at least 1.0x.

Run:  .venv/bin/python benchmarks/bench_decode.py [--rounds N] [--sizes 512 2048]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import tifffile
from PIL import Image

from cnnpipe import read_image


def photo(h: int, w: int, dtype: type, seed: int = 0) -> np.ndarray:
    """Photo-like content: smooth structure plus sensor noise (compresses like real images)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = (np.sin(x / 37.0) * np.cos(y / 23.0) + np.sin((x + y) / 91.0) + 2) / 4
    a = np.stack([base, base ** 1.5, 1 - base], -1) + rng.normal(0, 0.01, (h, w, 3)).astype(np.float32)
    top = np.iinfo(dtype).max
    return np.clip(a * top, 0, top).astype(dtype)


def encode_cases(size: int) -> dict[str, bytes]:
    a8, a16 = photo(size, size, np.uint8), photo(size, size, np.uint16)
    cases = {}
    buf = io.BytesIO(); Image.fromarray(a8).save(buf, "PNG"); cases["png8"] = buf.getvalue()
    buf = io.BytesIO(); Image.fromarray(a8).save(buf, "JPEG", quality=90); cases["jpeg8"] = buf.getvalue()
    import imagecodecs
    cases["png16"] = imagecodecs.png_encode(a16, level=6)
    buf = io.BytesIO(); tifffile.imwrite(buf, a16, photometric="rgb", compression="zlib"); cases["tiff16"] = buf.getvalue()
    return cases


def pillow_read(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def cnnpipe_read(data: bytes) -> np.ndarray:
    return read_image(data).data


def time_block(fn, data: bytes, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn(data)
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="alternating timed blocks per decoder")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    args = p.parse_args()
    print(f"{'case':<8} {'size':>5} {'pillow img/s':>13} {'cnnpipe img/s':>14} {'ratio':>6}  note")
    ratios = []
    for size in args.sizes:
        for name, data in encode_cases(size).items():
            check = pillow_read(data)
            exact = cnnpipe_read(data)
            note = "pillow 8-bit (lossy)" if name.endswith("16") and check.dtype == np.uint8 else ""
            assert exact.dtype == (np.uint16 if name.endswith("16") else np.uint8)
            per_block = max(1, int(0.25 / _once(pillow_read, data)))
            for fn in (pillow_read, cnnpipe_read):  # warm-up
                time_block(fn, data, 1)
            pil, ours = [], []
            for _ in range(args.rounds):
                pil.append(time_block(pillow_read, data, per_block))
                ours.append(time_block(cnnpipe_read, data, per_block))
            mp, mo = statistics.median(pil), statistics.median(ours)
            ratios.append(mo / mp)
            print(f"{name:<8} {size:>5} {mp:>13.1f} {mo:>14.1f} {mo / mp:>5.2f}x  {note}")
    print(f"geometric mean ratio: {float(np.exp(np.mean(np.log(ratios)))):.2f}x (>1 = cnnpipe faster)")


def _once(fn, data: bytes) -> float:
    t0 = time.perf_counter()
    fn(data)
    return max(time.perf_counter() - t0, 1e-5)


if __name__ == "__main__":
    main()
