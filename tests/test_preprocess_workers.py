"""A preprocess whose worker dies (OOM killer, codec segfault) finishes with every file stored or reported.

Both deaths are real SIGKILLs of a worker process: from inside (a test-only hook makes
the worker holding a named file kill itself, every time) and from outside (this test
kills a worker's pid while the run goes on). Each run is a `cnnpipe preprocess`
subprocess with a timeout, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cnnpipe.datasets.workers import HANG_ENV, KILL_ENV

CLI = [sys.executable, "-m", "cnnpipe.cli", "preprocess"]


def _folder(root: Path, per_class: int, size: int) -> int:
    y, x = np.mgrid[0:size, 0:size]
    n = 0
    for k, cls in enumerate(["a", "b"]):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            img = ((np.sin(x / (3 + i % 7)) + np.cos(y / (4 + k))) * 60 + 128).astype(np.uint8)
            Image.fromarray(np.stack([img, img[::-1], img.T], -1)).save(root / cls / f"img{i:03d}.png")
            n += 1
    return n


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


def test_a_file_that_kills_its_worker_twice_is_reported_and_the_run_goes_on(tmp_path):
    total = _folder(tmp_path / "src", 12, 16)
    env = {**os.environ, KILL_ENV: "b/img005.png"}
    proc = subprocess.run([*CLI, str(tmp_path / "src"), str(tmp_path / "out"), "--size", "8", "--workers", "2"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr   # the store is complete; one file failed
    report = _report(tmp_path / "out")
    assert report["counts"]["images_stored"] == total - 1
    (died,) = [s for s in report["skipped"] if s["kind"] == "worker_died"]
    assert died["path"] == "b/img005.png"
    assert "killed by signal 9 (SIGKILL)" in died["reason"] and "retry" in died["reason"]
    assert "Traceback" not in proc.stderr


def test_a_file_that_hangs_is_stopped_at_its_deadline_and_reported_once(tmp_path):
    total = _folder(tmp_path / "src", 12, 16)
    env = {**os.environ, HANG_ENV: "a/img007.png"}   # as a codec's endless loop would, every time
    t0 = time.monotonic()
    proc = subprocess.run([*CLI, str(tmp_path / "src"), str(tmp_path / "out"), "--size", "8", "--workers", "2",
                           "--file-timeout", "2"], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr
    report = _report(tmp_path / "out")
    assert report["counts"]["images_stored"] == total - 1
    (hung,) = [s for s in report["skipped"] if s["kind"] == "timeout"]   # once: never waited for twice
    assert hung["path"] == "a/img007.png" and "longer than the file timeout of 2 s" in hung["reason"]
    assert len(report["skipped"]) == 1 and elapsed < 2 * 2 + 30   # one deadline, not a retry's second
    assert "Traceback" not in proc.stderr


def test_a_hanging_file_that_decides_the_store_type_costs_one_deadline(tmp_path):
    import imagecodecs

    total = _folder(tmp_path / "src", 6, 16)
    for name in ("deep0", "deep1"):   # 16-bit files: prepared first to confirm a uint16 store
        (tmp_path / "src" / "a" / f"{name}.png").write_bytes(imagecodecs.png_encode(np.full((16, 16), 40000,
                                                                                            np.uint16)))
    env = {**os.environ, HANG_ENV: "a/deep0.png"}
    proc = subprocess.run([*CLI, str(tmp_path / "src"), str(tmp_path / "out"), "--size", "8", "--workers", "2",
                           "--file-timeout", "2"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("stopped at the file deadline") == 1   # not prepared again by the write pass
    report = _report(tmp_path / "out")
    assert report["counts"]["images_stored"] == total + 1 and json.loads((tmp_path / "out" / "meta.json")
                                                                          .read_text())["dtype"] == "uint16"
    assert [(s["path"], s["kind"]) for s in report["skipped"]] == [("a/deep0.png", "timeout")]


def test_sigterm_while_a_worker_hangs_leaves_nothing_behind(tmp_path):
    _folder(tmp_path / "src", 12, 16)
    env = {**os.environ, HANG_ENV: "a/img003.png"}
    proc = subprocess.Popen([*CLI, str(tmp_path / "src"), str(tmp_path / "out"), "--size", "8", "--workers", "2",
                             "--file-timeout", "0"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _worker_pids(proc.pid) and time.monotonic() < deadline:   # the pool is up
        time.sleep(0.1)
    time.sleep(1.0)   # and a worker is stuck on the file
    workers = _worker_pids(proc.pid)
    proc.send_signal(signal.SIGTERM)   # a plain `kill`: cleaned up as Ctrl-C is
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "cnnpipe preprocess: terminated"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]   # no store, no temporary folder
    assert workers and not [w for w in workers if _running(w)]


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _worker_pids(parent: int) -> list[int]:
    """Pids of the pool workers: children of the fork server, itself a child of `parent`."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    return [w for server in children.get(parent, []) for w in children.get(server, [])]


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def _run_and_kill(tmp_path: Path, server_too: bool) -> tuple[subprocess.CompletedProcess, int]:
    """Preprocess 300 files with 2 workers; SIGKILL the first worker seen decoding (and, with
    `server_too`, first the fork server it came from). Returns (finished process, file count)."""
    total = _folder(tmp_path / "src", 150, 160)
    cmd = [*CLI, str(tmp_path / "src"), str(tmp_path / "out"), "--size", "8", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, deadline = False, time.monotonic() + 60
    while not killed and proc.poll() is None and time.monotonic() < deadline:
        # a worker that has used CPU is decoding: kill it with files in hand
        busy = [w for w in _worker_pids(proc.pid) if _cpu_ticks(w) >= 5]
        if busy:
            if server_too:  # the replacement worker then needs a new fork server
                os.kill(int(Path(f"/proc/{busy[0]}/stat").read_text().rsplit(")", 1)[1].split()[1]), signal.SIGKILL)
            os.kill(busy[0], signal.SIGKILL)
            killed = True
        time.sleep(0.005)
    stdout, stderr = proc.communicate(timeout=120)
    assert killed, "the run ended before a worker could be killed"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), total


def test_a_worker_killed_from_outside_loses_no_file(tmp_path):
    done, total = _run_and_kill(tmp_path, server_too=False)
    assert done.returncode == 0, done.stderr
    report = _report(tmp_path / "out")
    # the killed worker's files were retried in a fresh worker: every file is stored
    assert report["counts"]["images_stored"] == total and report["skipped"] == []


def test_a_killed_fork_server_is_restarted_and_no_file_is_lost(tmp_path):
    done, total = _run_and_kill(tmp_path, server_too=True)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert _report(tmp_path / "out")["counts"]["images_stored"] == total
