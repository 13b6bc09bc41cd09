"""A seeded mutation fuzzer over `read_image`: only `DecodeError` naming the file may come out.

Seeds are small valid files of every container; mutations are bit flips,
truncation, and header fields (sizes, chunk lengths, counts) set to 0 or huge.
Deterministic (fixed seeds), a few hundred cases in a few seconds.
"""

from __future__ import annotations

import io
import struct

import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import Image

from cnnpipe import DecodeError, read_image

CASES_PER_SEED = 100  # 9 seeds: 900 mutated files, 1,350 decodes, about 1 s


def _seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    out = {}
    for fmt, kw in (("PNG", {}), ("JPEG", {"quality": 90}), ("BMP", {}), ("GIF", {}), ("WEBP", {"lossless": True}),
                    ("TIFF", {"compression": "tiff_lzw"})):
        buf = io.BytesIO()
        im = Image.fromarray(rgb)
        if fmt == "JPEG":
            exif = Image.Exif()
            exif[0x0112] = 6
            kw = {**kw, "exif": exif}
        im.save(buf, fmt, **kw)
        out[fmt.lower()] = buf.getvalue()
    out["png16"] = imagecodecs.png_encode(rng.integers(0, 65536, (9, 11, 4), dtype=np.uint16))
    buf = io.BytesIO()
    tifffile.imwrite(buf, rng.integers(0, 65536, (9, 11, 3), dtype=np.uint16), photometric="rgb",
                     compression="zlib")
    out["tiff16"] = buf.getvalue()
    buf = io.BytesIO()
    tifffile.imwrite(buf, rng.integers(0, 4, (9, 11), dtype=np.uint8), photometric="palette",
                     colormap=np.tile(np.arange(256, dtype=np.uint16) * 257, (3, 1)))
    out["tiff_palette"] = buf.getvalue()
    return out


SEEDS = _seeds()
FIELD_VALUES = (0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF)


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One seeded mutation of `data`."""
    buf = bytearray(data)
    kind = int(rng.integers(0, 4))
    if kind == 0:  # flip 1-8 bits anywhere
        for _ in range(int(rng.integers(1, 9))):
            pos = int(rng.integers(0, len(buf)))
            buf[pos] ^= 1 << int(rng.integers(0, 8))
    elif kind == 1:  # truncate
        del buf[int(rng.integers(0, len(buf))):]
    elif kind == 2:  # a 2- or 4-byte field in the header region (sizes, lengths, counts, offsets) -> 0 or huge
        width = 4 if rng.integers(0, 2) else 2
        pos = int(rng.integers(0, max(1, min(len(buf), 96) - width)))
        value = int(rng.choice(FIELD_VALUES)) & ((1 << (8 * width)) - 1)
        for order in ("<", ">")[int(rng.integers(0, 2)):][:1]:
            struct.pack_into(order + ("I" if width == 4 else "H"), buf, pos, value)
    else:  # duplicate or delete a random slice (misaligned chunks and segments)
        a = int(rng.integers(0, len(buf)))
        b = min(len(buf), a + int(rng.integers(1, 64)))
        buf[a:a] = buf[a:b] if rng.integers(0, 2) else b""
        if not rng.integers(0, 2):
            del buf[a:b]
    return bytes(buf)


@pytest.mark.parametrize("seed_name", sorted(SEEDS))
def test_mutated_files_decode_or_raise_decode_error_naming_the_file(seed_name):
    rng = np.random.default_rng(sorted(SEEDS).index(seed_name))
    outcomes = {"decoded": 0, "decode_error": 0}
    for i in range(CASES_PER_SEED):
        data = mutate(SEEDS[seed_name], rng)
        name = f"fuzz/{seed_name}-{i}.bin"
        for channels in ("rgb", "native") if i % 2 else ("gray",):
            try:
                planes = read_image(data, channels=channels, alpha="composite" if i % 3 == 0 else "drop",
                                    source=name, max_pixels=4_000_000)
            except DecodeError as exc:
                assert str(exc).startswith(name + ": ") and "\n" not in str(exc), str(exc)
                outcomes["decode_error"] += 1
                continue
            except Exception as exc:  # noqa: BLE001 - the point of the test
                pytest.fail(f"case {name} ({channels}): {type(exc).__name__}: {exc}")
            assert planes.data.dtype in (np.uint8, np.uint16) and planes.data.ndim == 3
            assert planes.data.shape[0] == len(planes.channels)
            outcomes["decoded"] += 1
    # a fuzzer that only ever hits one outcome is not exploring
    assert outcomes["decode_error"] > 0, outcomes
