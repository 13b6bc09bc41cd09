"""The store format: writer (atomic, shrink in place), reader (memory-mapped, clear errors)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnpipe.datasets.store import StoreWriter, _npy_shrink, build_meta, check_output, load_store


def _meta(n_train: int, n_val: int, dtype: str = "uint8") -> dict:
    counts = {"train": {"total": n_train, "per_class": {"a": n_train, "b": 0}},
              "val": {"total": n_val, "per_class": {"a": 0, "b": n_val}}}
    return build_meta(classes=["a", "b"], dtype=dtype, size=(4, 3), channel_names=["R", "G", "B"],
                      splits=["train", "val"], counts=counts, mean=[1.0, 2.0, 3.0], std=[1.0, 1.0, 1.0])


def _write(out, imgs_train, imgs_val, dtype="uint8", capacity_extra=0, overwrite=False):
    with StoreWriter(out, overwrite=overwrite) as w:
        w.create_split("train", len(imgs_train) + capacity_extra, (4, 3), 3, dtype)
        w.create_split("val", len(imgs_val), (4, 3), 3, dtype)
        for i, im in enumerate(imgs_train):
            w.append("train", im, 0, f"a/{i}.png")
        for i, im in enumerate(imgs_val):
            w.append("val", im, 1, f"b/{i}.png")
        w.commit(_meta(len(imgs_train), len(imgs_val), dtype), {"skipped": []})


def _imgs(n, dtype=np.uint8, start=0):
    return [np.arange(36, dtype=dtype).reshape(4, 3, 3) + start + i for i in range(n)]


def test_round_trip_memory_mapped(tmp_path):
    out = tmp_path / "store"
    train, val = _imgs(5, np.uint16, 1000), _imgs(2, np.uint16)
    _write(out, train, val, dtype="uint16")
    st = load_store(out)
    assert st.classes == ["a", "b"] and st.splits == ["train", "val"]
    assert st.size == (4, 3) and st.channels == 3 and st.bit_depth == 16 and st.dtype == np.uint16
    imgs = st.images("train")
    assert isinstance(imgs, np.memmap) and imgs.shape == (5, 4, 3, 3) and imgs.dtype == np.uint16
    np.testing.assert_array_equal(imgs, np.stack(train))
    np.testing.assert_array_equal(st.images("val"), np.stack(val))
    assert st.labels("train").dtype == np.int32
    np.testing.assert_array_equal(st.labels("val"), [1, 1])
    assert st.sources("val") == ["b/0.png", "b/1.png"]
    assert st.mean == [1.0, 2.0, 3.0] and st.report == {"skipped": []}
    assert len(st) == 7
    assert not [p for p in os.listdir(tmp_path) if p != "store"]  # no temp dir left


def test_unused_rows_are_cut_in_place(tmp_path):
    out = tmp_path / "store"
    train = _imgs(3)
    _write(out, train, _imgs(1), capacity_extra=4)
    st = load_store(out)
    np.testing.assert_array_equal(st.images("train"), np.stack(train))
    np.testing.assert_array_equal(st.labels("train"), [0, 0, 0])
    header = 128  # small shapes: numpy's 64-byte aligned v1 header
    assert os.path.getsize(out / "train" / "images.npy") == header + 3 * 4 * 3 * 3


@pytest.mark.parametrize("cap,n", [(10000, 9), (1000, 999), (100, 1), (7, 7), (5, 0)])
def test_npy_shrink_matches_numpy(tmp_path, cap, n):
    path = tmp_path / "a.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(cap, 2, 3))
    arr[:] = np.arange(cap * 6, dtype=np.uint16).reshape(cap, 2, 3)
    arr.flush()
    del arr
    _npy_shrink(path, n)
    back = np.load(path)
    np.testing.assert_array_equal(back, np.arange(cap * 6, dtype=np.uint16).reshape(cap, 2, 3)[:n])
    np.testing.assert_array_equal(np.load(path, mmap_mode="r"), back)


def test_empty_split_reads_as_zero_rows(tmp_path):
    out = tmp_path / "store"
    _write(out, _imgs(2), [])
    st = load_store(out)
    assert st.images("val").shape == (0, 4, 3, 3)
    assert st.labels("val").shape == (0,)


def test_interrupted_writer_leaves_nothing(tmp_path):
    out = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        with StoreWriter(out) as w:
            w.create_split("train", 3, (4, 3), 3, "uint8")
            w.append("train", _imgs(1)[0], 0)
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_existing_output_rules(tmp_path):
    out = tmp_path / "store"
    _write(out, _imgs(2), _imgs(1))
    with pytest.raises(ValueError, match="already exists.*--overwrite"):
        _write(out, _imgs(3), _imgs(1))
    _write(out, _imgs(3, start=50), _imgs(1), overwrite=True)
    np.testing.assert_array_equal(load_store(out).images("train"), np.stack(_imgs(3, start=50)))
    assert sorted(os.listdir(tmp_path)) == ["store"]  # old store removed, no temp dirs
    # an empty directory is fine; a non-store directory is never deleted
    empty = tmp_path / "empty"
    empty.mkdir()
    check_output(empty, overwrite=False)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a dataset store"):
        check_output(other, overwrite=True)
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        check_output(afile, overwrite=True)


def test_missing_or_corrupt_store_names_path(tmp_path):
    with pytest.raises(ValueError, match="directory not found"):
        load_store(tmp_path / "nope")
    with pytest.raises(ValueError, match="meta.json is missing"):
        load_store(tmp_path)
    out = tmp_path / "store"
    _write(out, _imgs(2), _imgs(1))
    st = load_store(out)
    with pytest.raises(ValueError, match=r"no split 'test'.*train, val"):
        st.images("test")
    (out / "val" / "images.npy").unlink()
    with pytest.raises(ValueError, match=r"val/images.npy is missing"):
        st.images("val")
    np.save(out / "train" / "labels.npy", np.zeros(5, np.int32))
    with pytest.raises(ValueError, match=r"labels.npy: corrupt store array.*\(2,\) int32"):
        st.labels("train")
    (out / "train" / "images.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="images.npy: corrupt store array"):
        st.images("train")
    meta = json.loads((out / "meta.json").read_text())
    del meta["classes"]
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="key 'classes' is missing"):
        load_store(out)
    (out / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt store metadata"):
        load_store(out)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 1200), cut=st.integers(0, 1200),
       row_shape=st.sampled_from([(), (5,), (16, 16, 3), (8, 8, 1)]))
def test_a_shrunk_array_file_is_byte_for_byte_what_numpy_saves(tmp_path_factory, rows, cut, row_shape):
    import io

    n = min(cut, rows)
    a = np.arange(rows * int(np.prod(row_shape, dtype=np.int64)), dtype=np.uint16).reshape(rows, *row_shape)
    path = tmp_path_factory.mktemp("shrink") / "a.npy"
    np.save(path, a)
    _npy_shrink(path, n)   # what a store whose files failed writes: the same bytes as a store made without them
    want = io.BytesIO()
    np.save(want, a[:n])
    assert path.read_bytes() == want.getvalue()
