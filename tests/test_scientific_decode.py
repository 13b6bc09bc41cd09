"""Float, signed and 32-bit TIFFs decode exactly as stored (issue 30, first step: the decode stage).

The files are written by tifffile from known arrays, with every layout users bring: strips and
tiles, no compression, deflate, LZW and zstd, horizontal (2) and floating-point (3) predictors,
several samples per pixel (chunky and planar), and GDAL's nodata tag. The arrays themselves are
the reference: every value, NaN and infinity included, must come back bit for bit.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnpipe.images.decode import DecodeError, read_image

DTYPES = (np.int8, np.int16, np.int32, np.uint32, np.float16, np.float32, np.float64)


def _tiff(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def _values(dtype, shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    arr = (rng.standard_normal(shape) * 1e3).astype(dtype)
    flat = arr.reshape(-1)
    flat[:: max(1, flat.size // 5)] = np.nan   # NaN stripes, as outside a satellite swath
    if flat.size > 3:
        flat[1], flat[2] = np.inf, -np.inf
    return arr


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit (NaN payloads included): the arrays' bytes and types are equal."""
    return a.dtype == b.dtype and a.shape == b.shape and np.ascontiguousarray(a).tobytes() == \
        np.ascontiguousarray(b).tobytes()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(dtype=st.sampled_from(DTYPES), h=st.integers(1, 40), w=st.integers(1, 40), samples=st.sampled_from([1, 3, 5]),
       layout=st.sampled_from(["strips", "tiles"]), compression=st.sampled_from([None, "zlib", "lzw", "zstd"]),
       planar=st.booleans(), seed=st.integers(0, 1000))
def test_every_scientific_sample_type_round_trips_exactly(dtype, h, w, samples, layout, compression, planar, seed):
    shape = (h, w) if samples == 1 else ((samples, h, w) if planar else (h, w, samples))
    arr = _values(dtype, shape, seed)
    kw = {"compression": compression, "photometric": "minisblack"}
    if samples > 1:
        kw["planarconfig"] = "separate" if planar else "contig"
    if layout == "tiles":
        kw["tile"] = (16, 16)
    if compression is not None:   # the predictor a GDAL or ImageJ writer would use for the type
        kw["predictor"] = 3 if np.issubdtype(dtype, np.floating) and dtype != np.float16 else (
            2 if np.issubdtype(dtype, np.integer) else None)
    planes = read_image(_tiff(arr, **kw), channels="native")
    expected = arr[None] if samples == 1 else (arr if planar else arr.transpose(2, 0, 1))
    assert planes.dtype == np.dtype(dtype) and planes.bit_depth == 8 * np.dtype(dtype).itemsize
    assert _same(np.ascontiguousarray(planes.data), expected)


def test_gdal_nodata_is_read_and_a_three_band_float_image_is_rgb():
    band = np.full((6, 7), -9999.0, np.float32)
    band[2:4, 1:5] = [[-12.5, 0.0, 3.25, 35.0], [-70.0, 1.0, 2.0, np.nan]]
    planes = read_image(_tiff(band, extratags=[(42113, "s", 0, "-9999", True)]), channels="native")
    assert planes.nodata == -9999.0 and planes.channels == ("L",)
    assert int((planes.data == -9999.0).sum()) == 6 * 7 - 8
    rgb = read_image(_tiff(np.stack([band] * 3, -1), photometric="rgb"), channels="native")
    assert rgb.channels == ("R", "G", "B") and rgb.nodata is None and rgb.dtype == np.float32


def test_ct_slices_keep_their_hounsfield_units():
    hu = np.linspace(-1024, 3071, 32 * 32).astype(np.int16).reshape(32, 32)
    planes = read_image(_tiff(hu, compression="zlib", predictor=2))
    assert planes.dtype == np.int16 and planes.channels == ("R", "G", "B")   # gray -> three equal planes
    assert int(planes.data.min()) == -1024 and int(planes.data.max()) == 3071
    np.testing.assert_array_equal(planes.data[1], hu)


def test_what_cannot_be_done_exactly_on_such_data_is_refused_by_name():
    rgb = _values(np.float32, (4, 4, 3), 0)
    with pytest.raises(DecodeError, match="luma of float32"):
        read_image(_tiff(rgb, photometric="rgb"), channels="gray")
    rgba = np.concatenate([rgb, np.ones((4, 4, 1), np.float32)], -1)
    data = _tiff(rgba, photometric="rgb", extrasamples=["unassalpha"])
    with pytest.raises(DecodeError, match="alpha compositing of float32") as err:
        read_image(data, alpha="composite")
    assert err.value.kind == "unsupported"
    assert read_image(data, alpha="keep", channels="native").channels == ("R", "G", "B", "A")
    with pytest.raises(DecodeError, match="32-bit float samples with MINISWHITE"):
        read_image(_tiff(np.zeros((3, 3), np.float32), photometric="miniswhite"))


def test_float_stacks_of_pages_and_signed_jpeg2000_keep_their_values():
    import imagecodecs

    stack = _values(np.float32, (3, 8, 9), 4)
    imagej = _tiff(stack, imagej=True, metadata={"axes": "CYX", "Labels": ["dapi", "gfp", "rfp"]})
    planes = read_image(imagej, channels="native")
    assert planes.channels == ("dapi", "gfp", "rfp") and _same(np.ascontiguousarray(planes.data), stack)
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as writer:   # a plain stack of float pages: planes when asked
        for page in stack:
            writer.write(page)
    planes = read_image(buf.getvalue(), channels="native", pages="planes")
    assert planes.channels == ("S0", "S1", "S2") and _same(np.ascontiguousarray(planes.data), stack)
    signed = np.arange(-300, 300, dtype=np.int16).reshape(20, 30)
    planes = read_image(imagecodecs.jpeg2k_encode(signed, level=0), channels="native")
    assert planes.dtype == np.int16 and np.array_equal(planes.data[0], signed)


def test_a_native_store_follows_the_plane_count_most_files_have_float_files_included(tmp_path):
    from PIL import Image

    from cnnpipe.datasets.preprocess import preprocess

    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)).save(tmp_path / "src" / c / f"{i}.png")
        for i in range(3):   # more five-band float files than PNGs: a five-plane float32 store
            (tmp_path / "src" / c / f"f{i}.tif").write_bytes(_tiff(_values(np.float32, (6, 6, 5), i),
                                                                    planarconfig="contig"))
    store = preprocess(tmp_path / "src", tmp_path / "store", size=6, channels="native", workers=1, progress=False)
    assert store.channels == 5 and store.dtype == np.float32 and sum(store.count(s) for s in store.splits) == 6
    assert {s["kind"] for s in store.report["skipped"]} == {"plane_count"}
