"""Decode stage: exactness against independent codecs, every policy, every bad input."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import png  # pypng: an independent pure-Python PNG codec
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image, ImageFile, ImageOps

from cnnpipe import DecodeError, Planes, read_image
from cnnpipe.cli import main
from cnnpipe.images.decode import DEFAULT_MAX_PIXELS, convert_planes, sniff_format

PNGSUITE = Path(os.environ.get("CNNPIPE_PNGSUITE", Path(__file__).resolve().parents[2] / "shared/conformance/pngsuite"))


# ----------------------------------------------------------------- helpers

def pypng_bytes(arr: np.ndarray, *, bitdepth: int, interlace: bool = False, **kw) -> bytes:
    """Encode (H, W) or (H, W, C) with pypng (not libpng, not Pillow)."""
    h, w = arr.shape[:2]
    c = 1 if arr.ndim == 2 else arr.shape[2]
    writer = png.Writer(w, h, greyscale=c in (1, 2), alpha=c in (2, 4), bitdepth=bitdepth, interlace=interlace, **kw)
    buf = io.BytesIO()
    writer.write(buf, arr.reshape(h, w * c).tolist())
    return buf.getvalue()


def pypng_decode(data: bytes) -> np.ndarray:
    """(H, W, C) reference pixels from pypng, palette and tRNS expanded, no rescaling."""
    w, h, rows, info = png.Reader(bytes=data).asDirect()
    c = info["planes"]
    dtype = np.uint16 if info["bitdepth"] > 8 else np.uint8
    return np.array([np.asarray(r) for r in rows], dtype=dtype).reshape(h, w, c)


def tiff_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def pil_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def smooth(h: int, w: int, c: int, dtype, seed: int = 0) -> np.ndarray:
    """A photo-like image (smooth gradients + noise) so lossy codecs behave realistically."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = (np.sin(x / 7.0) + np.cos(y / 5.0) + 2) / 4
    a = np.stack([base * (i + 1) / c for i in range(c)], -1) + rng.normal(0, 0.03, (h, w, c))
    top = np.iinfo(dtype).max
    return np.clip(a * top, 0, top).astype(dtype)


# ----------------------------------------------------------------- PngSuite conformance

def _suite_files() -> list[Path]:
    return sorted(PNGSUITE.glob("*.png")) if PNGSUITE.is_dir() else []


@pytest.mark.skipif(not PNGSUITE.is_dir(), reason=f"PngSuite not found at {PNGSUITE} (set CNNPIPE_PNGSUITE); "
                                                   "generated cases below still cover every colour type and depth")
@pytest.mark.parametrize("path", _suite_files(), ids=lambda p: p.name)
def test_pngsuite(path: Path) -> None:
    data = path.read_bytes()
    planes = read_image(path, channels="native", alpha="keep")
    ref = pypng_decode(data)
    depth = png.Reader(bytes=data).asDirect()[3]["bitdepth"]
    assert planes.bit_depth == (16 if depth == 16 else 8)
    assert planes.data.dtype == (np.uint16 if depth == 16 else np.uint8)
    if depth < 8:  # gray 1/2/4-bit scales to 8 bits by replication (PNG spec 13.12)
        ref = (ref.astype(np.uint16) * (255 // ((1 << depth) - 1))).astype(np.uint8)
    # every value, alpha from tRNS included, equals the independent decoder's
    np.testing.assert_array_equal(planes.hwc(), ref)
    if depth <= 8:
        # the default R, G, B planes equal Pillow's RGB conversion
        with Image.open(path) as im:
            np.testing.assert_array_equal(read_image(path).hwc(), np.asarray(im.convert("RGB")))


@pytest.mark.skipif(not PNGSUITE.is_dir(), reason=f"PngSuite not found at {PNGSUITE}")
def test_pngsuite_interlaced_equals_plain() -> None:
    for plain in PNGSUITE.glob("basn*.png"):
        inter = PNGSUITE / ("i" + plain.name)
        if inter.exists():
            np.testing.assert_array_equal(read_image(inter, channels="native", alpha="keep").data,
                                          read_image(plain, channels="native", alpha="keep").data)


# ----------------------------------------------------------------- generated PNG: every colour type and depth

@pytest.mark.parametrize("depth", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("interlace", [False, True])
def test_png_gray_every_depth(depth: int, interlace: bool) -> None:
    top = (1 << depth) - 1
    arr = (np.arange(9 * 11).reshape(9, 11) % (top + 1)).astype(np.uint16 if depth == 16 else np.uint8)
    if depth == 16:
        arr = (arr.astype(np.uint32) * 4099 % 65536).astype(np.uint16)  # low byte carries signal
    planes = read_image(pypng_bytes(arr, bitdepth=depth, interlace=interlace), channels="native")
    assert planes.channels == ("L",)
    if depth == 16:
        np.testing.assert_array_equal(planes.plane("L"), arr)
    else:
        # PNG spec 13.12: low bit depths scale to 8 bits by bit replication = v * 255 / top
        np.testing.assert_array_equal(planes.plane("L"), arr.astype(np.uint16) * (255 // top))


@pytest.mark.parametrize("depth", [8, 16])
@pytest.mark.parametrize("channels", [2, 3, 4])
@pytest.mark.parametrize("interlace", [False, True])
def test_png_color_types(depth: int, channels: int, interlace: bool) -> None:
    dtype = np.uint16 if depth == 16 else np.uint8
    arr = np.random.default_rng(channels).integers(0, np.iinfo(dtype).max, (7, 13, channels), dtype=dtype,
                                                   endpoint=True)
    planes = read_image(pypng_bytes(arr, bitdepth=depth, interlace=interlace), channels="native", alpha="keep")
    assert planes.channels == {2: ("L", "A"), 3: ("R", "G", "B"), 4: ("R", "G", "B", "A")}[channels]
    assert planes.data.dtype == dtype and planes.bit_depth == depth
    np.testing.assert_array_equal(planes.hwc(), arr)


@pytest.mark.parametrize("depth", [1, 2, 4, 8])
def test_png_palette_expands_through_palette(depth: int) -> None:
    n = 1 << depth
    palette = [((i * 37) % 256, (i * 91) % 256, (255 - i * 13) % 256) for i in range(n)]
    idx = (np.arange(6 * 10).reshape(6, 10) % n).astype(np.uint8)
    data = _palette_png(idx, palette, depth)
    planes = read_image(data)
    expected = np.array(palette, dtype=np.uint8)[idx]
    np.testing.assert_array_equal(planes.hwc(), expected)


def _palette_png(idx: np.ndarray, palette: list[tuple[int, int, int]], depth: int) -> bytes:
    h, w = idx.shape
    buf = io.BytesIO()
    png.Writer(w, h, palette=palette, bitdepth=depth).write(buf, idx.tolist())
    return buf.getvalue()


# ----------------------------------------------------------------- property tests

@st.composite
def images(draw, dtype):
    h = draw(st.integers(1, 17))
    w = draw(st.integers(1, 17))
    c = draw(st.sampled_from([1, 2, 3, 4]))
    return draw(hnp.arrays(dtype, (h, w, c)))


@settings(max_examples=40, deadline=None)
@given(arr=st.one_of(images(np.uint8), images(np.uint16)), interlace=st.booleans())
def test_png_roundtrip_property(arr: np.ndarray, interlace: bool) -> None:
    depth = 16 if arr.dtype == np.uint16 else 8
    planes = read_image(pypng_bytes(arr, bitdepth=depth, interlace=interlace), channels="native", alpha="keep")
    assert planes.data.dtype == arr.dtype
    np.testing.assert_array_equal(planes.hwc(), arr)


@settings(max_examples=40, deadline=None)
@given(arr=st.one_of(images(np.uint8), images(np.uint16)),
       compression=st.sampled_from([None, "lzw", "zlib"]))
def test_tiff_roundtrip_property(arr: np.ndarray, compression: str | None) -> None:
    c = arr.shape[2]
    photometric = "rgb" if c >= 3 else "minisblack"
    extras = {"extrasamples": [2]} if c in (2, 4) else {}
    data = tiff_bytes(arr if c > 1 else arr[:, :, 0], photometric=photometric, compression=compression, **extras)
    planes = read_image(data, channels="native", alpha="keep")
    assert planes.data.dtype == arr.dtype
    np.testing.assert_array_equal(planes.hwc(), arr)


# ----------------------------------------------------------------- 16-bit TIFF and the Pillow bug we avoid

@pytest.mark.parametrize("compression", [None, "lzw", "zlib"])
@pytest.mark.parametrize("kind", ["gray", "rgb", "rgba"])
def test_tiff16_exact(compression: str | None, kind: str) -> None:
    c = {"gray": 1, "rgb": 3, "rgba": 4}[kind]
    arr = smooth(20, 24, c, np.uint16)
    kw = {"extrasamples": [2]} if c == 4 else {}
    data = tiff_bytes(arr[:, :, 0] if c == 1 else arr, photometric="minisblack" if c == 1 else "rgb",
                      compression=compression, **kw)
    planes = read_image(data, channels="native", alpha="keep")
    np.testing.assert_array_equal(planes.hwc(), arr)
    assert planes.bit_depth == 16


def test_tiff_planar_separate_and_miniswhite() -> None:
    arr = smooth(8, 9, 3, np.uint16)
    planar = tiff_bytes(arr.transpose(2, 0, 1), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(planar).hwc(), arr)
    gray = arr[:, :, 0]
    white = tiff_bytes(gray, photometric="miniswhite")
    np.testing.assert_array_equal(read_image(white, channels="native").plane("L"), 65535 - gray)


def test_pillow_truncates_16bit_rgb_but_we_do_not() -> None:
    arr = smooth(16, 16, 3, np.uint16)
    data = pypng_bytes(arr, bitdepth=16)
    with Image.open(io.BytesIO(data)) as im:
        pil = np.asarray(im)
    assert pil.dtype == np.uint8 and np.array_equal(pil, (arr >> 8).astype(np.uint8))  # the bug
    np.testing.assert_array_equal(read_image(data).hwc(), arr)


def test_tiff_float_is_decoded_as_stored_and_refused_by_an_integer_model_not_truncated() -> None:
    from cnnpipe.images.transform import NeedsWiderType, prepare_bytes, spec_for_model

    arr = np.array([[-1.5, 0.25], [3e38, np.nan]], np.float32)
    np.testing.assert_array_equal(read_image(tiff_bytes(arr), channels="native").data[0], arr)
    with pytest.raises(NeedsWiderType, match="x.tif: float32 image; the model expects 1 plane.s. L at 8-bit, "
                                             "2x2 .cnnpipe never rounds, clips or rescales") as err:
        prepare_bytes(tiff_bytes(arr), spec_for_model(1, 8, (2, 2), "crop", "first", None), "x.tif")
    assert err.value.dtype == "float32"
    pixels = prepare_bytes(tiff_bytes(arr), spec_for_model(1, 32, (2, 2), dtype="float32"), "x.tif").pixels
    np.testing.assert_array_equal(pixels[..., 0], arr)   # NaN stays NaN, 3e38 stays 3e38


# ----------------------------------------------------------------- 8-bit formats equal Pillow

@pytest.mark.parametrize("variant", ["baseline", "progressive", "gray", "444", "422"])
def test_jpeg_equals_pillow(variant: str) -> None:
    arr = smooth(33, 47, 3, np.uint8)
    im = Image.fromarray(arr)
    kw = {"quality": 90}
    if variant == "progressive":
        kw["progressive"] = True
    elif variant == "gray":
        im = im.convert("L")
    elif variant == "444":
        kw["subsampling"] = 0
    elif variant == "422":
        kw["subsampling"] = 1
    data = pil_bytes(im, "JPEG", **kw)
    with Image.open(io.BytesIO(data)) as ref:
        expected = np.asarray(ref.convert("RGB"))
    planes = read_image(data)
    assert planes.bit_depth == 8
    np.testing.assert_array_equal(planes.hwc(), expected)


@pytest.mark.parametrize("fmt,kw", [("BMP", {}), ("WEBP", {"lossless": True}), ("WEBP", {"quality": 80}),
                                    ("GIF", {}), ("TIFF", {}), ("PNG", {})])
def test_other_8bit_formats_equal_pillow(fmt: str, kw: dict) -> None:
    im = Image.fromarray(smooth(21, 18, 3, np.uint8))
    data = pil_bytes(im, fmt, **kw)
    with Image.open(io.BytesIO(data)) as ref:
        expected = np.asarray(ref.convert("RGB"))
    np.testing.assert_array_equal(read_image(data).hwc(), expected)


def test_cmyk_jpeg_converts_to_rgb_like_pillow() -> None:
    im = Image.fromarray(smooth(16, 16, 3, np.uint8)).convert("CMYK")
    data = pil_bytes(im, "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as ref:
        assert ref.mode == "CMYK"
        expected = np.asarray(ref.convert("RGB"))
    planes = read_image(data)
    assert planes.channels == ("R", "G", "B")
    np.testing.assert_array_equal(planes.hwc(), expected)


# ----------------------------------------------------------------- channel and alpha policies

def test_gray_gives_three_equal_planes_by_default() -> None:
    gray = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000
    data = pypng_bytes(gray, bitdepth=16)
    planes = read_image(data)
    assert planes.channels == ("R", "G", "B") and planes.data.shape == (3, 3, 4)
    for name in "RGB":
        np.testing.assert_array_equal(planes[name], gray)
    native = read_image(data, channels="native")
    assert native.channels == ("L",) and native.data.shape == (1, 3, 4)


def test_gray_policy_luma_hand_computed() -> None:
    rgb = np.array([[[65535, 0, 0], [0, 65535, 0], [0, 0, 65535], [1000, 2000, 3000]]], np.uint16)
    planes = read_image(pypng_bytes(rgb, bitdepth=16), channels="gray")
    # (R*19595 + G*38470 + B*7471 + 32768) >> 16
    expected = [(65535 * 19595 + 32768) >> 16, (65535 * 38470 + 32768) >> 16, (65535 * 7471 + 32768) >> 16,
                (1000 * 19595 + 2000 * 38470 + 3000 * 7471 + 32768) >> 16]
    assert planes.channels == ("L",)
    assert planes.plane("L").tolist() == [expected]
    rgb8 = smooth(5, 6, 3, np.uint8)
    np.testing.assert_array_equal(read_image(pypng_bytes(rgb8, bitdepth=8), channels="gray").plane("L"),
                                  np.asarray(Image.fromarray(rgb8).convert("L")))


def test_alpha_drop_keep_composite() -> None:
    rgba = np.array([[[200, 100, 0, 255], [200, 100, 0, 0], [200, 100, 50, 128]]], np.uint8)
    data = pypng_bytes(rgba, bitdepth=8)
    assert read_image(data).channels == ("R", "G", "B")
    np.testing.assert_array_equal(read_image(data).hwc(), rgba[:, :, :3])
    kept = read_image(data, alpha="keep")
    assert kept.channels == ("R", "G", "B", "A")
    np.testing.assert_array_equal(kept.plane("A"), rgba[:, :, 3])
    black = read_image(data, alpha="composite")
    # round((c * a + bg * (255 - a)) / 255): 200*128/255 = 100.39 -> 100; 100*128/255 = 50.2 -> 50; 50*128/255 = 25.1
    assert black.hwc().tolist() == [[[200, 100, 0], [0, 0, 0], [100, 50, 25]]]
    white = read_image(data, alpha="composite", background=1.0)
    # (200*128 + 255*127)/255 = 227.4 -> 227; (100*128 + 255*127)/255 = 177.2; (50*128+255*127)/255 = 152.1
    assert white.hwc().tolist() == [[[200, 100, 0], [255, 255, 255], [227, 177, 152]]]
    # a bad background is an error whether or not this image has alpha
    for arr in (rgba, rgba[:, :, :3]):
        with pytest.raises(ValueError, match="background"):
            read_image(pypng_bytes(arr, bitdepth=8), alpha="composite", background=2.0)



@pytest.mark.parametrize("bitdepth", [8, 16])
def test_convert_planes_equals_decoding_with_the_policy(bitdepth: int) -> None:
    dtype = np.uint8 if bitdepth == 8 else np.uint16
    rgba = np.random.default_rng(1).integers(0, 1 << bitdepth, (5, 7, 4)).astype(dtype)
    for arr in (rgba, rgba[:, :, :3], rgba[:, :, :1]):
        data = pypng_bytes(arr, bitdepth=bitdepth)
        native = read_image(data, channels="native", alpha="keep")
        for channels in ("rgb", "native", "gray"):
            for alpha in ("drop", "keep", "composite"):
                want = read_image(data, channels=channels, alpha=alpha, background=0.5)
                got = convert_planes(native, channels=channels, alpha=alpha, background=0.5)
                assert (got.channels, got.bit_depth) == (want.channels, want.bit_depth)
                np.testing.assert_array_equal(got.data, want.data)

def test_alpha_composite_16bit_exact() -> None:
    rgba = np.array([[[65535, 1000, 0, 32768]]], np.uint16)
    out = read_image(pypng_bytes(rgba, bitdepth=16), alpha="composite").hwc()
    assert out.tolist() == [[[(65535 * 32768 + 32767) // 65535, (1000 * 32768 + 32767) // 65535, 0]]]


def test_trns_colour_key_is_alpha() -> None:
    rgb = np.array([[[10, 20, 30], [1, 2, 3]]], np.uint16) * 1000
    data = pypng_bytes(rgb, bitdepth=16, transparent=(1000, 2000, 3000))
    planes = read_image(data, alpha="keep")
    assert planes.channels == ("R", "G", "B", "A")
    assert planes.plane("A").tolist() == [[65535, 0]]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(orientation: int) -> None:
    arr = smooth(6, 10, 3, np.uint8)
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    for fmt, kw in (("JPEG", {"quality": 95}), ("PNG", {}), ("WEBP", {"lossless": True})):
        data = pil_bytes(im, fmt, exif=exif, **kw)
        with Image.open(io.BytesIO(data)) as ref:
            expected = np.asarray(ImageOps.exif_transpose(ref).convert("RGB"))
            raw = np.asarray(ref.convert("RGB"))
        np.testing.assert_array_equal(read_image(data).hwc(), expected, err_msg=fmt)
        np.testing.assert_array_equal(read_image(data, exif_orientation=False).hwc(), raw, err_msg=fmt)


def test_tiff_orientation_tag() -> None:
    arr = smooth(4, 7, 3, np.uint16)
    data = tiff_bytes(arr, photometric="rgb", extratags=[(274, "H", 1, 6, False)])
    np.testing.assert_array_equal(read_image(data).hwc(), np.rot90(arr, -1))  # 6 = rotate 90 clockwise


def test_animated_gif_and_apng_give_first_frame() -> None:
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (10, 200, 90)]
    for fmt in ("GIF", "PNG", "WEBP"):
        kw = {"lossless": True} if fmt == "WEBP" else {}
        data = pil_bytes(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **kw)
        planes = read_image(data)
        with Image.open(io.BytesIO(data)) as ref:
            assert getattr(ref, "n_frames", 1) == 3, fmt
            expected = np.asarray(ref.convert("RGB"))
        np.testing.assert_array_equal(planes.hwc(), expected, err_msg=fmt)
        assert int(planes.data.mean()) == 10, fmt


def test_format_from_magic_bytes_not_extension(tmp_path: Path) -> None:
    arr = smooth(5, 5, 3, np.uint16)
    lying = tmp_path / "photo.jpg"
    lying.write_bytes(pypng_bytes(arr, bitdepth=16))
    np.testing.assert_array_equal(read_image(lying).hwc(), arr)
    assert sniff_format(lying.read_bytes()[:32]) == "PNG"
    assert sniff_format(b"\xff\xd8\xff\xe0") == "JPEG"
    assert sniff_format(b"GIF89a....") == "GIF"
    assert sniff_format(b"hello") is None


def test_planes_accessors() -> None:
    arr = smooth(4, 5, 3, np.uint16)
    planes = read_image(pypng_bytes(arr, bitdepth=16))
    assert isinstance(planes, Planes)
    assert (planes.height, planes.width, planes.max_value) == (4, 5, 65535)
    np.testing.assert_array_equal(planes.plane("G"), arr[:, :, 1])
    assert planes.hwc().shape == (4, 5, 3)
    with pytest.raises(KeyError, match="no plane 'A'"):
        planes.plane("A")
    with pytest.raises(ValueError):
        planes.data[0, 0, 0] = 1  # read-only: Planes are values


# ----------------------------------------------------------------- bad input

def _png_ok() -> bytes:
    return pypng_bytes(smooth(32, 32, 3, np.uint16), bitdepth=16)


@pytest.mark.parametrize("case,pattern", [
    ("empty", "empty file"),
    ("truncated_png", "truncated PNG"),
    ("truncated_header", "truncated PNG|missing IHDR"),
    ("truncated_jpeg", "truncated JPEG"),
    ("corrupt_png", "corrupt PNG"),
    ("text", "not a recognised image"),
    ("jpeg2000", "corrupt JPEG 2000: no image header"),
    ("qoi", "unsupported image format QOI"),
    ("bomb", "over the limit of 100"),
])
def test_bad_input_raises_decode_error_naming_file(tmp_path: Path, case: str, pattern: str) -> None:
    good = _png_ok()
    jpeg = pil_bytes(Image.fromarray(smooth(32, 32, 3, np.uint8)), "JPEG")
    idat = good.index(b"IDAT")
    corrupt = bytearray(good)
    corrupt[idat + 20] ^= 0xFF  # breaks the zlib stream and the chunk CRC
    data = {
        "empty": b"",
        "truncated_png": good[: len(good) // 2],
        "truncated_header": good[:20],
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "corrupt_png": bytes(corrupt),
        "text": b"just some text, not an image\n",
        "jpeg2000": b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 40,
        "qoi": b"qoif" + b"\x00" * 40,
        "bomb": good,
    }[case]
    path = tmp_path / f"{case}.png"
    path.write_bytes(data)
    with pytest.raises(DecodeError, match=pattern) as info:
        read_image(path, max_pixels=100 if case == "bomb" else DEFAULT_MAX_PIXELS)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match="cannot read file"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(DecodeError, match="is a directory"):
        read_image(tmp_path)


def test_bomb_guard_configurable_and_from_header_only() -> None:
    # A header claiming 100000 x 100000 pixels: refused before any pixel is inflated.
    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    with pytest.raises(DecodeError, match="10,000,000,000 pixels"):
        read_image(data)
    small = _png_ok()
    assert read_image(small, max_pixels=None).width == 32
    assert read_image(small, max_pixels=32 * 32).width == 32


def test_pillow_global_state_untouched(tmp_path: Path) -> None:
    before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)
    good = _png_ok()
    for data in (good[:100], b"", good):
        try:
            read_image(data, max_pixels=10)
        except DecodeError:
            pass
    assert (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS) == before == (False, DEFAULT_MAX_PIXELS)


# ----------------------------------------------------------------- CLI

def test_cli_decode_prints_planes_and_saves_exactly(tmp_path: Path, capsys) -> None:
    arr = smooth(6, 7, 3, np.uint16)
    src = tmp_path / "x.png"
    src.write_bytes(pypng_bytes(arr, bitdepth=16))
    out = tmp_path / "x.npy"
    assert main(["decode", str(src), "--save", str(out)]) == 0
    text = capsys.readouterr().out
    assert "16-bit" in text
    for name, i in (("R", 0), ("G", 1), ("B", 2)):
        line = next(l for l in text.splitlines() if l.strip().startswith(name + " "))
        assert f"min {int(arr[:, :, i].min()):>6}" in line and f"max {int(arr[:, :, i].max()):>6}" in line
    saved = np.load(out)
    assert saved.shape == (3, 6, 7) and saved.dtype == np.uint16
    np.testing.assert_array_equal(saved, arr.transpose(2, 0, 1))


def test_cli_decode_native_channels(tmp_path: Path, capsys) -> None:
    src = tmp_path / "g.png"
    src.write_bytes(pypng_bytes(np.full((3, 3), 7, np.uint8), bitdepth=8))
    assert main(["decode", str(src), "--channels", "native"]) == 0
    assert "1 plane," in capsys.readouterr().out


def test_cli_bad_file_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "cnnpipe.cli", "decode", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert str(bad) in proc.stderr and "empty file" in proc.stderr


def test_jpeg_with_trailing_bytes_after_eoi_still_decodes() -> None:
    arr = smooth(16, 16, 3, np.uint8)
    data = pil_bytes(Image.fromarray(arr), "JPEG") + b"CAMERA-TRAILER" * 10
    with Image.open(io.BytesIO(data)) as ref:
        expected = np.asarray(ref.convert("RGB"))
    np.testing.assert_array_equal(read_image(data).hwc(), expected)


def test_cli_output_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    src = tmp_path / "x.png"
    src.write_bytes(pypng_bytes(smooth(4, 4, 3, np.uint8), bitdepth=8))
    # like `cnnpipe decode x.png | head -0`: the reading end is closed before anything is written
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "cnnpipe.cli", "decode", str(src)], stdout=write_end,
                              stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert proc.returncode == 1
    assert proc.stderr == ""  # no BrokenPipeError traceback, no "Exception ignored" at exit
