"""Decode bugs found with independent decoders and hand-made files: orientation, low-depth TIFF,
inconsistent headers, broken metadata, memory bounds, codec warnings."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import tracemalloc
import zlib

import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from cnnpipe import DecodeError, read_image
from cnnpipe.images.decode import DEFAULT_MAX_PIXELS

RNG = np.random.default_rng(7)


def tiff(arr: np.ndarray, orientation: int | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    extratags = list(kw.pop("extratags", [])) + ([(274, "H", 1, orientation, True)] if orientation else [])
    tifffile.imwrite(buf, arr, extratags=extratags, **kw)
    return buf.getvalue()


def set_tiff_tag(data: bytes, tag: int, value: int) -> bytes:
    """Rewrite a SHORT tag's value in the first IFD of a little-endian classic TIFF (a hand-made file)."""
    out = bytearray(data)
    assert out[:4] == b"II*\x00"
    ifd = struct.unpack_from("<I", out, 4)[0]
    for i in range(struct.unpack_from("<H", out, ifd)[0]):
        pos = ifd + 2 + 12 * i
        if struct.unpack_from("<H", out, pos)[0] == tag:
            struct.pack_into("<HHIHH", out, pos, tag, 3, 1, value, 0)
            return bytes(out)
    raise AssertionError(f"tag {tag} not found")


def pillow_oriented(stored: np.ndarray, orientation: int) -> np.ndarray:
    """The reference: Pillow's own exif_transpose of the stored pixels."""
    im = Image.fromarray(np.ascontiguousarray(stored))
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "PNG", exif=exif)
    with Image.open(buf) as ref:
        return np.asarray(ImageOps.exif_transpose(ref))


PILLOW_TIFFS = {
    "bilevel": (RNG.integers(0, 2, (5, 7)).astype(bool), {"photometric": "minisblack"}),
    "palette": (RNG.integers(0, 4, (5, 7), dtype=np.uint8),
                {"photometric": "palette", "colormap": np.tile(np.arange(256, dtype=np.uint16) * 257, (3, 1))}),
    "palette4": (RNG.integers(0, 16, (5, 7), dtype=np.uint8),
                 {"photometric": "palette", "bitspersample": 4,
                  "colormap": np.stack([np.arange(256, dtype=np.uint16) % 16 * 257 * k for k in (3, 5, 7)])}),
    "gray2": (RNG.integers(0, 4, (5, 7), dtype=np.uint8), {"photometric": "minisblack", "bitspersample": 2}),
    "gray4": (RNG.integers(0, 16, (5, 7), dtype=np.uint8), {"photometric": "minisblack", "bitspersample": 4}),
    "cmyk": (RNG.integers(0, 256, (5, 7, 4), dtype=np.uint8), {"photometric": "separated"}),
    "ycbcr": (RNG.integers(0, 256, (8, 16, 3), dtype=np.uint8),
              {"photometric": "ycbcr", "compression": "jpeg", "subsampling": (1, 1)}),
}


@pytest.mark.parametrize("kind", sorted(PILLOW_TIFFS))
@pytest.mark.parametrize("orientation", range(1, 9))
def test_tiff_decoded_by_pillow_is_oriented_once(kind, orientation):
    """Pillow 13 applies a TIFF's orientation on load; cnnpipe must not apply it a second time."""
    arr, kw = PILLOW_TIFFS[kind]
    stored = read_image(tiff(arr, None, **kw)).hwc()
    data = tiff(arr, orientation, **kw)
    np.testing.assert_array_equal(read_image(data).hwc(), pillow_oriented(stored, orientation))
    np.testing.assert_array_equal(read_image(data, exif_orientation=False).hwc(), stored)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_low_depth_gray_tiff_scales_by_bit_replication(bits):
    """1/2/4-bit gray is scaled to 0..255 exactly as the README promises: v * 255 / (2**bits - 1)."""
    raw = RNG.integers(0, 2**bits, (6, 9), dtype=np.uint8)
    arr = raw.astype(bool) if bits == 1 else raw
    kw = {} if bits == 1 else {"bitspersample": bits}
    planes = read_image(tiff(arr, photometric="minisblack", **kw), channels="native")
    assert planes.channels == ("L",) and planes.bit_depth == 8
    np.testing.assert_array_equal(planes.plane("L"), raw.astype(np.uint16) * 255 // (2**bits - 1))


def test_4bit_palette_tiff_expands_through_its_colormap():
    idx = RNG.integers(0, 16, (5, 7), dtype=np.uint8)
    cmap = np.stack([np.arange(256, dtype=np.uint16) % 16 * 257 * k for k in (3, 5, 7)])  # 8-bit value v*k
    planes = read_image(tiff(idx, photometric="palette", bitspersample=4, colormap=cmap))
    for i, k in enumerate((3, 5, 7)):
        np.testing.assert_array_equal(planes.data[i], idx.astype(np.uint16) * k)


def test_tiff_claiming_rgb_with_one_sample_is_a_decode_error():
    """Photometric RGB with one sample per pixel gave one plane named R, G, B (and IndexError for gray)."""
    data = set_tiff_tag(tiff(RNG.integers(0, 256, (5, 7), dtype=np.uint8), photometric="minisblack"), 262, 2)
    for channels in ("rgb", "gray", "native"):
        with pytest.raises(DecodeError, match="photometric RGB with 1 sample"):
            read_image(data, channels=channels)


def _jpeg_with_orientation_entry(value: bytes, type_: int, count: int) -> bytes:
    """A JPEG whose EXIF orientation entry has the given TIFF type and raw 4-byte value field."""
    ifd = struct.pack("<H", 1) + struct.pack("<HHI", 0x0112, type_, count) + value.ljust(4, b"\0") + b"\0\0\0\0"
    exif = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("value, type_, count", [(b"6", 2, 2), (b"ab", 7, 2), (b"\x09\x00", 3, 1),
                                                 (b"\x00\x00", 3, 1)])
def test_bad_orientation_entry_keeps_pixels_and_warns(value, type_, count):
    """Text, bytes or an out-of-range number: the pixels come out as stored, with a warning."""
    data = _jpeg_with_orientation_entry(value, type_, count)
    planes = read_image(data)
    np.testing.assert_array_equal(planes.hwc(), read_image(data, exif_orientation=False).hwc())
    assert planes.data.shape == (3, 6, 10)
    assert any("orientation" in w for w in planes.warnings)


def test_bad_orientation_in_tiff_and_png():
    arr = RNG.integers(0, 65536, (4, 6, 3), dtype=np.uint16)
    data = tiff(arr, photometric="rgb", extratags=[(274, "s", 0, "six", True)])
    planes = read_image(data)
    np.testing.assert_array_equal(planes.hwc(), arr)
    assert any("orientation" in w for w in planes.warnings)


def test_xmp_only_orientation_is_ignored_for_every_format():
    """Only EXIF/TIFF tags count: an XMP tiff:Orientation alone changes nothing (Pillow alone would apply it)."""
    arr = RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, xmp=xmp)
    assert read_image(buf.getvalue()).data.shape == (3, 6, 10)
    cmyk = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(cmyk, "JPEG", quality=95, xmp=xmp)  # Pillow's own path
    assert read_image(cmyk.getvalue()).data.shape == (3, 6, 10)
    pal = RNG.integers(0, 4, (6, 10), dtype=np.uint8)
    data = tiff(pal, photometric="palette", colormap=np.tile(np.arange(256, dtype=np.uint16) * 257, (3, 1)),
                extratags=[(700, "B", len(xmp), xmp, True)])
    assert read_image(data).data.shape == (3, 6, 10)


def _peak_mib(fn) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_composite_and_luma_memory_stay_near_the_output_size():
    """A 16-bit RGBA image: composite and luma work in uint32 row blocks, not float64/uint64 copies.

    Output of composite is (H, W, 3) uint16 = 6 bytes/pixel; the decoded RGBA buffer is 8 bytes/pixel.
    Before: ~56 bytes/pixel of uint64 temporaries on top. Bound: decoded + 3x output.
    """
    h, w = 1500, 1000
    rgba = RNG.integers(0, 65536, (h, w, 4), dtype=np.uint16)
    data = imagecodecs.png_encode(rgba, level=1)
    out_mib = h * w * 6 / 2**20
    decoded_mib = h * w * 8 / 2**20
    peak = _peak_mib(lambda: read_image(data, alpha="composite", background=1.0))
    assert peak < decoded_mib + 3 * out_mib, peak
    peak = _peak_mib(lambda: read_image(data, channels="gray", alpha="composite"))
    assert peak < decoded_mib + 3 * out_mib, peak


def test_composite_and_luma_exact_at_the_extremes():
    """uint32 cannot overflow: full-scale colour, alpha and background give full scale."""
    rgba = np.array([[[65535, 65535, 65535, 65535], [65535, 0, 1, 0], [1, 2, 3, 32768]]], np.uint16)
    data = imagecodecs.png_encode(rgba)
    out = read_image(data, alpha="composite", background=1.0).hwc().astype(np.int64)
    c, a = rgba[..., :3].astype(np.int64), rgba[..., 3:].astype(np.int64)
    np.testing.assert_array_equal(out, (c * a + 65535 * (65535 - a) + 32767) // 65535)
    luma = read_image(data, channels="gray").hwc()[..., 0].astype(np.int64)
    np.testing.assert_array_equal(luma, (c[..., 0] * 19595 + c[..., 1] * 38470 + c[..., 2] * 7471 + 32768) >> 16)


def test_associated_alpha_composites_as_premultiplied():
    premul = np.array([[[100, 50, 0, 200], [0, 0, 0, 0]]], np.uint8)  # colour already x alpha
    data = tiff(premul, photometric="rgb", extrasamples=[1])
    out = read_image(data, alpha="composite", background=1.0).hwc().astype(np.int64)
    np.testing.assert_array_equal(out[0, 0], [100 + (255 * 55 + 127) // 255] * 1 + [50 + 55, 0 + 55])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    np.testing.assert_array_equal(read_image(data).hwc(), premul[..., :3])  # drop: as stored


def test_pixel_limit_bounds_samples_per_pixel():
    """A TIFF under the pixel limit but with many samples per pixel is refused from its header."""
    arr = np.zeros((10, 10, 12), np.uint8)
    data = tiff(arr, photometric="minisblack", planarconfig="contig")
    with pytest.raises(DecodeError, match="12 samples per pixel, over the limit of 400 samples"):
        read_image(data, max_pixels=100)
    assert read_image(data, channels="native", max_pixels=300).data.shape == (12, 10, 10)


def test_jpeg_claiming_a_huge_size_is_cheap_under_the_limit():
    """A tiny JPEG claiming ~89 M pixels: luma in uint32 row blocks, about the output's size."""
    buf = io.BytesIO()
    Image.new("RGB", (4000, 4000), (200, 100, 50)).save(buf, "JPEG", quality=50)
    peak = _peak_mib(lambda: read_image(buf.getvalue(), channels="gray"))
    out_mib = 4000 * 4000 / 2**20
    assert peak < 3 * out_mib + 4000 * 4000 * 3 / 2**20, peak  # decoded RGB + about 3x the luma output
    assert DEFAULT_MAX_PIXELS == 89_478_485


def _png_with_bad_text_crc() -> bytes:
    buf = io.BytesIO()
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("k", "v")
    Image.fromarray(RNG.integers(0, 256, (5, 6, 3), dtype=np.uint8)).save(buf, "PNG", pnginfo=info)
    data = bytearray(buf.getvalue())
    i = data.find(b"tEXt")
    data[i + 4] ^= 0xFF  # the text changes, its CRC does not
    return bytes(data)


def test_codec_warnings_are_captured_not_printed(tmp_path):
    path = tmp_path / "crc.png"
    path.write_bytes(_png_with_bad_text_crc())
    planes = read_image(path)
    assert planes.data.shape == (3, 5, 6)
    assert any("CRC" in w for w in planes.warnings), planes.warnings
    # nothing reaches the process's real stderr (libpng writes to fd 2 directly)
    code = f"from cnnpipe import read_image; p = read_image({str(path)!r}); print(len(p.warnings))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stderr == "" and res.stdout.strip() != "0"


def test_png_with_zero_size_and_bad_zlib_is_a_decode_error():
    ihdr = struct.pack(">IIBBBBB", 0, 5, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")
    with pytest.raises(DecodeError, match="invalid image size 0x5"):
        read_image(data)


def test_only_the_codecs_warnings_are_the_images_and_others_are_issued_again():
    import warnings

    from cnnpipe.images.formats import codec_messages

    with pytest.warns(Warning) as seen, codec_messages() as notes:
        warnings.warn("not about the image (another thread's, say)")
        warnings.warn_explicit("unclosed file <x.png>", ResourceWarning, "/site-packages/PIL/Image.py", 1)
        warnings.warn_explicit("Corrupt EXIF data", UserWarning, "/site-packages/PIL/TiffImagePlugin.py", 9)
    assert notes == ["Corrupt EXIF data"]   # raised in a codec package: the image's
    assert sorted(str(w.message) for w in seen) == ["not about the image (another thread's, say)",
                                                     "unclosed file <x.png>"]   # issued again, not swallowed
