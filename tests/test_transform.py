"""Resizing from any size to any size, and the one image path shared by preprocess and predict."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnpipe.images.transform import (
    RESIZE_MODES,
    ImageSpec,
    NeedsSixteenBit,
    _needed_source_size,
    prepare_bytes,
    resize_image,
)

sizes = st.integers(1, 600)
targets = st.integers(1, 256)
dtypes = st.sampled_from([np.uint8, np.uint16])
planes = st.integers(1, 4)
modes = st.sampled_from(RESIZE_MODES)


def _image(h: int, w: int, c: int, dtype, seed: int) -> np.ndarray:
    top = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, top + 1, (h, w, c), dtype=dtype)


def test_the_crop_sizes_that_failed_before():
    """49x50 -> 16x16 raised "box offset can't be negative" (a float box a hair below 0)."""
    for h, w in [(49, 50), (50, 49), (333, 500), (7, 1000), (1, 1), (1, 600), (599, 601)]:
        out = resize_image(np.zeros((h, w, 3), np.uint8), (16, 16), "crop")
        assert out.shape == (16, 16, 3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=sizes, w=sizes, th=targets, tw=targets, dtype=dtypes, c=planes, mode=modes, seed=st.integers(0, 9))
# Pillow's 8-bit reduce by a factor over ~200 turned a constant 255 into 254
@example(h=544, w=544, th=1, tw=1, dtype=np.uint8, c=1, mode="crop", seed=1)
@example(h=270, w=544, th=1, tw=1, dtype=np.uint8, c=3, mode="pad", seed=1)
def test_any_size_to_any_target(h, w, th, tw, dtype, c, mode, seed):
    """Shape and dtype always right; a constant image stays that constant wherever the image lands
    (the filter weights sum to 1, so no value can appear that was not there)."""
    value = np.iinfo(dtype).max if seed % 2 else int(np.iinfo(dtype).max * seed / 10)
    img = np.full((h, w, c), value, dtype)
    out = resize_image(img, (th, tw), mode)
    assert out.shape == (th, tw, c) and out.dtype == dtype
    if mode == "pad":
        s = min(th / h, tw / w)
        nh, nw = min(th, max(1, round(h * s))), min(tw, max(1, round(w * s)))
        y0, x0 = (th - nh) // 2, (tw - nw) // 2
        inner = out[y0:y0 + nh, x0:x0 + nw]
        assert (inner == value).all()
        assert int(out.sum(dtype=np.uint64)) == value * nh * nw * c  # zeros everywhere else
    else:
        assert (out == value).all()


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), th=targets, tw=targets, dtype=dtypes, c=planes, mode=modes,
       seed=st.integers(0, 99))
def test_random_images_keep_dtype_and_range(h, w, th, tw, dtype, c, mode, seed):
    img = _image(h, w, c, dtype, seed)
    out = resize_image(img, (th, tw), mode)
    assert out.shape == (th, tw, c) and out.dtype == dtype
    if mode != "pad" and (th, tw) != (h, w) and h * w > 1:
        # bicubic overshoots a little at edges, but never past the dtype's range (clipped, not wrapped)
        assert out.min() >= 0 and out.max() <= np.iinfo(dtype).max


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 256), w=st.integers(1, 256), dtype=dtypes, c=planes, mode=modes, seed=st.integers(0, 9))
def test_matching_size_is_exact_identity(h, w, dtype, c, mode, seed):
    img = _image(h, w, c, dtype, seed)
    out = resize_image(img, (h, w), mode)
    assert out is img or np.array_equal(out, img)


@settings(max_examples=60, deadline=None)
@given(h=sizes, w=sizes, th=targets, tw=targets)
def test_crop_of_a_larger_image_by_pure_cutting_is_a_slice(h, w, th, tw):
    """When no scaling is needed (one side equal, the other larger) the crop is an exact centre slice."""
    h2, w2 = max(h, th), tw  # width matches, height at least the target
    img = _image(h2, w2, 1, np.uint16, 0)
    if max(th / h2, tw / w2) == 1.0:
        y0 = (h2 - th) // 2
        np.testing.assert_array_equal(resize_image(img, (th, tw), "crop"), img[y0:y0 + th])


def test_uint8_planes_resized_one_at_a_time_equal_rgb_at_once():
    """2- and 4-plane uint8 images go through Pillow's 8-bit filter plane by plane: the same
    numbers as its RGB path gives for the same planes."""
    img = _image(37, 53, 4, np.uint8, 3)
    rgb = resize_image(np.ascontiguousarray(img[:, :, :3]), (16, 20), "crop")
    four = resize_image(img, (16, 20), "crop")
    np.testing.assert_array_equal(four[:, :, :3], rgb)


def test_16bit_resize_keeps_16bit_precision():
    """A ramp of 16-bit values that differ below 256 keeps those differences (no 8-bit trip)."""
    ramp = (np.arange(40 * 40, dtype=np.uint16).reshape(40, 40, 1) + 1000)
    out = resize_image(ramp, (20, 20), "stretch")
    assert len(np.unique(out)) > 300 and np.all(np.unique(out // 256) <= 1000 // 256 + 7)


def test_needed_source_size():
    assert _needed_source_size(64, 96, (16, 16), "crop") == (16, 24)
    assert _needed_source_size(64, 96, (16, 16), "pad") == (11, 16)
    assert _needed_source_size(64, 96, (16, 16), "stretch") == (16, 16)


# ---------------------------------------------------------------- the chain

def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_prepare_bytes_hand_checked_chain():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = prepare_bytes(_png(gray), ImageSpec((3, 4), "crop", "rgb", 16), "g.png")
    assert out.pixels.dtype == np.uint16 and out.pixels.shape == (3, 4, 3)
    np.testing.assert_array_equal(out.pixels[:, :, 1], gray.astype(np.uint16) * 257)
    assert out.planes == ("R", "G", "B")
    assert any("x257" in n for n in out.notes) and any("expanded" in n for n in out.notes)
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 128, 10
    luma = prepare_bytes(_png(rgb), ImageSpec((2, 2), channels="gray"), "c.png").pixels
    # Pillow's fixed-point ITU-R 601 weights: (255*19595 + 128*38470 + 10*7471 + 32768) >> 16
    assert luma.shape == (2, 2, 1) and (luma == (255 * 19595 + 128 * 38470 + 10 * 7471 + 32768) >> 16).all()


def test_prepare_bytes_refuses_what_it_cannot_match():
    import imagecodecs

    sixteen = imagecodecs.png_encode(np.full((4, 4, 3), 40000, np.uint16))
    with pytest.raises(NeedsSixteenBit, match="x.png: 16-bit image; the store takes 3 plane"):
        prepare_bytes(sixteen, ImageSpec((4, 4)), "x.png")
    with pytest.raises(ValueError, match="x.png: image has 3 plane"):
        prepare_bytes(_png(np.zeros((4, 4, 3), np.uint8)), ImageSpec((4, 4), channels="native", planes=5), "x.png")


def test_a_models_spec_follows_its_plane_names_then_its_plane_count():
    from cnnpipe.images.transform import spec_for_model

    by_names = {("R", "G", "B"): "rgb", ("L",): "gray", ("S0", "S1", "S2"): "native", ("R", "G", "B", "A"): "native",
                ("L", "A"): "native", ("S0",): "native"}
    for names, mode in by_names.items():
        spec = spec_for_model(len(names), 16, (4, 5), planes=list(names))
        assert spec.channels == mode and spec.num_planes == len(names), names
    # runs that did not record names: 3 planes are RGB, 1 is luma, any other count native
    assert [spec_for_model(n, 8, (4, 5)).channels for n in (1, 2, 3, 4, 5)] == ["gray", "native", "rgb", "native",
                                                                                 "native"]
    assert spec_for_model(3, 16, (4, 5)).describe() == "the model expects 3 plane(s) R/G/B at 16-bit, 4x5"
    assert spec_for_model(3, 16, (4, 5), planes=["S0", "S1", "S2"]).describe() == \
        "the model expects 3 plane(s) at 16-bit, 4x5"
