"""Bad input and output problems: exit status 2, one line naming the path, nothing left behind;
one bad file never stops a run."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from cnnpipe.cli import main
from cnnpipe.datasets.store import StoreWriter, _host, load_store


def _folder(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (9 + i, 13, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _one_line(capsys) -> str:
    """The one error line (progress lines before it are fine; a traceback or a second error is not)."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith(("scanning:", "decoding:"))]
    assert len(lines) == 1 and "Traceback" not in err and ": error: " in lines[0], err
    return lines[0]


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_out_under_a_regular_file(tmp_path, capsys):
    src = _folder(tmp_path / "src")
    (tmp_path / "file").write_text("x")
    assert main(["preprocess", str(src), str(tmp_path / "file" / "out"), "--size", "8", "--workers", "1"]) == 2
    line = _one_line(capsys)
    assert str(tmp_path / "file") in line and line.startswith("cnnpipe preprocess: error: ")


def test_read_only_output_parent(tmp_path, capsys, monkeypatch):
    """Simulated (the suite may run as root, which ignores permission bits)."""
    src = _folder(tmp_path / "src")
    parent = tmp_path / "ro"
    parent.mkdir()
    real_mkdir = Path.mkdir

    def denied(self, *a, **k):
        if self.parent == parent:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", denied)
    assert main(["preprocess", str(src), str(parent / "out"), "--size", "8", "--workers", "1"]) == 2
    line = _one_line(capsys)
    assert str(parent) in line and "Permission denied" in line


def test_unreadable_source_folder(tmp_path, capsys, monkeypatch):
    src = _folder(tmp_path / "src")
    real_scandir = os.scandir

    def denied(path="."):
        if Path(path) == src:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    assert main(["preprocess", str(src), str(tmp_path / "out"), "--size", "8", "--workers", "1"]) == 2
    assert str(src) in _one_line(capsys)


def test_disk_full_stops_the_run_naming_the_file_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    src = _folder(tmp_path / "src")
    import cnnpipe.datasets.store as store_mod

    real_open = open

    class FullFile:
        """A file on a full disk: every write fails, as the kernel's ENOSPC does."""

        def __init__(self, f):
            self.f = f
            self.closed = False

        def write(self, _data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.closed = True
            self.f.close()

    def full_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return FullFile(f) if str(path).endswith("images.npy") and "w" in mode else f

    monkeypatch.setattr(store_mod, "open", full_open, raising=False)
    assert main(["preprocess", str(src), str(tmp_path / "out"), "--size", "8", "--workers", "1"]) == 2
    line = _one_line(capsys)
    assert "images.npy" in line and "No space left on device" in line
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_workdir_that_is_a_regular_file(tmp_path, capsys):
    (tmp_path / "wd").write_text("x")
    assert main(["train", "--workdir", str(tmp_path / "wd"), "--set", "train.epochs=1",
                 "--set", "data.num_train=64", "--set", "data.num_val=16", "--set", "data.size=[8,8]"]) == 2
    assert str(tmp_path / "wd") in _one_line(capsys)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00", b"[1, 2]"])
def test_corrupt_dataset_json_in_a_run(tmp_path, capsys, content):
    from cnnpipe.config import default_config_path

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(default_config_path().read_text())
    (run / "dataset.json").write_bytes(content)
    img = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(img)
    assert main(["predict", str(run), str(img)]) == 2
    assert str(run / "dataset.json") in _one_line(capsys)


def test_corrupt_store_meta(tmp_path, capsys):
    src = _folder(tmp_path / "src")
    assert main(["preprocess", str(src), str(tmp_path / "store"), "--size", "8", "--workers", "1"]) == 0
    capsys.readouterr()
    (tmp_path / "store" / "meta.json").write_text("{broken")
    assert main(["train", "--set", "data.source=store", "--set", f"data.path={tmp_path / 'store'}"]) == 2
    assert str(tmp_path / "store" / "meta.json") in _one_line(capsys)


def test_any_exception_on_one_file_skips_it_and_the_run_goes_on(tmp_path, monkeypatch):
    import cnnpipe.datasets.convert as convert
    import cnnpipe.datasets.preprocess as pp

    src = _folder(tmp_path / "src")
    real = convert.prepare_bytes

    def flaky(data, spec, source):
        if source.endswith("a/1.png"):
            raise RuntimeError("a codec surprise")
        if source.endswith("b/2.png"):
            raise MemoryError()
        return real(data, spec, source)

    monkeypatch.setattr(convert, "prepare_bytes", flaky)
    store = pp.preprocess(src, tmp_path / "out", size=8, workers=1, progress=False, val_fraction=0)
    reasons = {s["path"]: s["reason"] for s in store.report["skipped"]}
    assert reasons == {"a/1.png": "a/1.png: RuntimeError: a codec surprise",   # paths relative to SRC
                       "b/2.png": "b/2.png: too large: not enough memory to prepare this image"}
    kinds = {s["path"]: s["kind"] for s in store.report["skipped"]}
    assert kinds == {"a/1.png": "corrupt", "b/2.png": "too_large"}
    assert len(store) == 4


def test_codec_warnings_go_to_the_report_not_the_terminal(tmp_path, capfd):
    src = _folder(tmp_path / "src")
    buf = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("k", "v")
    Image.new("RGB", (5, 5), (9, 9, 9)).save(buf, "PNG", pnginfo=info)
    data = bytearray(buf.getvalue())
    data[data.find(b"tEXt") + 4] ^= 0xFF
    (src / "a" / "crc.png").write_bytes(bytes(data))
    assert main(["preprocess", str(src), str(tmp_path / "out"), "--size", "8", "--workers", "2"]) == 0
    out, err = capfd.readouterr()
    assert "CRC" not in err and "CRC" not in out
    report = load_store(tmp_path / "out").report
    assert report["counts"]["files_with_warnings"] == 1
    assert report["warnings"][0]["path"] == "a/crc.png" and "CRC" in report["warnings"][0]["warnings"][0]


def test_rerun_removes_temporaries_of_killed_runs_only(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    stale = tmp_path / f".out.tmp-{_host()}-{dead.pid}-abcd1234"
    shards = tmp_path / f".out.shards-{_host()}-{dead.pid}-abcd1234"   # a killed dask-engine client's
    live = tmp_path / f".out.tmp-{_host()}-{os.getpid()}-abcd1234"
    other_host = tmp_path / f".out.tmp-elsewhere-{dead.pid}-abcd1234"
    for d in (stale, shards, live, other_host):
        (d / "train").mkdir(parents=True)
    src = _folder(tmp_path / "src")
    assert main(["preprocess", str(src), str(out), "--size", "8", "--workers", "1"]) == 0
    assert not stale.exists() and not shards.exists() and live.exists() and other_host.exists()


def test_killed_mid_commit_puts_the_previous_store_back(tmp_path):
    """A writer killed between moving OUT aside and renaming the new store in: the rerun restores OUT."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    src = _folder(tmp_path / "src")
    assert main(["preprocess", str(src), str(tmp_path / "out"), "--size", "8", "--workers", "1"]) == 0
    os.rename(tmp_path / "out", tmp_path / f".out.old-{_host()}-{dead.pid}-abcd1234")
    with StoreWriter(tmp_path / "other"):
        pass  # another OUT: leaves ours alone
    assert not (tmp_path / "out").exists()
    with StoreWriter(tmp_path / "out", overwrite=True):
        assert load_store(tmp_path / "out").meta["size"] == [8, 8]
    assert _leftovers(tmp_path) == []


def test_sigkilled_preprocess_leaves_a_temporary_that_the_rerun_removes(tmp_path):
    import signal
    import time

    from messy_folder import make_messy_folder

    folder = make_messy_folder(tmp_path / "src", per_class=60, classes=2, big_every=2)
    cmd = [sys.executable, "-m", "cnnpipe.cli", "preprocess", str(folder.root), str(tmp_path / "out"),
           "--size", "32", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _leftovers(tmp_path) and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _leftovers(tmp_path), "the run finished before it could be killed"
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr   # complete, with the messy folder's bad files reported
    assert _leftovers(tmp_path) == [] and load_store(tmp_path / "out")


@pytest.mark.parametrize("size, shown", [("100000", "100000x100000 is 10,000,000,000 pixels"),
                                         ("10000x9000", "10000x9000 is 90,000,000 pixels")])
def test_a_size_no_image_may_have_is_refused_before_any_work(tmp_path, capsys, size, shown):
    (tmp_path / "src" / "a").mkdir(parents=True)
    assert main(["preprocess", str(tmp_path / "src"), str(tmp_path / "out"), "--size", size]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"size: {shown} per image, over the 89,478,485-pixel limit" in err
    assert not (tmp_path / "out").exists()
