"""Fingerprint of everything `convert_file` returns over a messy folder and PngSuite, for many specs.

A speed change to the image path must leave every fingerprint identical:
  python benchmarks/pixel_hashes.py OUT.json            # write
  python benchmarks/pixel_hashes.py OUT.json --check    # compare with a saved run
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

from cnnpipe.datasets.convert import Failure, NeedsDtype, convert_file
from cnnpipe.images.transform import ImageSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from messy_folder import make_messy_folder  # noqa: E402

PNGSUITE = Path("/work/shared/conformance/pngsuite")


def specs() -> list[ImageSpec]:
    out = []
    for size in ((64, 64), (37, 50), (1, 1), (130, 90)):
        for mode in ("crop", "pad", "stretch"):
            for channels, planes in (("rgb", None), ("gray", None), ("native", 1), ("native", 2), ("native", 3),
                                   ("native", 4)):
                for depth, dtype in ((8, None), (16, None), (32, "float32"), (16, "int16")):
                    if size != (64, 64) and (channels, planes) in (("native", 4), ("gray", None)) and depth != 16:
                        continue
                    out.append(ImageSpec(size, mode, channels, depth, planes, dtype=dtype))
    return out


def fingerprint(res) -> str:
    if isinstance(res, Failure):
        return f"F {res.kind} {res.message}"
    if isinstance(res, NeedsDtype):
        return f"N {res.dtype} {res.message}"
    px = res.pixels
    h = hashlib.sha256(px.tobytes()).hexdigest()[:24]
    return (f"P {px.dtype} {px.shape} {px.flags.c_contiguous} {h} {res.sums} {res.sumsq} {res.counts} {res.digest} "
            f"{res.warnings} {res.decoded_bit_depth} {res.decoded_dtype} {res.nodata}")


def scientific(root: Path, seed: int = 0) -> list[str]:
    """Signed, 32-bit and float TIFFs (1-3 planes, 1x1 to 700x900): NaN, Inf, nodata, sparse files, overshoot."""
    import numpy as np
    import tifffile

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(48):
        h, w = (int(rng.integers(200, 701)), int(rng.integers(200, 901))) if i % 6 == 5 else \
            (int(rng.integers(1, 130)), int(rng.integers(1, 130)))
        c = (1, 2, 3)[i % 3]
        dtype = ("float32", "float64", "int16", "int8", "uint32", "int32", "float16", "float32")[i % 8]
        a = rng.normal(0, 1000 if dtype != "int8" else 40, (h, w, c))
        if not dtype.startswith("float"):
            a = np.clip(a, np.iinfo(dtype).min, np.iinfo(dtype).max)
        a = a.astype(dtype)
        nodata = None
        if dtype.startswith("float") and i % 4 in (0, 1):
            a[rng.random((h, w)) < (0.97 if i % 16 == 0 else 0.2)] = np.nan
            a.reshape(-1)[:: max(1, a.size // 3)] = np.inf
        if i % 5 == 2:
            nodata = float(a.reshape(-1)[0]) if np.isfinite(a.reshape(-1)[0]) else -9999.0
        tags = [(42113, "s", 0, f"{nodata:g}", True)] if nodata is not None else []
        path = root / f"sci_{i:02d}_{dtype}_{h}x{w}x{c}.tif"
        tifffile.imwrite(path, a[..., 0] if c == 1 else a, photometric="minisblack", planarconfig="contig",
                         extratags=tags)
        out.append(str(path))
    return out


def files(tmp: Path) -> list[str]:
    out = scientific(tmp / "sci")
    for seed, per_class in ((0, 40), (1, 40)):
        m = make_messy_folder(tmp / f"m{seed}", per_class=per_class, classes=3, big_every=12, seed=seed)
        out += [str(m.root / p) for p in m.valid + m.bad]
    out += sorted(str(p) for p in PNGSUITE.glob("*.png"))
    return out


def main() -> None:
    target, check = sys.argv[1], "--check" in sys.argv
    result: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = files(Path(tmp))
        for spec in specs():
            key = f"{spec.size} {spec.resize} {spec.channels} {spec.planes} {spec.bit_depth} {spec.dtype}"
            for p in paths:
                name = p.replace(tmp, "<tmp>")
                res = convert_file(p, True, spec)
                result[f"{key} | {name}"] = fingerprint(res).replace(tmp, "<tmp>")
    if not check:
        Path(target).write_text(json.dumps(result, indent=0, sort_keys=True))
        print(f"wrote {len(result)} fingerprints")
        return
    saved = json.loads(Path(target).read_text())
    bad = [k for k in saved if saved[k] != result.get(k)] + [k for k in result if k not in saved]
    for k in bad[:20]:
        print("DIFF", k, "\n  saved:", saved.get(k), "\n  now:  ", result.get(k))
    print(f"{len(result)} fingerprints, {len(bad)} differ")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
