"""Peak memory of alpha compositing and luma on a large 16-bit RGBA image, as a multiple of the output.

Each case runs in a fresh process under tracemalloc (numpy reports its
allocations to it), so the figures do not depend on what ran before; the
peak includes the decoded RGBA buffer, and "beyond decode" subtracts it. The output of compositing is (H, W, 3)
uint16; of luma (H, W, 1). The decoded RGBA buffer itself is 8 bytes/pixel.

Run:  .venv/bin/python benchmarks/bench_decode_memory.py [--size 4000x3000]
Compare with another checkout:  PYTHONPATH=/path/to/other/checkout python benchmarks/bench_decode_memory.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import json, sys, tracemalloc
import cnnpipe
from cnnpipe import read_image
data = open(sys.argv[1], "rb").read()
kw = json.loads(sys.argv[2])
tracemalloc.start()
planes = read_image(data, **kw)
traced = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
print(json.dumps({"traced_mib": traced / 2**20, "out_mib": planes.data.nbytes / 2**20,
                  "cnnpipe": cnnpipe.__file__}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="4000x3000", help="W x H of the RGBA image (default 4000x3000, 12 Mpixel)")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    import imagecodecs
    import numpy as np

    rng = np.random.default_rng(0)
    y = np.linspace(0, 65535, h, dtype=np.float32)[:, None]
    rgba = np.empty((h, w, 4), np.uint16)
    for c in range(4):  # smooth, so the PNG stays small like a real photo with a soft matte
        rgba[..., c] = (y * (c + 1) / 4 + rng.integers(0, 64, (1, w))).astype(np.uint16)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rgba16.png"
        path.write_bytes(imagecodecs.png_encode(rgba, level=1))
        size_mb = path.stat().st_size / 1e6
        decoded = w * h * 8 / 2**20
        print(f"{w}x{h} 16-bit RGBA PNG ({size_mb:.1f} MB); decoded RGBA {decoded:.0f} MiB")
        for name, kw in (("composite", {"alpha": "composite", "background": 1.0}),
                         ("gray (luma)", {"channels": "gray"}),
                         ("composite + gray", {"alpha": "composite", "channels": "gray"})):
            res = subprocess.run([sys.executable, "-c", _CHILD, str(path), json.dumps(kw)], capture_output=True,
                                 text=True)
            if res.returncode != 0:
                print(f"{name:<17} failed: {res.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(res.stdout)
            beyond = r["traced_mib"] - decoded
            print(f"{name:<17} peak {r['traced_mib']:6.0f} MiB, beyond decode {beyond:6.0f} MiB = "
                  f"{beyond / r['out_mib']:4.1f}x the output ({r['out_mib']:.0f} MiB)  [{r['cnnpipe']}]")


if __name__ == "__main__":
    main()
