"""Folder -> store: layouts, bad files, bit depths, resizing, stable split, atomic write, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil

import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import Image

from cnnpipe.cli import main
from cnnpipe.datasets import preprocess as pp
from cnnpipe.datasets.folders import assign_split
from cnnpipe.datasets.store import StoreWriter, load_store
from cnnpipe.images.decode import DecodeError, read_image
from cnnpipe.images.transform import resize_image

RNG = np.random.default_rng(0)


def png8(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def png16(path, arr):
    """16-bit PNG (gray or RGB) via libpng; Pillow cannot write 16-bit RGB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(imagecodecs.png_encode(np.ascontiguousarray(arr)))
    return path


def rgb8(h, w):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def u16(h, w, c=None):
    shape = (h, w) if c is None else (h, w, c)
    return RNG.integers(0, 65536, shape, dtype=np.uint16)


def palette_png(path, h, w):
    im = Image.fromarray(RNG.integers(0, 6, (h, w), dtype=np.uint8), "P")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0, 9, 99, 199])
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def run(src, out, **kw):
    kw.setdefault("size", (6, 8))
    kw.setdefault("workers", 1)
    kw.setdefault("val_fraction", 0.0)
    kw.setdefault("progress", False)
    return pp.preprocess(src, out, **kw)


def rows_by_source(store, split):
    return dict(zip(store.sources(split), store.images(split)))


# ---------------------------------------------------------------- what gets stored and reported

def test_bad_files_are_reported_and_good_ones_stored(tmp_path):
    src = tmp_path / "src"
    good = [png8(src / "a" / "one.png", rgb8(6, 8)),
            png8(src / "a" / "deep" / "er" / "two.png", rgb8(6, 8)),
            png8(src / "b" / "three.png", rgb8(6, 8)),
            png8(src / "b" / "four.jpg", rgb8(6, 8))]
    whole = io.BytesIO()
    Image.fromarray(rgb8(30, 40)).save(whole, "PNG")
    (src / "b" / "truncated.png").write_bytes(whole.getvalue()[:len(whole.getvalue()) // 2])
    (src / "a" / "zero.png").write_bytes(b"")
    (src / "a" / "notes.png").write_text("this is text, not an image\n")
    (src / "a" / "._one.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    (src / "a" / ".hidden.png").write_bytes(whole.getvalue())
    (src / "b" / "loop").symlink_to(src / "b")
    (src / "b" / "up").symlink_to(src)
    (src / "b" / "dangling.png").symlink_to(src / "missing.png")
    (src / "empty_class").mkdir()
    (src / "README.txt").write_text("loose file\n")
    (src / "a" / "link_to_one.png").symlink_to(src / "a" / "one.png")  # followed: a duplicate

    store = run(src, tmp_path / "out", workers=2)

    assert store.classes == ["a", "b"]  # the empty folder is not a class
    stored = set(store.sources("train"))
    assert stored == {"a/one.png", "a/deep/er/two.png", "a/link_to_one.png", "b/three.png", "b/four.jpg"}
    rows = rows_by_source(store, "train")
    for p in good:
        np.testing.assert_array_equal(rows[p.relative_to(src).as_posix()], read_image(p).hwc())
    np.testing.assert_array_equal(store.labels("train"), [0, 0, 0, 1, 1])

    rep = store.report
    kinds = {s["path"]: s["kind"] for s in rep["skipped"]}
    assert kinds == {
        "b/truncated.png": "corrupt", "a/zero.png": "empty", "a/notes.png": "not_image",
        "a/._one.png": "appledouble", "a/.hidden.png": "hidden", "b/loop": "symlink_loop",
        "b/up": "symlink_loop", "b/dangling.png": "broken_link", "README.txt": "outside_class",
    }
    reasons = {s["path"]: s["reason"] for s in rep["skipped"]}
    with pytest.raises(DecodeError) as exc:  # the reason is the decoder's own message, the path relative to SRC
        read_image(src / "b" / "truncated.png")
    assert reasons["b/truncated.png"] == str(exc.value).removeprefix(f"{src}/")
    assert reasons["a/zero.png"].endswith("empty file (0 bytes)")
    assert "not a recognised image" in reasons["a/notes.png"]
    for name in ("a/notes.png", "a/zero.png"):  # probe-time reasons are the decoder's words too
        with pytest.raises(DecodeError) as exc:
            read_image(src / name)
        assert reasons[name] == str(exc.value).removeprefix(f"{src}/")
    assert rep["empty_class_folders"] == ["empty_class"]
    assert rep["counts"]["images_stored"] == 5 and rep["counts"]["skipped"] == 9
    assert [[f["path"] for f in d["files"]] for d in rep["duplicates"]] == [["a/link_to_one.png", "a/one.png"]]
    assert store.meta["counts"]["train"] == {"total": 5, "per_class": {"a": 3, "b": 2}}


def test_mixed_formats_at_target_size_read_back_exactly(tmp_path):
    """No resize needed: every store row equals the decoded file, bit for bit (rgb and gray)."""
    src = tmp_path / "src"
    files = [png8(src / "a" / "rgb.png", rgb8(6, 8)),
             png8(src / "a" / "gray.png", RNG.integers(0, 256, (6, 8), dtype=np.uint8)),
             png8(src / "a" / "rgba.png", RNG.integers(0, 256, (6, 8, 4), dtype=np.uint8)),
             palette_png(src / "b" / "pal.png", 6, 8),
             png8(src / "b" / "pic.bmp", rgb8(6, 8))]
    for channels in ("rgb", "gray"):
        store = run(src, tmp_path / channels, channels=channels)
        assert store.dtype == np.uint8 and store.channels == (3 if channels == "rgb" else 1)
        rows = rows_by_source(store, "train")
        assert len(rows) == len(files)
        for p in files:
            np.testing.assert_array_equal(rows[p.relative_to(src).as_posix()],
                                          read_image(p, channels=channels).hwc())


def test_16bit_stays_16bit_and_8bit_is_promoted_x257(tmp_path):
    src = tmp_path / "src"
    a8 = rgb8(6, 8)
    g16 = u16(6, 8)
    c16 = u16(6, 8, 3)
    t16 = u16(6, 8, 3)
    png8(src / "a" / "eight.png", a8)
    png16(src / "a" / "gray16.png", g16)
    png16(src / "b" / "rgb16.png", c16)
    (src / "b").mkdir(exist_ok=True)
    tifffile.imwrite(src / "b" / "rgb16.tif", t16, photometric="rgb")
    store = run(src, tmp_path / "out")
    assert store.dtype == np.uint16 and store.bit_depth == 16
    rows = rows_by_source(store, "train")
    np.testing.assert_array_equal(rows["a/eight.png"], a8.astype(np.uint16) * 257)
    assert rows["a/eight.png"].max() <= 65535 and (rows["a/eight.png"] % 257 == 0).all()
    np.testing.assert_array_equal(rows["a/gray16.png"], np.repeat(g16[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(rows["b/rgb16.png"], c16)
    np.testing.assert_array_equal(rows["b/rgb16.tif"], t16)
    # mean/std in raw units of the train split (here: everything)
    allpix = np.stack(list(rows.values())).reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(store.mean, allpix.mean(0), rtol=1e-12)
    np.testing.assert_allclose(store.std, allpix.std(0), rtol=1e-12)


def test_resize_keeps_16bit_precision(tmp_path):
    """A 16-bit ramp halved in width: interior columns are exact means of two source columns."""
    src = tmp_path / "src"
    x = np.arange(64, dtype=np.int64)
    ramp = np.broadcast_to(1000 * x + 123, (16, 64)).astype(np.uint16)
    png16(src / "a" / "ramp.png", ramp)
    png16(src / "b" / "flat.png", np.full((16, 64), 40000, np.uint16))
    store = run(src, tmp_path / "out", size=(8, 32), resize="stretch")
    rows = rows_by_source(store, "train")
    out = rows["a/ramp.png"][:, :, 0].astype(np.int64)
    j = np.arange(4, 28)  # away from the borders, where the kernel is clipped
    expected = (1000 * (2 * j) + 123 + 1000 * (2 * j + 1) + 123) // 2  # 2000 j + 623
    np.testing.assert_array_equal(out[:, j], np.broadcast_to(expected, (8, len(j))))
    assert (out % 257 != 0).any()  # not squeezed through 8 bits
    # a constant 40000 stays 40000 (through 8 bits it would become 156 * 257 = 40092)
    assert (rows["b/flat.png"] == 40000).all()


def test_resize_modes(tmp_path):
    src = tmp_path / "src"
    wide = rgb8(6, 12)
    tall = rgb8(3, 4)
    png8(src / "a" / "wide.png", wide)
    png8(src / "b" / "small.png", tall)
    png8(src / "b" / "flat.png", np.full((12, 20, 3), 77, np.uint8))

    crop = rows_by_source(run(src, tmp_path / "crop", size=(6, 6), resize="crop"), "train")
    np.testing.assert_array_equal(crop["a/wide.png"], wide[:, 3:9])  # same height: an exact centre cut
    assert (crop["b/flat.png"] == 77).all() and crop["b/small.png"].shape == (6, 6, 3)

    pad = rows_by_source(run(src, tmp_path / "pad", size=(12, 12), resize="pad"), "train")
    assert (pad["a/wide.png"][:3] == 0).all() and (pad["a/wide.png"][9:] == 0).all()
    assert pad["a/wide.png"][3:9].any(axis=(0, 2)).all()  # the image fills the full width
    # 12x20 -> 7x12 (0.6 x 12 = 7.2 rows), centred: rows 2..8
    assert (pad["b/flat.png"][2:9] == 77).all()
    assert (pad["b/flat.png"][:2] == 0).all() and (pad["b/flat.png"][9:] == 0).all()

    pad_exact = rows_by_source(run(src, tmp_path / "pad2", size=(6, 16), resize="pad"), "train")
    np.testing.assert_array_equal(pad_exact["a/wide.png"][:, 2:14], wide)  # fits already: placed unchanged
    assert (pad_exact["a/wide.png"][:, :2] == 0).all() and (pad_exact["a/wide.png"][:, 14:] == 0).all()

    stretch = rows_by_source(run(src, tmp_path / "stretch", size=(5, 7), resize="stretch"), "train")
    assert stretch["a/wide.png"].shape == (5, 7, 3) and (stretch["b/flat.png"] == 77).all()


# ---------------------------------------------------------------- layouts and splits

def test_split_layout_keeps_folder_splits(tmp_path):
    src = tmp_path / "src"
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        for cls in ("cat", "dog"):
            for i in range(n):
                png8(src / split / cls / f"{i}.png", rgb8(6, 8))
    (src / "train" / "bird").mkdir()  # empty class folder in one split
    (src / "notes.png").write_bytes(b"")  # loose file beside the split folders
    store = run(src, tmp_path / "out", val_fraction=0.5, test_fraction=0.2)  # fractions ignored
    assert store.meta["layout"] == "splits" and store.splits == ["train", "val", "test"]
    assert store.classes == ["cat", "dog"]
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        assert store.meta["counts"][split]["per_class"] == {"cat": n, "dog": n}
        assert all(s.startswith(f"{split}/") for s in store.sources(split))
        np.testing.assert_array_equal(store.labels(split), [0] * n + [1] * n)
    assert store.report["empty_class_folders"] == ["train/bird"]
    assert [(s["path"], s["kind"]) for s in store.report["skipped"]] == [("notes.png", "outside_class")]


def _split_map(store):
    return {p: s for s in store.splits for p in store.sources(s)}


def test_split_is_stable_and_deterministic(tmp_path):
    src = tmp_path / "src"
    for cls in ("a", "b"):
        for i in range(24):
            png8(src / cls / f"{i:03d}.png", RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    kw = dict(size=(6, 8), val_fraction=0.3, test_fraction=0.2, split="hash")
    first = _split_map(run(src, tmp_path / "s1", **kw))
    assert set(first.values()) == {"train", "val", "test"}
    assert _split_map(run(src, tmp_path / "s2", **kw)) == first
    # split="hash": each file's split is the hash of (seed, class, path in class) mapped into [0, 1)
    for rel, split in first.items():
        cls, name = rel.split("/", 1)
        u = int.from_bytes(hashlib.blake2b(f"0\x00{cls}\x00{name}".encode(), digest_size=8).digest(), "big") / 2**64
        assert split == ("test" if u < 0.2 else "val" if u < 0.5 else "train")
    # more files: none of the old ones moves
    for cls in ("a", "b"):
        for i in range(24, 40):
            png8(src / cls / f"{i:03d}.png", rgb8(6, 8))
    second = _split_map(run(src, tmp_path / "s3", **kw))
    assert len(second) == 80 and {p: second[p] for p in first} == first
    assert _split_map(run(src, tmp_path / "s4", seed=1, **kw)) != second


def test_split_fractions_are_respected():
    names = [f"img_{i}.png" for i in range(4000)]
    splits = [assign_split(7, "cls", n, 0.1, 0.2) for n in names]
    assert abs(splits.count("val") / 4000 - 0.1) < 0.02
    assert abs(splits.count("test") / 4000 - 0.2) < 0.02


def test_duplicates_across_splits_and_classes(tmp_path):
    src = tmp_path / "src"
    img = png8(src / "a" / "x.png", rgb8(6, 8))
    png8(src / "b" / "y.png", rgb8(6, 8))
    # find names whose hash puts the copy in the other split
    split_x = assign_split(0, "a", "x.png", 0.5, 0.0)
    name = next(f"copy{i}.png" for i in range(100) if assign_split(0, "b", f"copy{i}.png", 0.5, 0.0) != split_x)
    shutil.copy(img, src / "b" / name)
    store = run(src, tmp_path / "out", val_fraction=0.5, split="hash")
    (dup,) = store.report["duplicates"]
    assert sorted(f["path"] for f in dup["files"]) == ["a/x.png", f"b/{name}"]
    assert dup["cross_split"] and dup["cross_class"]
    assert store.report["cross_split_duplicates"] == [dup]
    assert dup["hash"] == "sha256-128:" + hashlib.sha256(img.read_bytes()).hexdigest()[:32]


# ---------------------------------------------------------------- atomic write and errors

def _two_classes(src, n=4, size=(6, 8)):
    for cls in ("a", "b"):
        for i in range(n):
            png8(src / cls / f"{i}.png", rgb8(*size))


def test_interrupt_mid_run_leaves_nothing(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _two_classes(src)
    real_append = StoreWriter.append
    calls = []

    def append_then_interrupt(self, *a, **k):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real_append(self, *a, **k)

    monkeypatch.setattr(StoreWriter, "append", append_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(src, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["src"]
    # an existing store survives an interrupted --overwrite untouched
    monkeypatch.setattr(StoreWriter, "append", real_append)
    before = run(src, tmp_path / "out", size=(4, 4))
    monkeypatch.setattr(StoreWriter, "append", append_then_interrupt)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run(src, tmp_path / "out", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]
    assert load_store(tmp_path / "out").size == (4, 4) == before.size


def test_overwrite_and_errors(tmp_path):
    src = tmp_path / "src"
    with pytest.raises(ValueError, match="folder not found"):
        run(src, tmp_path / "out")
    (src / "a").mkdir(parents=True)
    (src / "a" / "x.png").write_text("text")
    with pytest.raises(ValueError, match="no images in"):
        run(src, tmp_path / "out")
    png8(src / "a" / "y.png", rgb8(6, 8))
    with pytest.raises(ValueError, match=r"only one class \('a'\)"):
        run(src, tmp_path / "out")
    whole = io.BytesIO()
    Image.fromarray(rgb8(6, 8)).save(whole, "PNG")
    (src / "b").mkdir()
    (src / "b" / "cut.png").write_bytes(whole.getvalue()[:-20])
    with pytest.raises(ValueError, match=r"no image could be decoded for class\(es\) b.*cut.png"):
        run(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    png8(src / "b" / "z.png", rgb8(6, 8))
    run(src, tmp_path / "out")
    with pytest.raises(ValueError, match="already exists"):
        run(src, tmp_path / "out")
    store = run(src, tmp_path / "out", size=(3, 3), overwrite=True)
    assert store.size == (3, 3) and sorted(os.listdir(tmp_path)) == ["out", "src"]
    for bad, match in (({"size": "0x3"}, "size"), ({"val_fraction": 1.2}, "val_fraction"),
                       ({"val_fraction": 0.6, "test_fraction": 0.4}, "below 1"), ({"resize": "fit"}, "resize"),
                       ({"channels": "cmyk"}, "channels")):
        with pytest.raises(ValueError, match=match):
            run(src, tmp_path / "out2", **bad)
    with pytest.raises(ValueError, match="must not be SRC"):
        run(src, src / "store")


def test_header_guess_wrong_restarts_as_uint16(tmp_path, monkeypatch):
    """If a file decodes as 16-bit after its header looked 8-bit, the store is redone as uint16."""
    src = tmp_path / "src"
    a8 = rgb8(6, 8)
    g16 = u16(6, 8, 3)
    png8(src / "a" / "x.png", a8)
    png16(src / "b" / "y.png", g16)
    import cnnpipe.datasets.convert as convert

    monkeypatch.setattr(convert, "_header_dtype", lambda *args: "uint8")
    store = run(src, tmp_path / "out")
    assert store.dtype == np.uint16
    rows = rows_by_source(store, "train")
    np.testing.assert_array_equal(rows["a/x.png"], a8.astype(np.uint16) * 257)
    np.testing.assert_array_equal(rows["b/y.png"], g16)


def test_cli(tmp_path, capsys):
    src = tmp_path / "src"
    _two_classes(src, n=3, size=(10, 10))
    (src / "a" / "junk.png").write_bytes(b"")
    out = tmp_path / "out"
    assert main(["preprocess", str(src), str(out), "--size", "8x6", "--resize", "pad", "--workers", "1",
                 "--val-fraction", "0", "--channels", "gray"]) == 1   # the store is written; one file failed
    printed = capsys.readouterr().out
    assert "6 images, 2 classes, 8x6x1 uint8" in printed and "skipped 1 files (empty 1)" in printed
    assert printed.strip().splitlines()[-1].startswith("done in ") and "; 1 input file(s) failed; " in printed
    store = load_store(out)
    assert store.size == (8, 6) and store.channels == 1 and len(store) == 6
    assert json.loads((out / "report.json").read_text())["skipped"][0]["path"] == "a/junk.png"
    assert main(["preprocess", str(src), str(out), "--size", "8"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and len(err.strip().splitlines()) == 1
    assert main(["preprocess", str(tmp_path / "nope"), str(out), "--size", "8"]) == 2
    assert "folder not found" in capsys.readouterr().err


def test_files_skipped_by_design_are_not_failures(tmp_path, capsys):
    src = tmp_path / "src"
    _two_classes(src, n=3, size=(10, 10))
    (src / "a" / ".hidden.png").write_bytes(b"")      # hidden, AppleDouble and loose files are ignored
    (src / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07")
    (src / "README.txt").write_text("about this data\n")
    assert main(["preprocess", str(src), str(tmp_path / "out"), "--size", "8", "--workers", "1"]) == 0
    assert "failed" not in capsys.readouterr().out
    kinds = sorted(s["kind"] for s in load_store(tmp_path / "out").report["skipped"])
    assert kinds == ["appledouble", "hidden", "outside_class"]


def _jpeg(path, arr, orientation=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    kw = {"quality": 95}
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    Image.fromarray(arr).save(path, **kw)
    return path


def test_jpeg_shrinks_at_reduced_dct_scale_like_a_full_decode(tmp_path):
    """JPEGs shrunk >= 2x decode at 1/2..1/8 scale; the result matches decode + resize closely."""
    y, x = np.mgrid[0:64, 0:96]
    smooth = np.stack([x * 2.5, y * 3.5, (x + y) * 1.5], -1).clip(0, 255).astype(np.uint8)
    upright = _jpeg(tmp_path / "a" / "up.jpg", smooth)
    # stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view)
    rotated = _jpeg(tmp_path / "b" / "side.jpg", np.ascontiguousarray(np.rot90(smooth, 1)), orientation=6)
    gray = _jpeg(tmp_path / "b" / "gray.jpg", smooth[:, :, 0])
    from cnnpipe.images.transform import ImageSpec, _jpeg_reduce

    spec = ImageSpec((16, 16), "crop")
    for path in (upright, rotated, gray):
        data = path.read_bytes()
        assert _jpeg_reduce(data, spec) == 4  # 64x96 covers 16x16 at 1/4 (16x24), not at 1/8
        fast = read_image(data, reduce=4).hwc()
        assert fast.dtype == np.uint8 and fast.shape == (16, 24, 3)  # orientation applied after the scaled decode
        got = resize_image(fast, (16, 16), "crop").astype(np.int64)
        full = read_image(path).hwc()
        ref = resize_image(np.ascontiguousarray(full), (16, 16), "crop").astype(np.int64)
        assert np.abs(got - ref).mean() < 3 and np.abs(got - ref).max() <= 16
    # no 2x reduction possible: the full-size decoder is used
    assert _jpeg_reduce(upright.read_bytes(), ImageSpec((40, 40), "crop")) == 1
    assert _jpeg_reduce(upright.read_bytes(), ImageSpec((8, 8), "pad")) == 8  # pad needs 8x12 only
    # truncated: left to the decoder, whose message lands in the report
    cut = tmp_path / "b" / "cut.jpg"
    cut.write_bytes(upright.read_bytes()[:-100])
    store = run(tmp_path, tmp_path.parent / (tmp_path.name + "-out"), size=(16, 16))
    assert [s["path"] for s in store.report["skipped"]] == ["b/cut.jpg"]
    with pytest.raises(DecodeError) as exc:
        read_image(cut)
    assert store.report["skipped"][0]["reason"] == str(exc.value).removeprefix(f"{tmp_path}/")


def test_workers_do_not_rerun_the_callers_script(tmp_path):
    """A script that imports jax at top level must not drag it into every decoding worker."""
    import subprocess
    import sys

    script = tmp_path / "train_script.py"
    script.write_text(
        "import os, sys\n"
        "open(os.path.join(sys.argv[1], f'ran-{os.getpid()}'), 'w').close()  # top level: runs on import\n"
        "if __name__ == '__main__':\n"
        "    from cnnpipe.datasets.workers import make_pool\n"
        "    pool = make_pool(2)\n"
        "    assert pool.map(eval, [\"'jax' in __import__('sys').modules\"] * 4) == [False] * 4\n"
        "    pool.close()\n")
    marks = tmp_path / "marks"
    marks.mkdir()
    res = subprocess.run([sys.executable, str(script), str(marks)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert len(os.listdir(marks)) == 1  # only the parent ran the script
