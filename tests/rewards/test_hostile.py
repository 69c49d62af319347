"""Rewards under hostile input, from threads and from a Ray actor: nothing raises, nothing hangs, timeouts are
counted, a hung worker is replaced, and no worker outlives its caller. Includes issue 10's fuzz test.

The time bounds here are hang checks, not speed checks: a call must come back within its own wall-clock
limit plus a generous margin (scheduling on a loaded 2-core machine), where a hang would take minutes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import ray

import rewards
from rewards import accuracy_reward, verifier_stats
from tests.helpers import ACCURACY_CASES
from tests.rewards.fuzz import HANGS, Report, fuzz_cases, score

TIMEOUT_S, CALL_TIMEOUT_S = 0.5, 4.0  # short limits keep the hostile cases cheap
MARGIN_S = 3.0
HOSTILE = [(answer, "7") for answer in HANGS] + [("{" * 200 + "1" + "}" * 200, "7"), ("\\frac{" * 400, "7"), ("\x00" * 1000, "0")]


@pytest.fixture(scope="module")
def actor():
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield RewardActor.remote()
    ray.shutdown()


@ray.remote
class RewardActor:
    """Calls the reward functions inside a Ray actor, as a rollout or reward worker would."""

    def timed_accuracy(self, completion: str, truth: str) -> tuple[list, float]:
        return timed_accuracy(completion, truth)

    def accuracy_table(self) -> tuple[list, list]:
        return accuracy_table()

    def fuzz(self, n: int, seed: int) -> Report:
        return score(fuzz_cases(n, seed), batch_size=50, timeout_s=TIMEOUT_S, call_timeout_s=CALL_TIMEOUT_S)

    def stats(self) -> dict:
        return verifier_stats()


def timed_accuracy(completion: str, truth: str) -> tuple[list, float]:
    """One accuracy call and its wall-clock seconds."""
    began = time.monotonic()
    values = accuracy_reward(completions=[completion], solution=[truth], timeout_s=TIMEOUT_S, call_timeout_s=CALL_TIMEOUT_S)
    return values, time.monotonic() - began


def accuracy_table() -> tuple[list, list]:
    """test_rewards' table of cases: (scores, expected scores)."""
    golds, completions, expected = zip(*ACCURACY_CASES, strict=True)
    return accuracy_reward(completions=list(completions), solution=list(golds)), list(expected)


def _zygotes() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if "zygote_main" in " ".join(p.cmdline())]


def _worker_pids() -> list[int]:
    """The verifier's workers: children of this process's zygote."""
    return [w.pid for z in _zygotes() for w in z.children()]


def test_hostile_answers_time_out_from_a_thread_and_the_next_call_works():
    rewards.default_verifier().start()
    before = verifier_stats()
    with ThreadPoolExecutor(1) as pool:  # not the main thread: where math-verify's own timeouts fail
        for answer, truth in HOSTILE:
            values, seconds = pool.submit(timed_accuracy, f"Answer: {answer}", truth).result()
            assert values == [0.0] and seconds < TIMEOUT_S + MARGIN_S, (answer[:20], seconds)
        assert pool.submit(timed_accuracy, "Answer: 0.5", "\\frac{1}{2}").result()[0] == [1.0]
        scores, expected = pool.submit(accuracy_table).result()
        assert scores == expected
    after = verifier_stats()
    assert after["timeouts"] - before["timeouts"] >= len(HANGS)
    # Every worker that overran was killed and reaped: only the pool's own remain.
    assert len(_worker_pids()) <= rewards.default_verifier().num_workers


def test_a_killed_zygote_is_replaced():
    rewards.default_verifier().start()
    (zygote,) = _zygotes()
    workers = zygote.children()
    zygote.kill()
    psutil.wait_procs([zygote, *workers], timeout=15)  # its workers die with it
    assert accuracy_reward(completions=["Answer: 0.5", "Answer: 2"], solution=["\\frac{1}{2}", "\\frac{1}{2}"]) == [1.0, 0.0]
    assert [z.pid for z in _zygotes()] != [zygote.pid]


def test_hostile_answers_time_out_in_a_ray_actor(actor):
    for answer, truth in HOSTILE:
        values, seconds = ray.get(actor.timed_accuracy.remote(f"Answer: {answer}", truth))
        assert values == [0.0] and seconds < TIMEOUT_S + MARGIN_S + 2.0, (answer[:20], seconds)  # +2: the first call starts the zygote
    assert ray.get(actor.timed_accuracy.remote("Answer: 0.5", "\\frac{1}{2}"))[0] == [1.0]
    scores, expected = ray.get(actor.accuracy_table.remote())
    assert scores == expected
    assert ray.get(actor.stats.remote())["timeouts"] >= len(HANGS)


def _check(report: Report, label: str) -> None:
    print(f"\n[fuzz {label}] {report.cases} cases, {report.calls} reward calls, {report.hangs} known hangs, "
          f"slowest call per function (s): { {k: round(v, 2) for k, v in report.slowest.items()} }")
    assert not report.problems, report.problems[:10]
    assert report.slowest["accuracy_reward"] < CALL_TIMEOUT_S + MARGIN_S
    assert max(v for k, v in report.slowest.items() if k != "accuracy_reward") < MARGIN_S


def test_fuzz_from_threads():
    """Issue 10: 10,000 generated cases through every reward function from 4 threads sharing one verifier."""
    rewards.default_verifier().start()
    before = verifier_stats()
    began = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        parts = list(pool.map(lambda seed: score(fuzz_cases(2500, seed), 50, timeout_s=TIMEOUT_S, call_timeout_s=CALL_TIMEOUT_S), range(4)))
    report = Report()
    for part in parts:
        report.add(part)
    counts = {k: v - before[k] for k, v in verifier_stats().items()}
    print(f"\n[fuzz threads] {time.monotonic() - began:.1f} s, verifier counts {counts}, {report.hangs} known hangs")
    _check(report, "threads")
    assert report.cases == 10_000 and counts["timeouts"] >= report.hangs


def test_fuzz_from_a_ray_actor(actor):
    before = ray.get(actor.stats.remote())
    began = time.monotonic()
    report = ray.get(actor.fuzz.remote(2000, seed=99))
    counts = {k: v - before[k] for k, v in ray.get(actor.stats.remote()).items()}
    print(f"\n[fuzz actor] {time.monotonic() - began:.1f} s, verifier counts {counts}, {report.hangs} known hangs")
    _check(report, "ray actor")
    assert counts["timeouts"] >= report.hangs


SCRIPT = """
import os, sys, threading
import rewards
# No `if __name__ == "__main__":` guard: multiprocessing's spawn/forkserver would re-run this file.
print(rewards.accuracy_reward(completions=["Answer: 0.5"], solution=["1/2"]), flush=True)
threading.Thread(target=rewards.accuracy_reward, kwargs=dict(completions=["Answer: 9^{9^{9}}"], solution=["7"],
                 timeout_s=600, call_timeout_s=600)).start()
print("hanging", flush=True)
threading.Event().wait()
"""


def workers_of(pid: int, at_least: int, timeout_s: float = 30.0) -> list[psutil.Process]:
    """The process's descendants, once there are `at_least` of them (a worker starts after its request is
    sent: wait for it to exist rather than for a guessed time)."""
    deadline = time.monotonic() + timeout_s
    while len(found := psutil.Process(pid).children(recursive=True)) < at_least and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(found) >= at_least, found
    return found


def test_a_killed_caller_leaves_no_worker_behind(tmp_path):
    """A script without a main guard works; SIGKILL it mid-comparison and its zygote and workers go too."""
    script = tmp_path / "score.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    caller = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert caller.stdout.readline().strip() == "[1.0]"
        assert caller.stdout.readline().strip() == "hanging"
        helpers = workers_of(caller.pid, at_least=2)  # the zygote and at least the busy worker
    finally:
        caller.send_signal(signal.SIGKILL)
        caller.wait()
    gone, alive = psutil.wait_procs(helpers, timeout=15)
    assert not alive, [p.cmdline()[:2] for p in alive]
