"""TIFF kinds that real files use and tifffile's writer will not make: 1/2/4-bit palette images with
short colour maps (single and multi-page) and strip byte counts that run past the end of the file.

Each file is made byte by byte (tests/tiff_craft.py) and checked against tifffile's and Pillow's
readings of the same bytes, never against cnnpipe's own earlier output.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from tiff_craft import Page, craft_tiff

from cnnpipe.images.decode import DecodeError, read_image

_PALETTE, _MINISBLACK = 3, 1


def _colormap(draw, bits: int, eight_bit: bool) -> np.ndarray:
    n = 2 ** bits
    if eight_bit:  # 8-bit values stored x257, as most writers do
        return np.array(draw(st.lists(st.integers(0, 255), min_size=3 * n, max_size=3 * n)),
                        np.uint16).reshape(3, n) * 257
    return np.array(draw(st.lists(st.integers(0, 65535), min_size=3 * n, max_size=3 * n)), np.uint16).reshape(3, n)


@st.composite
def palette_files(draw):
    bits = draw(st.sampled_from([1, 2, 4]))
    h, w = draw(st.integers(1, 19)), draw(st.integers(1, 19))
    eight_bit = draw(st.booleans())
    cmap = _colormap(draw, bits, eight_bit)
    high, low = cmap >> 8, cmap & 0xFF
    eight_bit = bool(np.all(low == 0) or np.all(low == high))  # a drawn 16-bit map can be 8-bit values too
    n_pages = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    pages = [Page(rng.integers(0, 2 ** bits, (h, w)).astype(np.uint8), bits, _PALETTE, cmap,
                  rows_per_strip=draw(st.integers(1, h))) for _ in range(n_pages)]
    return craft_tiff(pages, data_last=draw(st.booleans())), pages[0].samples, cmap, eight_bit, n_pages


@given(palette_files())
@settings(max_examples=60, deadline=None)
def test_low_bit_palette_tiff_expands_through_its_colour_map_as_tifffile_and_pillow_read_it(case):
    data, index, cmap, eight_bit, n_pages = case
    with tifffile.TiffFile(io.BytesIO(data)) as tif:  # the independent readings of the same bytes
        ref_index = tif.pages.first.asarray().astype(np.uint8)
        ref_cmap = tif.pages.first.colormap
    np.testing.assert_array_equal(ref_index, index)
    planes = read_image(data)
    assert planes.channels == ("R", "G", "B")
    if eight_bit:  # the 8-bit map rule: Pillow's reading, 8-bit RGB
        assert planes.bit_depth == 8
        np.testing.assert_array_equal(planes.hwc(), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    else:  # any other map: its 16-bit entries exactly
        assert planes.bit_depth == 16 and planes.data.dtype == np.uint16
        np.testing.assert_array_equal(planes.hwc(), ref_cmap.T[ref_index])
    assert (f"{n_pages} pages; page 1 kept" in planes.warnings) == (n_pages > 1)


def test_one_bit_palette_pixel_values_known_answer():
    index = np.array([[0, 1, 1], [1, 0, 0]], np.uint8)
    cmap = np.array([[0, 65535], [1000, 20000], [65535, 0]], np.uint16)  # 16-bit entries: kept exactly
    planes = read_image(craft_tiff([Page(index, 1, _PALETTE, cmap)] * 2))
    assert planes.bit_depth == 16 and planes.warnings == ("2 pages; page 1 kept",)
    np.testing.assert_array_equal(planes.data[:, 0, :], [[0, 65535, 65535], [1000, 20000, 20000], [65535, 0, 0]])


def test_palette_index_beyond_a_short_colour_map_is_corrupt():
    index = np.array([[0, 3]], np.uint8)  # 2-bit indices, but a map of 2 entries
    data = craft_tiff([Page(index, 2, _PALETTE, np.zeros((3, 2), np.uint16))])
    with pytest.raises(DecodeError, match="corrupt TIFF|palette index 3 beyond"):
        read_image(data)


@st.composite
def overshooting_files(draw):
    bits = draw(st.sampled_from([1, 8, 16]))
    h, w = draw(st.integers(1, 23)), draw(st.integers(1, 23))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    samples = rng.integers(0, 2 ** bits, (h, w)).astype(np.uint16 if bits == 16 else np.uint8)
    rps = draw(st.integers(1, h))
    n_strips = -(-h // rps)
    extra = [0] * (n_strips - 1) + [draw(st.integers(1, 10**6))]  # the last strip's count overshoots
    page = Page(samples, bits, _MINISBLACK, rows_per_strip=rps, extra_byte_counts=extra)
    return craft_tiff([page], data_last=True), samples, bits


@given(overshooting_files())
@settings(max_examples=60, deadline=None)
def test_byte_count_past_the_end_decodes_with_a_warning_when_the_needed_bytes_are_there(case):
    data, samples, bits = case
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        assert tif.pages.first.databytecounts[-1] + tif.pages.first.dataoffsets[-1] > len(data)
        ref = tif.pages.first.asarray()
    np.testing.assert_array_equal(ref.astype(samples.dtype), samples)  # tifffile reads the bytes the image needs
    planes = read_image(data, channels="native")
    want = samples.astype(np.uint16) * 255 if bits == 1 else samples  # 1-bit gray scales to 0..255
    np.testing.assert_array_equal(planes.data[0], want)
    assert any("runs past the end of the file" in w and "bytes the image needs are present" in w
               for w in planes.warnings), planes.warnings


@pytest.mark.parametrize("layout", ["strips", "tiles", "planar"])
def test_uncompressed_tiff_missing_needed_bytes_stays_truncated(layout):
    rng = np.random.default_rng(5)
    arr = rng.integers(0, 65536, (40, 48, 3), dtype=np.uint16)
    kw = {"strips": {"rowsperstrip": 7}, "tiles": {"tile": (16, 16)}, "planar": {"planarconfig": "separate"}}[layout]
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.moveaxis(arr, -1, 0) if layout == "planar" else arr, photometric="rgb",
                     metadata=None, **kw)
    data = buf.getvalue()
    np.testing.assert_array_equal(read_image(data, channels="native").hwc(), arr)
    for cut in (1, 2, 50, len(data) // 3):
        with pytest.raises(DecodeError, match="truncated TIFF") as err:
            read_image(data[:-cut], channels="native")
        assert err.value.kind == "corrupt"
