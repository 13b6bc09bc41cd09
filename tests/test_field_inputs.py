"""Inputs from the field: file kinds other loaders broke on, each built here from a file we make.

Non-UTF-8 file names, 12-bit and lossless JPEG, JPEG-LS, TIFF compressions and bit
depths beyond libtiff's, 16-bit colour maps, multi-page stacks, skipped files that
must not decide the store's dtype, and deterministic reasons of three kinds. The
references are independent of the decoder under test: the arrays the files were
written from (lossless codecs), or imagecodecs' own decoder for lossy 12-bit JPEG.
"""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnpipe import DecodeError, read_image
from cnnpipe.datasets.folders import assign_split
from cnnpipe.datasets.preprocess import preprocess
from cnnpipe.images.formats import display_path, path_from_display
from cnnpipe.images.transform import ImageSpec, prepare_bytes

FIELD = Path(os.environ.get("CNNPIPE_FIELD_CASES", Path(__file__).resolve().parents[2] / "shared/field-cases"))
RNG = np.random.default_rng(17)


def _tiff(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def _png8(h: int, w: int, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _patch_tiff_tag(data: bytes, tag: int, value: int) -> bytes:
    """The same TIFF with one SHORT tag of page 1 set to `value` (e.g. an unknown compression)."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        entry = tif.pages.first.tags[tag]
        offset, order = entry.valueoffset, tif.byteorder
    out = bytearray(data)
    out[offset:offset + 2] = struct.pack(f"{order}H", value)
    return bytes(out)


# ---------------------------------------------------------------- file names are bytes

@given(st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\x00" not in b))
@settings(max_examples=300, deadline=None)
def test_display_path_is_printable_and_reversible(name):
    path = os.fsdecode(name)
    shown = display_path(path)
    shown.encode("utf-8")  # never raises: always printable and writable as JSON/CSV
    assert path_from_display(shown) == path
    if b"\\" not in name and not any(b < 0x20 or b == 0x7F for b in name):
        try:
            assert shown == name.decode("utf-8")  # valid UTF-8 names are shown as they are
        except UnicodeDecodeError:
            pass


def test_split_hash_takes_the_name_bytes_and_keeps_utf8_splits():
    latin1 = os.fsdecode(b"caf\xe9.png")
    assert assign_split(0, "cats", latin1, 0.3, 0.2) in ("train", "val", "test")
    # a valid UTF-8 name hashes exactly as before (the same bytes as str.encode())
    import hashlib
    digest = hashlib.blake2b("0\x00cats\x00café.png".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64
    assert assign_split(0, "cats", "café.png", 0.3, 0.2) == ("test" if u < 0.2 else "val" if u < 0.5 else "train")


@pytest.mark.parametrize("layout", ["classes", "splits"])
def test_names_that_are_not_utf8_are_stored_and_reported_escaped(tmp_path, layout):
    src = tmp_path / "src"
    bad_names = [b"caf\xe9.png", b"\xff\xfe-odd.png", b"back\\slash\xe9.png"]
    for k, cls in enumerate([b"cats", b"d\xf6gs"]):
        base = src / "train" if layout == "splits" else src
        folder = os.path.join(os.fsencode(base), cls)
        os.makedirs(folder)
        for i, name in enumerate(bad_names + [b"plain.png"]):
            with open(os.path.join(folder, name), "wb") as f:
                f.write(_png8(6, 5, 10 * k + i))
        if layout == "splits":
            os.makedirs(os.path.join(os.fsencode(src / "val"), cls))
            with open(os.path.join(os.fsencode(src / "val"), cls, b"v\xe9.png"), "wb") as f:
                f.write(_png8(6, 5, 99 + k))
        with open(os.path.join(folder, b"broken\xe9.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    store = preprocess(src, tmp_path / "out", size=4, workers=1, val_fraction=0.0)
    sources = [path_from_display(s) for s in store.sources("train")]
    assert len(sources) == 8 and all(os.fsencode(s) for s in sources)
    assert store.classes == ["cats", "d\\xf6gs"]  # a class name is a label: its display form
    text = (store.path / "report.json").read_text(encoding="utf-8")  # strict UTF-8: no lone surrogates
    report = json.loads(text)
    skipped = {path_from_display(s["path"]): s for s in report["skipped"]}
    prefix = "train/" if layout == "splits" else ""
    broken = prefix + os.fsdecode(b"d\xf6gs/broken\xe9.png")
    assert skipped[broken]["kind"] == "corrupt"
    assert display_path(broken) in skipped[broken]["reason"]
    json.loads((store.path / "meta.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- JPEG processes

def _gray12(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((np.sin(x / 5) + np.cos(y / 7)) * 1000 + 2048 + RNG.integers(0, 40, (h, w))).clip(0, 4095).astype(np.uint16)


@pytest.mark.parametrize("case", ["lossless16_gray", "lossless12_rgb", "lossless8_gray", "jpegls16_gray",
                                  "jpegls8_rgb"])
def test_lossless_jpeg_kinds_decode_to_the_array_they_were_written_from(case):
    bits = int("".join(ch for ch in case.split("_")[0] if ch.isdigit()))
    shape = (17, 23, 3) if case.endswith("rgb") else (17, 23)
    dtype = np.uint8 if bits == 8 else np.uint16
    arr = RNG.integers(0, 1 << bits, shape).astype(dtype)
    if case.startswith("jpegls"):
        data = imagecodecs.jpegls_encode(arr)
    else:
        data = imagecodecs.jpeg8_encode(arr, lossless=True, bitspersample=bits)
    planes = read_image(data, channels="native")
    assert planes.bit_depth == (8 if bits == 8 else 16)
    np.testing.assert_array_equal(planes.hwc().reshape(arr.shape), arr)


def test_12bit_lossy_jpeg_matches_libjpeg_turbo_at_full_and_reduced_size():
    arr = _gray12(400, 600)
    data = imagecodecs.jpeg8_encode(arr, bitspersample=12, level=90)
    planes = read_image(data, channels="native")
    np.testing.assert_array_equal(planes.data[0], imagecodecs.jpeg8_decode(data))
    assert planes.bit_depth == 16 and planes.data.max() <= 4095  # values kept, not rescaled
    # the reduced-size path preprocess takes for large files decodes at full size, then resizes
    spec = ImageSpec((20, 30), "crop", "native", 16, 1)
    full = prepare_bytes(data, spec, "a.jpg").pixels
    np.testing.assert_array_equal(full, prepare_bytes(data, spec, "a.jpg").pixels)
    assert full.dtype == np.uint16 and full.max() <= 4095


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_12bit_jpeg_is_corrupt_not_gray_filled(cut):
    data = imagecodecs.jpeg8_encode(_gray12(64, 64), bitspersample=12)
    with pytest.raises(DecodeError, match="truncated JPEG") as err:
        read_image(data[:int(len(data) * cut)])
    assert err.value.kind == "corrupt"


@pytest.mark.parametrize("sof", [0xC5, 0xC6, 0xC7, 0xCB, 0xCD])
def test_hierarchical_and_lossless_arithmetic_jpeg_are_unsupported_by_name(sof):
    data = bytearray(imagecodecs.jpeg8_encode(_gray12(16, 16), lossless=True, bitspersample=12))
    i = data.find(b"\xff\xc3")
    data[i + 1] = sof
    with pytest.raises(DecodeError, match=rf"unsupported: JPEG .*\(SOF{sof - 0xC0}\), 12-bit") as err:
        read_image(bytes(data))
    assert err.value.kind == "unsupported"


def test_unidentifiable_jpeg_reason_names_no_object_address():
    data = b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF\x00" + bytes(range(256)) * 3
    with pytest.raises(DecodeError) as err:
        read_image(data)
    assert " at 0x" not in str(err.value) and err.value.kind == "corrupt"


# ---------------------------------------------------------------- JPEG 2000

@pytest.mark.parametrize("codecformat", ["jp2", "j2k"])
@pytest.mark.parametrize("shape,bits", [((13, 17), 16), ((13, 17), 12), ((13, 17, 3), 8), ((9, 11, 6), 16)])
def test_jpeg2000_decodes_exactly_with_values_as_stored(codecformat, shape, bits):
    arr = RNG.integers(0, 1 << bits, shape).astype(np.uint8 if bits == 8 else np.uint16)
    data = imagecodecs.jpeg2k_encode(arr, level=0, codecformat=codecformat, bitspersample=bits)
    planes = read_image(data, channels="native")
    np.testing.assert_array_equal(planes.hwc().reshape(arr.shape), arr)
    assert len(planes.channels) == (1 if len(shape) == 2 else shape[2])
    if len(shape) == 3 and shape[2] == 6:
        assert planes.channels == ("S0", "S1", "S2", "S3", "S4", "S5")  # multispectral bands


# ---------------------------------------------------------------- TIFF

@pytest.mark.parametrize("compression", ["jpeg2000", "jpegxl", "zstd", "lzma", "lerc", "deflate", "lzw"])
def test_tiff_compressions_decode_exactly(compression):
    arr = RNG.integers(0, 65536, (19, 26), dtype=np.uint16)
    args = {"jpeg2000": {"level": 0}, "jpegxl": {"lossless": True}}.get(compression, {})
    data = _tiff(arr, compression=compression, compressionargs=args)
    planes = read_image(data, channels="native")
    assert planes.bit_depth == 16
    np.testing.assert_array_equal(planes.data[0], arr)


def test_12bit_jpeg_compressed_tiff_decodes_values_as_stored():
    arr = _gray12(32, 40)
    data = _tiff(arr, compression="jpeg", compressionargs={"lossless": True, "bitspersample": 12}, bitspersample=12)
    np.testing.assert_array_equal(read_image(data, channels="native").data[0], arr)


@pytest.mark.parametrize("dtype,kind", [(np.complex64, "64-bit complex float"), (np.int64, "64-bit signed integer"),
                                        (np.uint64, "64-bit unsigned integer")])
def test_tiff_sample_types_beyond_the_scientific_ones_are_unsupported_by_name(dtype, kind):
    with pytest.raises(DecodeError, match=f"unsupported: TIFF, {kind}") as err:
        read_image(_tiff(np.ones((4, 4), dtype)))
    assert err.value.kind == "unsupported"


def test_tiff_compression_no_codec_decodes_is_unsupported_by_name():
    data = _patch_tiff_tag(_tiff(np.ones((4, 4), np.uint8)), 259, 32809)  # ThunderScan
    with pytest.raises(DecodeError, match=r"unsupported: TIFF, THUNDERSCAN compression \(32809\)") as err:
        read_image(data)
    assert err.value.kind == "unsupported"


def test_palette_with_16bit_colour_map_expands_exactly():
    index = RNG.integers(0, 256, (9, 11), dtype=np.uint8)
    cmap = RNG.integers(0, 65536, (3, 256), dtype=np.uint16)
    planes = read_image(_tiff(index, photometric="palette", colormap=cmap))
    assert planes.bit_depth == 16
    np.testing.assert_array_equal(planes.hwc(), cmap.T[index])


def test_palette_with_8bit_colour_map_stays_8bit_as_pillow_reads_it():
    index = RNG.integers(0, 256, (9, 11), dtype=np.uint8)
    cmap = RNG.integers(0, 256, (3, 256)).astype(np.uint16) * 257
    data = _tiff(index, photometric="palette", colormap=cmap)
    planes = read_image(data)
    assert planes.bit_depth == 8
    np.testing.assert_array_equal(planes.hwc(), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_plain_multipage_stack_keeps_page_one_and_says_so_or_reads_pages_as_planes():
    pages = RNG.integers(0, 65536, (3, 8, 10), dtype=np.uint16)
    data = _tiff(pages, photometric="minisblack", metadata=None)  # pages one after another, no ImageJ/OME axes
    first = read_image(data, channels="native")
    np.testing.assert_array_equal(first.data[0], pages[0])
    assert "3 pages; page 1 kept" in first.warnings
    planes = read_image(data, channels="native", pages="planes")
    assert planes.channels == ("S0", "S1", "S2") and not planes.warnings
    np.testing.assert_array_equal(planes.data, pages)
    mixed = io.BytesIO()
    with tifffile.TiffWriter(mixed) as w:
        w.write(pages[0])
        w.write(pages[1, :4])
    with pytest.raises(DecodeError, match="page 2 is 10x4") as err:
        read_image(mixed.getvalue(), channels="native", pages="planes")
    assert err.value.kind == "planes"


def _truncations(data: bytes) -> list[bytes]:
    return [data[:len(data) - 1], data[:int(len(data) * 0.7)], data[:int(len(data) * 0.5)]]


@pytest.mark.parametrize("case", ["lzw8", "jpeg8", "jpeg12", "jpeg2000_16", "stack_imagej"])
def test_truncated_tiff_is_corrupt_never_gray_filled(case):
    x = _gray12(48, 40)
    data = {
        "lzw8": lambda: _tiff((x % 256).astype(np.uint8), compression="lzw"),
        "jpeg8": lambda: _tiff((x % 256).astype(np.uint8), compression="jpeg"),
        "jpeg12": lambda: _tiff(x, compression="jpeg", compressionargs={"lossless": True, "bitspersample": 12},
                                bitspersample=12),
        "jpeg2000_16": lambda: _tiff(x * 16, compression="jpeg2000", compressionargs={"level": 0}),
        "stack_imagej": lambda: _tiff(np.stack([x, x, x]), imagej=True, metadata={"axes": "CYX"}),
    }[case]()
    for cut in _truncations(data)[1:] if case == "stack_imagej" else _truncations(data):
        with pytest.raises(DecodeError, match=r"truncated TIFF|broken page chain") as err:
            read_image(cut, channels="native")
        assert err.value.kind == "corrupt"


def test_pages_planes_takes_only_plain_gray_pages_and_names_the_odd_one():
    rgb_pages = _tiff(RNG.integers(0, 256, (2, 6, 5, 3), dtype=np.uint8), photometric="rgb", metadata=None)
    with pytest.raises(DecodeError, match=r"page 1 is 5x6, 3 sample\(s\) of 8-bit RGB \(2\);") as err:
        read_image(rgb_pages, channels="native", pages="planes")
    assert "page 1 is 5x6, 3 sample(s) of 8-bit RGB (2), page 1" not in str(err.value)
    four_bit = _tiff(RNG.integers(0, 16, (2, 6, 5), dtype=np.uint8), bitspersample=4, photometric="minisblack",
                     metadata=None)
    with pytest.raises(DecodeError, match="4-bit"):
        read_image(four_bit, channels="native", pages="planes")


# ---------------------------------------------------------------- the shared field cases

@pytest.mark.skipif(not FIELD.is_dir(), reason="shared/field-cases not found (set CNNPIPE_FIELD_CASES)")
def test_shared_field_cases():
    for name in ("ljpeg16.jpg", "jpeg12_baseline.jpg"):
        data = (FIELD / name).read_bytes()
        for reduce in (1, 2, 8):
            np.testing.assert_array_equal(read_image(data, channels="native", reduce=reduce).data[0],
                                          imagecodecs.jpeg8_decode(data))
    stack = read_image(FIELD / "stack3_u16.tif", channels="native")
    assert stack.warnings == ("3 pages; page 1 kept",)
    assert read_image(FIELD / "stack3_u16.tif", channels="native", pages="planes").data.shape[0] == 3
    palette = read_image(FIELD / "palette16.tif")
    assert palette.data[:, 0, 0].tolist() == [63736, 13400, 33047]


# ---------------------------------------------------------------- preprocess: kinds, dtype, determinism

def _every_kind_folder(root: Path) -> dict[str, str]:
    """Class folders with valid 8-bit PNGs and one file of every refused kind; {relative path: kind}."""
    expect = {}
    for k, cls in enumerate(["a", "b"]):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            (root / cls / f"ok{i}.png").write_bytes(_png8(7 + i, 9, 10 * k + i))
    bad = {
        "a/float.tif": (_tiff(np.ones((4, 4), np.float32))[:60], "corrupt"),   # its header alone decides nothing
        "a/thunder.tif": (_patch_tiff_tag(_tiff(np.ones((4, 4), np.uint16)), 259, 32809), "unsupported"),
        "b/hier.jpg": (bytes(bytearray(imagecodecs.jpeg8_encode(_gray12(8, 8), lossless=True, bitspersample=12))
                             .replace(b"\xff\xc3", b"\xff\xc7", 1)), "unsupported"),
        "b/trunc16.png": (imagecodecs.png_encode(np.ones((30, 30), np.uint16) * 999)[:60], "corrupt"),
        "b/trunc12.jpg": (imagecodecs.jpeg8_encode(_gray12(64, 64), bitspersample=12)[:300], "corrupt"),
        "b/huge.png": (_huge_png_header(), "too_large"),
        "b/garbage.jpg": (b"\xff\xd8\xff\xe0" + bytes(range(200)), "corrupt"),
        "a/empty.png": (b"", "empty"),
        "a/notes.png": (b"hello", "not_image"),
        "a/j2k.jp2": (b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 40, "corrupt"),
        "a/layers.psd": (b"8BPS" + b"\x00" * 40, "unsupported"),
    }
    for rel, (data, kind) in bad.items():
        (root / rel).write_bytes(data)
        expect[rel] = kind
    return expect


def _huge_png_header() -> bytes:
    """A PNG whose header claims 40000x40000 pixels (over max_pixels); refused before decoding."""
    import zlib

    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")


def _store_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_every_kind_is_reported_with_its_kind_and_the_store_is_byte_identical_for_any_worker_count(tmp_path,
                                                                                                   monkeypatch):
    expect = _every_kind_folder(tmp_path / "src")
    # warnings (page 1 kept), a duplicate and a second, 16-bit-free store with a validation split
    (tmp_path / "src/b/stack.tif").write_bytes(_tiff(RNG.integers(0, 256, (3, 5, 6), dtype=np.uint8),
                                                      photometric="minisblack", metadata=None))
    (tmp_path / "src/b/copy.png").write_bytes((tmp_path / "src/a/ok0.png").read_bytes())
    first = preprocess(tmp_path / "src", tmp_path / "one", size=6, workers=1, val_fraction=0.3)
    monkeypatch.chdir(tmp_path)   # SRC spelled another way: reasons name files relative to it
    second = preprocess(Path("./src"), tmp_path / "two", size=6, workers=2, val_fraction=0.3)
    files = _store_files(first.path)
    assert {"meta.json", "report.json", "train/images.npy", "val/images.npy"} <= set(files)
    assert files == _store_files(second.path)  # every file, byte for byte: timings are not content
    assert first.report["counts"]["files_with_warnings"] == 1 and first.report["counts"]["duplicate_groups"] == 1
    kinds = {s["path"]: s["kind"] for s in first.report["skipped"]}
    assert kinds == expect
    reasons = " ".join(s["reason"] for s in first.report["skipped"])
    assert " at 0x" not in reasons and "/tmp/pytest" not in reasons.replace(str(tmp_path), "")
    # every skipped file was 16-bit or more by its header, or unreadable; none decides the dtype
    assert first.dtype == np.uint8 and first.bit_depth == 8
    assert "elapsed_s" not in first.meta and "elapsed_s" not in first.report


def test_skipped_high_bit_depth_files_never_make_an_8bit_store_16bit(tmp_path):
    src = tmp_path / "src"
    arrays = {}
    for k, cls in enumerate(["x", "y"]):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            arr = np.random.default_rng(10 * k + i).integers(0, 256, (6, 6, 3), dtype=np.uint8)
            Image.fromarray(arr).save(src / cls / f"{i}.png")
            arrays[f"{cls}/{i}.png"] = arr
        (src / cls / "f32.tif").write_bytes(_tiff(np.ones((6, 6), np.float32))[:60])   # header: float32
        (src / cls / "u16bad.tif").write_bytes(_tiff(np.ones((6, 6), np.uint16))[:40])  # header: 16 bits
        (src / cls / "u32.tif").write_bytes(_tiff(np.ones((6, 6), np.uint32))[:60])   # header: 32 bits
    store = preprocess(src, tmp_path / "out", size=6, workers=1, val_fraction=0.0)
    assert store.dtype == np.uint8 and store.meta["bit_depth"] == 8
    rows = dict(zip(store.sources("train"), store.images("train")))
    for rel, arr in arrays.items():
        np.testing.assert_array_equal(rows[rel], arr)  # the 8-bit values themselves, not x257
    means = np.stack(list(arrays.values())).reshape(-1, 3).mean(0)
    np.testing.assert_allclose(store.mean, means, rtol=1e-12)


def test_a_real_16bit_file_still_makes_a_16bit_store(tmp_path):
    src = tmp_path / "src"
    for k, cls in enumerate(["x", "y"]):
        (src / cls).mkdir(parents=True)
        (src / cls / "a.png").write_bytes(_png8(5, 5, k))
    (src / "y" / "deep.png").write_bytes(imagecodecs.png_encode(np.full((5, 5), 40000, np.uint16)))
    store = preprocess(src, tmp_path / "out", size=5, workers=1, val_fraction=0.0)
    assert store.dtype == np.uint16


def test_preprocess_pages_planes_keeps_every_page_of_a_stack(tmp_path):
    src = tmp_path / "src"
    for k, cls in enumerate(["x", "y"]):
        (src / cls).mkdir(parents=True)
        for i in range(2):
            pages = RNG.integers(0, 65536, (3, 8, 8), dtype=np.uint16)
            (src / cls / f"{i}.tif").write_bytes(_tiff(pages, photometric="minisblack", metadata=None))
    kept = preprocess(src, tmp_path / "first", size=8, workers=1, channels="native", val_fraction=0.0)
    assert kept.channels == 1
    assert all(w["warnings"] == ["3 pages; page 1 kept"] for w in kept.report["warnings"])
    planes = preprocess(src, tmp_path / "planes", size=8, workers=1, channels="native", pages="planes",
                        val_fraction=0.0)
    assert planes.channels == 3 and planes.meta["channel_names"] == ["S0", "S1", "S2"]
    assert planes.meta["pages"] == "planes"


def test_folder_cache_key_and_decode_cli_take_names_that_are_not_utf8(tmp_path, capsys):
    from cnnpipe.cli import main
    from cnnpipe.datasets.sources import folder_cache_key

    for cls in (b"a", b"b\xe9"):
        folder = os.path.join(os.fsencode(tmp_path / "src"), cls)
        os.makedirs(folder)
        with open(os.path.join(folder, b"caf\xe9.png"), "wb") as f:
            f.write(_png8(4, 4, 1))
    key, count = folder_cache_key(tmp_path / "src", {})
    assert count == 2 and len(key) == 20
    path = os.fsdecode(os.path.join(os.fsencode(tmp_path / "src"), b"a", b"caf\xe9.png"))
    assert main(["decode", path]) == 0
    assert capsys.readouterr().out.startswith(display_path(path) + ": 4x4")
    assert "caf\\xe9.png" in display_path(path)


def test_a_class_folder_that_is_not_utf8_trains_predicts_and_inspects(tmp_path, capsys):
    from cnnpipe.cli import main

    src = os.fsencode(tmp_path / "src")
    for k, cls in enumerate([b"plain", b"caf\xe9"]):
        os.makedirs(os.path.join(src, cls))
        for i in range(12):
            arr = np.full((8, 8, 3), 40 + 150 * k, np.uint8) + RNG.integers(0, 30, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(arr).save(os.fsdecode(os.path.join(src, cls, b"im\xe9%d.png" % i)))
    store, run = tmp_path / "store", tmp_path / "run"
    assert main(["preprocess", os.fsdecode(src), str(store), "--size", "8", "--workers", "1",
                 "--val-fraction", "0.3"]) == 0
    assert main(["train", "--workdir", str(run), "--set", "data.source=store", "--set", f"data.path={store}",
                 "--set", "train.epochs=1", "--set", "train.batch_size=8", "--compile-cache", "off"]) == 0
    image = os.fsdecode(os.path.join(src, b"caf\xe9", b"im\xe90.png"))
    assert main(["predict", str(run), image, "--out", str(tmp_path / "p.csv")]) == 0
    rows = (tmp_path / "p.csv").read_text(encoding="utf-8").splitlines()
    assert rows[1].startswith(display_path(image) + ",1,") and "caf\\xe9" in rows[1]
    assert main(["inspect", str(run), image, "--out", str(tmp_path / "insp")]) == 0
    assert display_path(image) in (tmp_path / "insp" / "index.html").read_text(encoding="utf-8")
