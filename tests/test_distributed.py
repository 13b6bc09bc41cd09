"""Multi-process training with jax.distributed: real processes on 127.0.0.1, gloo CPU collectives.

The reference for "same result" is one process holding 2 CPU devices: the same mesh
size, so the same global batches, the same per-device halves and one all-reduce of two
partial gradients per step. Only the all-reduce differs (gloo between processes
instead of XLA's in-process one), and a sum of two floats is exact-commutative, so
the parameters are expected to be bit-identical; the comparison allows 1e-6 (absolute
and relative) for a backend whose reduction adds the halves in another grouping.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from cnnpipe.datasets.batches import eval_batches, train_batches
from cnnpipe.datasets.shapes import make_shapes
from cnnpipe.runs.evaluate import evaluate_run
from cnnpipe.runs.load import load_run
from cnnpipe.training.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID, Cluster, cluster_from

# 10 epochs x 8 steps of a tiny CNN, a checkpoint every 4 steps: long enough to be killed mid-run
# (a multi-process Orbax save takes ~0.28 s here: Orbax polls every 0.25 s for a directory)
SETTINGS = ["data.size=[16,16]", "data.num_train=256", "data.num_val=72", "train.batch_size=32",
            "train.eval_batch_size=24", "train.epochs=10", "train.checkpoint_every_steps=4", "train.log_every_steps=4",
            "model=[{type: conv, filters: 4}, {type: relu}, {type: max_pool}, {type: flatten}]"]
TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(*extra):
    return [sys.executable, "-m", "cnnpipe.cli", "train", *extra]


def _settings(settings=SETTINGS):
    return [a for s in settings for a in ("--set", s)]


def _start_pair(args, cwd, port=None):
    """Processes 0 and 1 of one run (Popen objects), both on 127.0.0.1."""
    port = port or _free_port()
    return [subprocess.Popen(_cmd(*args, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                  "--process-id", str(i)), cwd=cwd, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]


def _finish(procs):
    outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def _params(run_dir):
    return jax.tree.leaves(load_run(run_dir, "latest").state)


def _losses(run_dir):
    return [(r["step"], r.get("split", "train"), r["loss"])
            for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run trained by 2 processes (1 CPU device each) and one by 1 process with 2 devices."""
    root = tmp_path_factory.mktemp("dist")
    procs = _start_pair([*_settings(), "--workdir", str(root / "two")], root)
    one = subprocess.run(_cmd(*_settings([*SETTINGS, "train.num_devices=2"]), "--workdir", str(root / "one")),
                         cwd=root, capture_output=True, text=True, timeout=TIMEOUT)
    assert one.returncode == 0, one.stderr[-3000:]
    outs = _finish(procs)
    return SimpleNamespace(two=root / "two", one=root / "one", outs=outs)


def test_two_processes_train_the_same_run_as_one_process_with_two_devices(runs):
    two = json.loads((runs.two / "summary.json").read_text())
    one = json.loads((runs.one / "summary.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1 and two["devices"] == one["devices"] == 2
    assert two["steps"] == one["steps"] == 10 * 8
    # same global batches in the same order: every logged loss agrees
    a, b = _losses(runs.two), _losses(runs.one)
    assert [r[:2] for r in a] == [r[:2] for r in b]
    np.testing.assert_allclose([r[2] for r in a], [r[2] for r in b], rtol=1e-6, atol=1e-6)
    for x, y in zip(_params(runs.two), _params(runs.one), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
    assert two["final_val_accuracy"] == one["final_val_accuracy"]
    assert two["confusion_matrix"] == one["confusion_matrix"]  # every one of the 72 val images (3 batches)


def test_only_process_zero_speaks_and_the_run_loads_in_one_process(runs):
    (out0, _), (out1, _) = runs.outs
    assert "epoch 10/10" in out0 and "2 processes" in out0
    assert "epoch" not in out1 and "done" not in out1
    assert (runs.two / "summary.json").is_file() and (runs.two / "plots" / "confusion_matrix.png").is_file()
    # evaluate (this test process: 1 device) on a run saved by 2 processes
    result, _ = evaluate_run(load_run(runs.two, "latest"))
    assert result["accuracy"] == json.loads((runs.two / "summary.json").read_text())["final_val_accuracy"]


def test_a_killed_process_stops_the_other_and_the_run_resumes_exactly(runs, tmp_path):
    run_dir = tmp_path / "killed"
    procs = _start_pair([*_settings(), "--workdir", str(run_dir)], tmp_path)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and not any(p.name.isdigit() for p in (run_dir / "checkpoints").glob("*")):
        assert procs[0].poll() is None, procs[0].communicate()[1][-2000:]
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    _, err = procs[0].communicate(timeout=60)
    waited = time.monotonic() - t0
    procs[1].communicate()
    assert procs[0].returncode == 1 and waited < 10
    last = err.strip().splitlines()[-1]
    # the peer watch usually speaks first; a collective failing at the same moment says it in its own words
    assert last in ("cnnpipe train: error: process 0 of 2: process 1 stopped (killed or crashed); stopping this "
                    "one too") or last.startswith("cnnpipe train: error: process 0 of 2: another process of "
                                                  "this run stopped; stopping too"), last
    assert "Traceback" not in err
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 80  # stopped mid-run
    # resume with 2 processes: the same parameters as the uninterrupted run
    _finish(_start_pair(["--resume", str(run_dir)], tmp_path))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed"] and summary["steps"] == 80
    for x, y in zip(_params(run_dir), _params(runs.two), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_process_slices_make_up_the_single_process_batches():
    images, labels = make_shapes(40, size=(8, 8))
    split = type("S", (), {"images": images, "labels": labels, "__len__": lambda self: 40})()
    for procs in (2, 4):
        per = 8 // procs
        parts = [list(train_batches(split, 8, seed=3, epoch=1, start_step=1, rows=slice(p * per, (p + 1) * per)))
                 for p in range(procs)]
        for step, (x, y) in enumerate(train_batches(split, 8, seed=3, epoch=1, start_step=1)):
            np.testing.assert_array_equal(np.concatenate([part[step][0] for part in parts]), x)
            np.testing.assert_array_equal(np.concatenate([part[step][1] for part in parts]), y)
        per = 12 // procs  # eval: 40 rows in batches of 12, the last one padded
        parts = [list(eval_batches(split, 12, rows=slice(p * per, (p + 1) * per))) for p in range(procs)]
        for b, whole in enumerate(eval_batches(split, 12)):
            for k in range(3):
                np.testing.assert_array_equal(np.concatenate([part[b][k] for part in parts]), whole[k])


def test_cluster_settings_from_flags_and_environment():
    env = {ENV_COORDINATOR: "10.0.0.1:1234", ENV_NUM_PROCESSES: "4", ENV_PROCESS_ID: "3"}
    assert cluster_from(environ={}) is None
    assert cluster_from(environ=env) == Cluster("10.0.0.1:1234", 4, 3)
    assert cluster_from("127.0.0.1:99", 2, 0, environ=env) == Cluster("127.0.0.1:99", 2, 0)
    assert cluster_from(mode="auto", environ=env) == Cluster(auto=True)
    assert cluster_from(mode="off", environ=env) is None
    for args, message in ((("127.0.0.1:99", None, None), "go together"),
                          (("no-port", 2, 0), "--coordinator: expected HOST:PORT"),
                          (("h:1", 2, 2), "--process-id: expected 0 to 1, got 2"),
                          (("h:1", 0, 0), "--num-processes: expected at least 1")):
        with pytest.raises(ValueError, match=message):
            cluster_from(*args, environ={})
    with pytest.raises(ValueError, match=ENV_NUM_PROCESSES):
        cluster_from(environ={**env, ENV_NUM_PROCESSES: "four"})


def test_bad_cluster_flags_exit_2_with_one_line(tmp_path):
    out = subprocess.run(_cmd("--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "5"),
                         cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 2
    assert out.stderr.strip() == "cnnpipe train: error: --process-id: expected 0 to 1, got 5"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "TPU_"))}
    out = subprocess.run(_cmd("--distributed", "auto"), cwd=tmp_path, capture_output=True, text=True,
                         timeout=TIMEOUT, env=env)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith(
        "cnnpipe train: error: --distributed auto: jax found no cluster to join")


def test_a_folder_cache_is_built_once_by_process_zero(tmp_path):
    from PIL import Image

    from cnnpipe.datasets.shapes import SHAPE_CLASSES

    images, labels = make_shapes(120, size=(20, 20), seed=1)
    for k in range(3):
        (tmp_path / "images" / SHAPE_CLASSES[k]).mkdir(parents=True)
        for i, img in enumerate(images[labels == k][:16]):
            Image.fromarray(img).save(tmp_path / "images" / SHAPE_CLASSES[k] / f"{i:02d}.png")
    settings = ["data.source=folder", f"data.path={tmp_path / 'images'}", f"data.cache_dir={tmp_path / 'cache'}",
                "data.size=[16,16]", "train.batch_size=8", "train.eval_batch_size=8", "train.epochs=1",
                "model=[{type: conv, filters: 4}, {type: relu}, {type: flatten}]"]
    (out0, _), _ = _finish(_start_pair([*_settings(settings), "--workdir", str(tmp_path / "run")], tmp_path))
    caches = list((tmp_path / "cache" / "folders").iterdir())
    assert len(caches) == 1 and caches[0].name.startswith("images-")  # no second cache, no temporaries
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    info = json.loads((tmp_path / "run" / "dataset.json").read_text())
    assert info["num_train"] + info["num_val"] == len(list((tmp_path / "images").rglob("*.png")))
    assert info["size"] == [16, 16]
    assert summary["processes"] == 2 and summary["steps"] == info["num_train"] // 8 and "done: val accuracy" in out0
