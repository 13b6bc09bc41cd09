"""`cnnpipe preprocess --engine dask`: the local engine's store, byte for byte, whatever dies or hangs.

A real cluster: a scheduler and two workers started with the `dask scheduler` / `dask worker`
commands on 127.0.0.1 (once for this module), and a local cluster started by `--engine dask` alone.
The test hooks (a file that kills or hangs the process preparing it, a task that kills its Dask
worker) are named by files that exist in one test's folder only, so one cluster serves every test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("distributed")

from cnnpipe.datasets import dask_connect, dask_engine, dask_tasks  # noqa: E402
from cnnpipe.datasets.dask_tasks import KILL_DASK_ENV  # noqa: E402
from cnnpipe.datasets.preprocess import PreprocessError, preprocess  # noqa: E402
from cnnpipe.datasets.workers import HANG_ENV, KILL_ENV  # noqa: E402

CLI = [sys.executable, "-m", "cnnpipe.cli", "preprocess"]
HOOKS = {KILL_ENV: "diesalways", HANG_ENV: "hangsalways", KILL_DASK_ENV: "killsdaskworker"}


def _folder(root: Path, per_class: int = 30, extra: tuple[str, ...] = ()) -> int:
    """Two classes of PNGs of varied sizes (one 16-bit: a uint16 store), a broken file, and `extra` names."""
    rng = np.random.default_rng(0)
    n = 0
    for k, cls in enumerate(["a", "b"]):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            h, w = 1 + (i * 7) % 40, 1 + (i * 11 + k) % 50
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"img{i:03d}.png")
            n += 1
    Image.fromarray(rng.integers(0, 65536, (9, 7), dtype=np.uint16)).save(root / "a" / "deep.png")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    for name in extra:
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / name)
    return n + 2 + len(extra)


def _files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def _report(store: Path) -> dict:
    return json.loads((store / "report.json").read_text())


def _every_file_once(store: Path, total: int) -> None:
    report, meta = _report(store), json.loads((store / "meta.json").read_text())
    stored = sum(len(json.loads((store / s / "sources.json").read_text())) for s in meta["splits"])
    skipped = [s["path"] for s in report["skipped"]]
    assert len(skipped) == len(set(skipped)) and stored + len(skipped) == total


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler and 2 single-thread workers on 127.0.0.1, started with the `dask` commands."""
    where = tmp_path_factory.mktemp("cluster")
    sched_file = where / "scheduler.json"
    env = {**os.environ, **HOOKS}
    common = ["--no-dashboard"]
    sched = subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0",
                              "--scheduler-file", str(sched_file), *common], env=env, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    work = subprocess.Popen([sys.executable, "-m", "dask", "worker", "--scheduler-file", str(sched_file),
                             "--nworkers", "2", "--nthreads", "1", "--host", "127.0.0.1", "--local-directory",
                             str(where), *common], env=env, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not sched_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        from distributed import Client

        with Client(scheduler_file=str(sched_file), timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
        yield str(sched_file)
    finally:
        for proc in (work, sched):   # each command's whole process group: nannies, workers, their pools
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(20)


def _worker_pids(sched_file: str) -> set[int]:
    from distributed import Client

    with Client(scheduler_file=sched_file, timeout=30) as client:
        client.wait_for_workers(2, timeout=30)
        return set(client.run(os.getpid).values())


def test_a_local_cluster_builds_the_local_engines_store_byte_for_byte(tmp_path):
    total = _folder(tmp_path / "src")
    runs = {}
    for engine in ("local", "dask"):
        proc = subprocess.run([*CLI, "src", f"out_{engine}", "--size", "8x10", "--workers", "2", "--engine", engine],
                              cwd=tmp_path, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 1, proc.stderr   # the broken file
        runs[engine] = proc
    assert _files(tmp_path / "out_dask") == _files(tmp_path / "out_local")
    assert json.loads((tmp_path / "out_dask" / "meta.json").read_text())["dtype"] == "uint16"
    _every_file_once(tmp_path / "out_dask", total)
    assert "(dask engine, 2 worker threads on a local cluster)" in runs["dask"].stdout
    assert "(local engine, 2 worker processes)" in runs["local"].stdout
    assert "Traceback" not in runs["dask"].stderr
    assert sorted(os.listdir(tmp_path)) == ["out_dask", "out_local", "src"]   # no shards left


def test_an_external_cluster_gives_the_same_store_through_its_scheduler_address(tmp_path, cluster, monkeypatch):
    total = _folder(tmp_path / "src")
    local = preprocess(tmp_path / "src", tmp_path / "local", size=8, workers=2)
    address = json.loads(Path(cluster).read_text())["address"]
    monkeypatch.chdir(tmp_path)   # relative paths: the workers, started elsewhere, work in this folder
    store = preprocess("src", "dask", size=8, engine="dask", scheduler=address)
    assert store.built_by == "dask engine, 2 worker threads on the cluster"
    assert _files(tmp_path / "dask") == _files(local.path)
    _every_file_once(tmp_path / "dask", total)


def test_a_dask_worker_killed_mid_run_changes_nothing(tmp_path, cluster):
    total = _folder(tmp_path / "src", per_class=60, extra=("a/killsdaskworker.png",))
    local = preprocess(tmp_path / "src", tmp_path / "local", size=8, workers=2)
    before = _worker_pids(cluster)
    preprocess(tmp_path / "src", tmp_path / "dask", size=8, engine="dask", scheduler_file=cluster)
    assert len(before - _worker_pids(cluster)) == 1   # one worker was SIGKILLed (its nanny started another)
    assert _files(tmp_path / "dask") == _files(local.path)
    _every_file_once(tmp_path / "dask", total)
    assert sorted(os.listdir(tmp_path)) == ["dask", "local", "src"]


def test_files_that_kill_or_hang_their_process_are_reported_as_on_the_local_engine(tmp_path, cluster):
    total = _folder(tmp_path / "src", per_class=12, extra=("a/diesalways.png", "b/hangsalways.png"))
    t0 = time.monotonic()
    store = preprocess(tmp_path / "src", tmp_path / "dask", size=8, engine="dask", scheduler_file=cluster,
                       file_timeout=2)
    assert time.monotonic() - t0 < 60   # one deadline, not one per pass or per retry
    kinds = {s["path"]: s["kind"] for s in store.report["skipped"]}
    assert kinds == {"a/diesalways.png": "worker_died", "b/hangsalways.png": "timeout", "b/broken.png": "corrupt"}
    _every_file_once(store.path, total)
    # the local engine, with the same hooks, reports the same (a subprocess: the hooks are read in workers)
    proc = subprocess.run([*CLI, str(tmp_path / "src"), str(tmp_path / "local"), "--size", "8", "--workers", "2",
                           "--file-timeout", "2"], env={**os.environ, **HOOKS}, capture_output=True, timeout=120)
    assert proc.returncode == 1
    assert _files(tmp_path / "local") == _files(store.path)


def test_cluster_problems_are_one_line(tmp_path, monkeypatch, capsys):
    _folder(tmp_path / "src", per_class=2)
    with pytest.raises(PreprocessError, match="no such file"):
        preprocess(tmp_path / "src", tmp_path / "out", size=8, engine="dask", scheduler_file=tmp_path / "nope.json")
    with pytest.raises(PreprocessError, match="only used with the dask engine"):
        preprocess(tmp_path / "src", tmp_path / "out", size=8, scheduler="tcp://127.0.0.1:1")
    monkeypatch.setattr(dask_connect, "CONNECT_S", 1)
    with pytest.raises(PreprocessError, match=r"cannot connect to the Dask scheduler tcp://127.0.0.1:1 \("):
        preprocess(tmp_path / "src", tmp_path / "out", size=8, engine="dask", scheduler="tcp://127.0.0.1:1")
    # an address that accepts the connection and never answers (not a Dask scheduler): the same, in time
    with socket.create_server(("127.0.0.1", 0)) as mute:
        t0 = time.monotonic()
        with pytest.raises(PreprocessError, match="no answer"):
            preprocess(tmp_path / "src", tmp_path / "out", size=8, engine="dask",
                       scheduler=f"tcp://127.0.0.1:{mute.getsockname()[1]}")
        assert time.monotonic() - t0 < 15
    for text in ("{", "", '{"address": 5}', "[1, 2]"):   # not scheduler files
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(PreprocessError, match="not a Dask scheduler file"):
            preprocess(tmp_path / "src", tmp_path / "out", size=8, engine="dask", scheduler_file=tmp_path / "bad.json")
    (tmp_path / "bad.json").unlink()
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as empty:   # a scheduler alone
        with pytest.raises(PreprocessError, match=f"no worker joined the scheduler {empty.scheduler_address} "):
            preprocess(tmp_path / "src", tmp_path / "out", size=8, engine="dask", scheduler=empty.scheduler_address)
    assert not (tmp_path / "out").exists() and sorted(os.listdir(tmp_path)) == ["src"]
    proc = subprocess.run([*CLI, str(tmp_path / "src"), str(tmp_path / "out"), "--size", "8", "--engine", "dask",
                           "--scheduler-file", "nope.json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


class _Client:
    """The answers of `Client.get_versions` this test needs."""

    def __init__(self, worker: dict) -> None:
        self.scheduler = type("S", (), {"address": "tcp://127.0.0.1:8786"})()
        self.mine = {"python": "3.11.7.final.0", "cnnpipe": "0.1.0", "dask": "1", "distributed": "1", "numpy": "2",
                     "pillow": "11", "imagecodecs": "1", "tifffile": "1"}
        self.worker = {**self.mine, **worker}

    def get_versions(self, packages):
        return {"client": {"packages": self.mine}, "scheduler": {"packages": self.mine},
                "workers": {"tcp://127.0.0.1:4001": {"packages": self.worker}}}


@pytest.mark.parametrize("worker, words", [
    ({"cnnpipe": None}, "worker tcp://127.0.0.1:4001 does not have it, this process has cnnpipe 0.1.0"),
    ({"pillow": "10"}, "worker tcp://127.0.0.1:4001 has pillow 10, this process has pillow 11"),
    ({"python": "3.12.1.final.0"}, "worker tcp://127.0.0.1:4001 runs Python 3.12, this process 3.11"),
    ({"python": "3.11.9.final.0"}, None),
])
def test_workers_with_other_versions_are_refused_before_any_work(worker, words):
    if words is None:
        dask_connect.check_versions(_Client(worker))
        return
    with pytest.raises(PreprocessError) as exc:
        dask_connect.check_versions(_Client(worker))
    assert words in str(exc.value) and "\n" not in str(exc.value)


# Python that execs the rest of its arguments with SIGINT neither ignored nor blocked, as in a terminal's
# foreground job: a process started with SIGINT ignored or blocked keeps it so, and the test runner's
# state must not leak into the run (a fork with preexec_fn would do it too, but forks a process running jax).
AS_A_TERMINAL_JOB = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                     "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
                     "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"]


def test_ctrl_c_stops_the_cluster_tasks_and_leaves_nothing_behind(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while a file hangs with no
    deadline: the run ends at once, OUT and the shards absent, no process of the run left."""
    _folder(tmp_path / "src", per_class=20, extra=("a/hangsalways.png",))
    here = f"this test process: SIGINT {signal.getsignal(signal.SIGINT)}, blocked {signal.pthread_sigmask(signal.SIG_BLOCK, [])}"
    proc = subprocess.Popen([*AS_A_TERMINAL_JOB, *CLI[1:], "src", "out", "--size", "8", "--engine", "dask",
                             "--workers", "2", "--file-timeout", "0"], cwd=tmp_path,
                            env={**os.environ, **HOOKS, "PYTHONFAULTHANDLER": "1"},
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 90
    while not list(tmp_path.glob(".out.shards-*/*.npy")) and time.monotonic() < deadline:   # tasks are running
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=40)   # stderr closes only when every process holding it has ended
    except subprocess.TimeoutExpired:   # where it hangs: faulthandler prints every thread's stack on SIGABRT
        os.kill(proc.pid, signal.SIGABRT)
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"Ctrl-C did not end the run ({here}):\n{proc.communicate()[1][-6000:]}") from None
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "cnnpipe preprocess: interrupted", err
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_a_worker_that_joins_later_with_other_versions_fails_its_task_in_one_line(monkeypatch):
    mine = dask_tasks._versions_here()
    monkeypatch.setattr(dask_tasks, "_versions_here", lambda: {**mine, "imagecodecs": "2020.1.1"})
    with pytest.raises(PreprocessError, match=r"has imagecodecs 2020\.1\.1, this process has imagecodecs \d"):
        dask_tasks.run_task(None, [], 8, None, "shard.npy", ("k",), None, mine)


def test_a_task_the_cluster_keeps_losing_stops_the_run_in_one_line():
    class KilledWorker(Exception):   # distributed's name: Dask gave up after workers died running the task
        pass

    class Future:
        def result(self):
            raise KilledWorker("Attempted to run task 'cnnpipe-abc-0' on 4 different workers,\nbut all died")

    with pytest.raises(PreprocessError) as exc:
        dask_engine._result(Future())
    assert "\n" not in str(exc.value) and "lost task ? (KilledWorker): the Dask workers" in str(exc.value)
