"""The preprocess worker pool: in-order results, and no hang or lost item when a worker dies.

Every test runs under a SIGALRM deadline, so a hang fails the test instead of the session.
The per-job functions are in tests/_pool_jobs.py, importable by the workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import _pool_jobs as jobs_fns
import pytest

from cnnpipe.datasets.workers import DEADLINE, KILL_ENV, WorkerDied, make_pool, ordered_map

TESTS = Path(__file__).resolve().parent
DEADLINE_S = 30


@pytest.fixture(autouse=True)
def _deadline():
    """Fail a test that runs past DEADLINE_S (the map's wait is interrupted by the alarm)."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {DEADLINE_S} s: the pool hangs")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, DEADLINE_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def pool():
    with make_pool(2) as p:
        yield p


def squares(jobs):
    return [[x * x for x in job] for job in jobs]


def how_of(item, how):
    return f"{item}: {how}"


def test_a_pool_gives_the_in_process_results_in_order(pool):
    jobs = [list(range(i, i + i % 5)) for i in range(60)]  # lengths 0..4, empty jobs included
    here = list(ordered_map(None, jobs_fns.square, jobs, 4))
    assert here == squares(jobs)
    assert list(ordered_map(pool, jobs_fns.square, jobs, 4)) == here
    assert list(ordered_map(pool, jobs_fns.square, iter(jobs), 1)) == here  # one job in flight
    assert pool.map(abs, [-1, 2, -3]) == [1, 2, 3]  # the multiprocessing.Pool call still works


def test_a_worker_killing_itself_on_an_item_costs_only_that_item():
    """The env hook, in a fresh process: its fork server starts with the variable set."""
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(TESTS)!r})
        import _pool_jobs
        from cnnpipe.datasets.workers import make_pool, ordered_map
        names = [f"img-{{i:03d}}.png" for i in range(40)]
        jobs = [names[i:i + 4] for i in range(0, 40, 4)]
        with make_pool(2) as pool:
            out = list(ordered_map(pool, _pool_jobs.shout, jobs, 4, on_death=lambda n, how: f"DEAD {{n}}: {{how}}"))
        print(json.dumps([names, out]))
    """)
    env = {**os.environ, KILL_ENV: "img-017"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=DEADLINE_S - 5)
    assert res.returncode == 0, res.stderr
    names, out = json.loads(res.stdout)
    flat = [r for job in out for r in job]
    assert [len(job) for job in out] == [4] * 10
    assert flat[17] == "DEAD img-017.png: killed by signal 9 (SIGKILL)"
    assert flat[:17] + flat[18:] == [n.upper() for n in names[:17] + names[18:]]


def test_the_kill_hook_never_fires_outside_a_worker():
    """In a subprocess: if the hook fired in the parent, it would kill pytest."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import _pool_jobs
        from cnnpipe.datasets.workers import die_here_if_asked, ordered_map
        die_here_if_asked("img-001.png")
        assert list(ordered_map(None, _pool_jobs.shout, [["img-1"]], 1)) == [["IMG-1"]]
        print("alive")
    """)
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, KILL_ENV: "img"}, capture_output=True,
                         text=True, timeout=DEADLINE_S - 5)
    assert (res.returncode, res.stdout) == (0, "alive\n"), res.stderr


def test_a_worker_killed_from_outside_loses_nothing(pool):
    jobs = [list(range(4 * i, 4 * i + 4)) for i in range(20)]
    out, victim = [], None
    for res in ordered_map(pool, jobs_fns.slow_square, jobs, 8):
        if victim is None:  # both workers hold jobs now
            victim = pool.pids[0]
            os.kill(victim, signal.SIGKILL)
        out.append(res)
    assert out == squares(jobs)
    assert victim not in pool.pids and len(pool.pids) == 2  # replaced


def test_an_idle_worker_killed_between_maps_is_replaced(pool):
    victim = pool.pids[0]
    os.kill(victim, signal.SIGKILL)
    while victim in pool.pids:  # gone (the pool has not looked yet): sending it a job fails
        time.sleep(0.01)
    jobs = [[i, i + 1] for i in range(10)]
    assert list(ordered_map(pool, jobs_fns.square, jobs, 4, on_death=how_of)) == squares(jobs)
    assert victim not in pool.pids and len(pool.pids) == 2


def test_only_the_running_job_is_retried_and_answers_already_sent_are_kept(pool, tmp_path):
    log = str(tmp_path / "ran.log")
    jobs = [[(log, 3 * i + k) for k in range(3)] for i in range(8)]  # item 10 is the 2nd of job 3
    out = list(ordered_map(pool, jobs_fns.logged_sigkill_on_10, jobs, 8,
                           on_death=lambda item, how: how_of(item[1], how)))
    expected = squares([[x for _, x in job] for job in jobs])
    expected[3][1] = "10: killed by signal 9 (SIGKILL)"
    assert out == expected
    runs = [int(line) for line in Path(log).read_text().split()]
    # 9 and 10 ran in job 3 and again alone; 11 never ran before the death; the jobs
    # the dead worker had not started and every answered job ran once
    assert {x: runs.count(x) for x in set(runs)} == {x: 2 if x in (9, 10) else 1 for x in range(24)}


@pytest.mark.parametrize("fn, how", [(jobs_fns.exit3_on_13, "exited with status 3"),
                                     (jobs_fns.segfault_on_13, "killed by signal 11 (SIGSEGV)")])
def test_an_item_that_always_kills_its_worker_gets_on_death_or_raises(pool, fn, how):
    jobs = [[1, 2], [3, 13, 4], [5], [6, 7]]
    out = list(ordered_map(pool, fn, jobs, 4, on_death=how_of))
    assert out == [[1, 4], [9, f"13: {how}", 16], [25], [36, 49]]
    with pytest.raises(WorkerDied, match=re.escape(f"died on 13: {how}")) as exc:
        list(ordered_map(pool, fn, jobs, 4))
    assert (exc.value.item, exc.value.how) == (13, how)
    assert list(ordered_map(pool, jobs_fns.square, [[2], [3]], 2)) == [[4], [9]]  # the pool still works


def test_an_item_past_its_deadline_is_given_up_at_once_and_the_others_kept(pool):
    t0 = time.monotonic()
    out = list(ordered_map(pool, jobs_fns.hang_on_13, [[1, 2], [3, 13, 4], [5]], 3, on_death=how_of))
    assert out == [[1, 4], [9, f"13: {DEADLINE}", 16], [25]]
    assert time.monotonic() - t0 < 1.0 + 10   # one deadline: the hanging item is not run a second time
    with pytest.raises(WorkerDied, match="SIGALRM"):
        list(ordered_map(pool, jobs_fns.hang_on_13, [[13]], 1))
    assert list(ordered_map(None, jobs_fns.square, [[2]], 1)) == [[4]]
    assert list(ordered_map(pool, jobs_fns.square, [[2], [3]], 2)) == [[4], [9]]  # the pool still works


def test_a_file_after_a_hang_in_its_job_still_gets_its_two_tries(pool, tmp_path):
    log = str(tmp_path / "ran.log")
    jobs = [[(log, 12), (log, 13), (log, 14), (log, 15)]]   # 13 hangs; 14, never run before, always kills
    out = list(ordered_map(pool, jobs_fns.logged_hang_on_13_sigkill_on_14, jobs, 1,
                           on_death=lambda item, how: how_of(item[1], how)))
    assert out == [[144, f"13: {DEADLINE}", "14: killed by signal 9 (SIGKILL)", 225]]
    runs = [int(line) for line in Path(log).read_text().split()]
    # 12 ran, then 13 hung (given up at once); 14's first try was after the hang, so it got a retry too
    assert {x: runs.count(x) for x in set(runs)} == {12: 2, 13: 1, 14: 2, 15: 1}


def test_an_exception_in_fn_is_raised_in_the_parent(pool):
    with pytest.raises(ValueError, match="boom on 5") as exc:
        list(ordered_map(pool, jobs_fns.boom_on_5, [[1], [5], [7]], 3))
    assert "_pool_jobs.py" in str(exc.value.__cause__)  # the worker's traceback
    with pytest.raises(ValueError, match="returned 2 results for 3 items"):
        list(ordered_map(pool, jobs_fns.wrong_length, [[1, 2, 3]], 1))
    assert list(ordered_map(pool, jobs_fns.square, [[3]], 1)) == [[9]]


def test_a_map_left_early_does_not_disturb_the_next(pool):
    jobs = [list(range(i, i + 3)) for i in range(12)]
    first = ordered_map(pool, jobs_fns.slow_square, jobs, 8)
    assert next(first) == squares(jobs[:1])[0]
    # another map while the first, suspended, still has jobs in the workers
    assert list(ordered_map(pool, jobs_fns.square, jobs, 4)) == squares(jobs)
    assert list(first) == squares(jobs)[1:]
    left = ordered_map(pool, jobs_fns.slow_square, jobs, 8)
    next(left)
    left.close()  # answers still out are dropped
    assert list(ordered_map(pool, jobs_fns.square, jobs, 4)) == squares(jobs)


def test_close_leaves_no_process_or_thread_behind():
    threads = threading.active_count()
    pool = make_pool(2)
    pids = pool.pids
    assert len(pids) == 2
    busy = ordered_map(pool, jobs_fns.slow_square, [[1, 2, 3]] * 8, 8)
    next(busy)
    pool.close()
    pool.close()  # idempotent
    with contextlib.closing(busy):
        with pytest.raises(RuntimeError, match="closed"):
            list(busy)
    assert pool.pids == [] and threading.active_count() == threads
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
