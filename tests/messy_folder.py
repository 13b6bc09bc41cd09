"""A folder shaped like users' data: random sizes from 1x1 to photo size in every container and bit
depth, with broken files mixed in. Used by the tests and by benchmarks/bench_preprocess.py."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from PIL import Image

KINDS = ("jpeg_exif", "jpeg_gray", "png_gray", "png_rgb", "png_palette", "png_rgba", "png16_gray", "png16_rgb",
         "tiff8_lzw", "tiff16_deflate", "tiff16_none", "tiff_gray16", "bmp", "webp", "webp_lossless", "gif")
BAD = ("empty", "truncated_png", "truncated_jpeg", "html_as_jpg", "garbage", "rgb_tiff_one_sample")


@dataclass
class MessyFolder:
    root: Path
    valid: list[str] = field(default_factory=list)  # paths relative to root
    bad: list[str] = field(default_factory=list)


def _photo(h: int, w: int, c: int, dtype, rng: np.random.Generator) -> np.ndarray:
    """Smooth gradients plus noise, so lossy codecs and resizing behave as on photographs."""
    y, x = np.mgrid[0:h, 0:w]
    top = np.iinfo(dtype).max
    planes = [(np.sin(x / (3 + 7 * k) + k) + np.cos(y / (4 + 5 * k))) / 4 + 0.5 for k in range(c)]
    a = np.stack(planes, -1) + rng.normal(0, 0.04, (h, w, c))
    return np.clip(a * top, 0, top).astype(dtype)


def _size(rng: np.random.Generator, big: bool) -> tuple[int, int]:
    if big:
        return int(rng.integers(300, 701)), int(rng.integers(300, 901))
    return int(rng.integers(1, 120)), int(rng.integers(1, 120))


def encode(kind: str, h: int, w: int, rng: np.random.Generator) -> tuple[bytes, str]:
    """(file bytes, extension) of one valid image of `kind` at h x w."""
    buf = io.BytesIO()
    if kind == "jpeg_exif":
        exif = Image.Exif()
        exif[0x0112] = int(rng.integers(1, 9))
        Image.fromarray(_photo(h, w, 3, np.uint8, rng)).save(buf, "JPEG", quality=90, exif=exif)
        return buf.getvalue(), ".jpg"
    if kind == "jpeg_gray":
        Image.fromarray(_photo(h, w, 1, np.uint8, rng)[..., 0]).save(buf, "JPEG", quality=85)
        return buf.getvalue(), ".jpeg"
    if kind.startswith("png16"):
        c = 1 if kind.endswith("gray") else 3
        arr = _photo(h, w, c, np.uint16, rng)
        return imagecodecs.png_encode(arr[..., 0] if c == 1 else arr), ".png"
    if kind.startswith("png"):
        arr = _photo(h, w, 4, np.uint8, rng)
        im = {"png_gray": lambda: Image.fromarray(arr[..., 0]), "png_rgb": lambda: Image.fromarray(arr[..., :3]),
              "png_rgba": lambda: Image.fromarray(arr, "RGBA"),
              "png_palette": lambda: Image.fromarray(arr[..., :3]).quantize(16)}[kind]()
        im.save(buf, "PNG")
        return buf.getvalue(), ".png"
    if kind.startswith("tiff"):
        dtype = np.uint8 if kind.startswith("tiff8") else np.uint16
        c = 1 if "gray" in kind else 3
        comp = {"lzw": "lzw", "deflate": "zlib"}.get(kind.rsplit("_", 1)[1])
        arr = _photo(h, w, c, dtype, rng)
        tifffile.imwrite(buf, arr[..., 0] if c == 1 else arr, photometric="minisblack" if c == 1 else "rgb",
                         compression=comp)
        return buf.getvalue(), ".tif"
    im = Image.fromarray(_photo(h, w, 3, np.uint8, rng))
    fmt, ext, kw = {"bmp": ("BMP", ".bmp", {}), "webp": ("WEBP", ".webp", {"quality": 80}),
                    "webp_lossless": ("WEBP", ".webp", {"lossless": True}), "gif": ("GIF", ".gif", {})}[kind]
    im.save(buf, fmt, **kw)
    return buf.getvalue(), ext


def broken(kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """(file bytes, extension) of one file that must be skipped and reported."""
    if kind == "empty":
        return b"", ".png"
    if kind == "truncated_png":
        data, _ = encode("png_rgb", 40, 50, rng)
        return data[: len(data) // 2], ".png"
    if kind == "truncated_jpeg":
        data, _ = encode("jpeg_exif", 60, 80, rng)
        return data[: len(data) // 2], ".jpg"
    if kind == "html_as_jpg":
        return b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n", ".jpg"
    if kind == "rgb_tiff_one_sample":
        buf = io.BytesIO()
        tifffile.imwrite(buf, _photo(9, 11, 1, np.uint8, rng)[..., 0], photometric="minisblack")
        return _set_photometric_rgb(buf.getvalue()), ".tif"
    return rng.integers(0, 256, int(rng.integers(1, 300)), dtype=np.uint8).tobytes(), ".png"


def _set_photometric_rgb(data: bytes) -> bytes:
    out = bytearray(data)
    ifd = int.from_bytes(out[4:8], "little")
    for i in range(int.from_bytes(out[ifd:ifd + 2], "little")):
        pos = ifd + 2 + 12 * i
        if int.from_bytes(out[pos:pos + 2], "little") == 262:
            out[pos + 8:pos + 10] = (2).to_bytes(2, "little")
    return bytes(out)


def make_messy_folder(root: Path, per_class: int = 24, classes: int = 3, big_every: int = 12,
                      seed: int = 0) -> MessyFolder:
    """root/<class>/<files>: `per_class` valid images per class cycling through every kind, one in
    `big_every` at photo size (300-700 x 300-900), the rest 1x1 to 119x119; plus every broken kind."""
    rng = np.random.default_rng(seed)
    out = MessyFolder(Path(root))
    for ci in range(classes):
        d = out.root / f"class_{ci}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            kind = KINDS[(i + ci * 5) % len(KINDS)]
            h, w = _size(rng, big=i % big_every == big_every - 1)
            data, ext = encode(kind, h, w, rng)
            name = f"{kind}_{i:03d}_{h}x{w}{ext}"
            (d / name).write_bytes(data)
            out.valid.append(f"class_{ci}/{name}")
    for j, kind in enumerate(BAD):
        data, ext = broken(kind, rng)
        name = f"class_{j % classes}/bad_{kind}{ext}"
        (out.root / name).write_bytes(data)
        out.bad.append(name)
    return out
