"""math-verify with a wall-clock limit per comparison and per reward call, safe from any thread.

Why not call math-verify in-process: its timeouts use SIGALRM, which raises outside the main thread (Ray
actors, thread pools) and whose `TimeoutException` derives from BaseException; with its timeouts off, some
inputs (`10^{10^{10}}`, `10!!!!`) run for minutes. So comparisons run in worker processes (`workers`) with
math-verify's timeouts off, and the caller enforces the limits on the wall clock: a worker that overruns is
killed and the next call forks a fresh one; the comparison counts as a timeout, is logged, and reads "not
equivalent". Counts are in `stats()` (for the process-wide verifier the reward functions use:
`verifier_stats()`).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from rewards.answers import latex_for_verify, precheck
from rewards.workers import Worker, Zygote

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0  # per comparison, math-verify's own default
DEFAULT_CALL_TIMEOUT_S = 30.0  # per reward call: bounds a trainer step even when every answer is hostile
DEFAULT_MEMORY_LIMIT_MB = 2048  # per worker (address space)
_POLL_S = 0.02  # how often a call waiting for a worker that another thread holds looks again

Verdict = bool | None  # None: the ground truth itself does not parse, so the comparison does not apply


@dataclass
class Verdicts:
    """One reward call's verdicts, with its timeouts and errors (each of those reads False in `values`)."""

    values: list[Verdict]
    timeouts: int = 0
    errors: int = 0


class MathVerifier:
    """A small pool of math-verify workers shared by every thread of the process; thread-safe."""

    def __init__(self, num_workers: int | None = None, memory_limit_mb: int | None = DEFAULT_MEMORY_LIMIT_MB):
        self.num_workers = num_workers or min(4, len(os.sched_getaffinity(0)))  # the cores this process may use
        self.memory_limit_mb = memory_limit_mb
        self._zygote: Zygote | None = None
        self._zygote_lock = threading.Lock()
        self._cond = threading.Condition()
        self._idle: list[Worker] = []
        self._live = 0
        self._counts: Counter[str] = Counter(calls=0, prechecked=0, timeouts=0, errors=0)

    def stats(self) -> dict[str, int]:
        """calls (comparisons sent to math-verify), prechecked (decided by string checks), timeouts, errors."""
        with self._cond:
            return dict(self._counts)

    def _count(self, **counts: int) -> None:
        with self._cond:
            self._counts.update(counts)

    def start(self) -> None:
        """Start the workers now (otherwise the first call does, and pays the zygote's ~1.5 s start)."""
        started = [w for w in (self._acquire(0.0) for _ in range(self.num_workers)) if w is not None]
        for worker in started:
            self._release(worker)

    def close(self) -> None:
        """Stop the zygote, which takes every worker with it; a later call starts afresh."""
        with self._cond:
            idle, self._idle = self._idle, []
        for worker in idle:
            self._kill(worker)
        zygote = self._zygote
        if zygote is not None:
            self._drop_zygote(zygote)

    def verify(
        self,
        pairs: Sequence[tuple[str, str]],
        timeout_s: float = DEFAULT_TIMEOUT_S,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
    ) -> Verdicts:
        """Whether each (gold, answer) pair of final answers is equivalent: string pre-checks first
        (`answers.precheck`), then math-verify for the rest, in parallel over the pool.

        A pair still running `timeout_s` after it was handed to a worker, or when the call is `call_timeout_s`
        old, is a timeout: its worker is killed and the pair reads False. Crashed workers and exceptions read
        False too. Both are counted (in the result and in `stats()`) and logged.
        """
        if timeout_s <= 0 or call_timeout_s <= 0:
            raise ValueError(f"timeout_s and call_timeout_s must be > 0, got {timeout_s} and {call_timeout_s}")
        deadline = time.monotonic() + call_timeout_s
        result = Verdicts([precheck(gold, answer) for gold, answer in pairs])
        todo = [i for i, verdict in enumerate(result.values) if verdict is None]
        self._count(prechecked=len(pairs) - len(todo))
        found: list[Verdict] = [False] * len(todo)
        sent = [(latex_for_verify(pairs[i][0]), latex_for_verify(pairs[i][1])) for i in todo]
        self._run(sent, found, timeout_s, deadline, result)
        for i, verdict in zip(todo, found, strict=True):
            result.values[i] = verdict
        self._count(timeouts=result.timeouts, errors=result.errors)
        if result.timeouts or result.errors:
            logger.warning(
                "math-verify: %d of %d comparisons timed out (limits %.1f s each, %.1f s per call) and %d "
                "failed; read as not equivalent (see rewards.verifier_stats())",
                result.timeouts, len(pairs), timeout_s, call_timeout_s, result.errors,
            )
        return result

    def _run(
        self, pairs: Sequence[tuple[str, str]], verdicts: list[Verdict], timeout_s: float, deadline: float, tally: Verdicts
    ) -> None:
        """Fill `verdicts` from the workers; count timeouts and errors in `tally`."""
        todo = deque(range(len(pairs)))
        busy: dict[Connection, tuple[Worker, int, float]] = {}
        try:
            while (todo or busy) and time.monotonic() < deadline:
                self._dispatch(pairs, todo, busy, timeout_s, deadline)
                if busy:
                    self._collect(busy, verdicts, todo, deadline, tally)
            tally.timeouts += len(busy) + len(todo)  # the call's deadline passed: these never answered
        finally:  # also when starting a worker failed: never leave one running for nobody
            for worker, _, _ in busy.values():
                self._kill(worker)

    def _dispatch(self, pairs: Sequence, todo: deque, busy: dict, timeout_s: float, deadline: float) -> None:
        """Hand pending pairs to free workers (waiting briefly for one only when this call holds none)."""
        while todo:
            worker = self._acquire(0.0 if busy else min(_POLL_S, deadline - time.monotonic()))
            if worker is None:
                return
            index = todo.popleft()
            try:
                worker.conn.send(pairs[index])
            except OSError:  # it died while idle: drop it and retry the pair on another
                self._kill(worker)
                todo.appendleft(index)
                continue
            busy[worker.conn] = (worker, index, time.monotonic() + timeout_s)
            self._count(calls=1)

    def _collect(self, busy: dict, verdicts: list[Verdict], todo: deque, deadline: float, tally: Verdicts) -> None:
        """Wait for replies until the first pair's limit; kill the workers whose pair overran it."""
        wake = min(min(limit for _, _, limit in busy.values()), deadline)
        wait_s = max(0.0, wake - time.monotonic())
        if todo:  # a worker another thread releases does not wake wait(): look again soon
            wait_s = min(wait_s, _POLL_S)
        for conn in wait(list(busy), wait_s):
            worker, index, _ = busy.pop(conn)
            verdicts[index] = self._receive(worker, tally)
        now = time.monotonic()
        for conn, (worker, _, limit) in list(busy.items()):
            if now >= limit:
                del busy[conn]
                self._kill(worker)
                tally.timeouts += 1

    def _receive(self, worker: Worker, tally: Verdicts) -> Verdict:
        try:
            status, value = worker.conn.recv()
        except (EOFError, OSError):  # the worker died mid-comparison (memory limit, crash)
            self._kill(worker)
            tally.errors += 1
            logger.warning("math-verify worker %s died mid-comparison", worker.pid)
            return False
        self._release(worker)
        if status == "error":
            tally.errors += 1
            logger.debug("math-verify raised %s", value)
            return False
        return value

    def _acquire(self, wait_s: float) -> Worker | None:
        """An idle worker, a newly started one while the pool is below size, or None after `wait_s`."""
        with self._cond:
            if not self._idle and self._live >= self.num_workers and wait_s > 0:
                self._cond.wait(wait_s)
            if self._idle:
                return self._idle.pop()
            if self._live >= self.num_workers:
                return None
            self._live += 1
        return self._start()

    def _start(self) -> Worker:
        """Fork a worker from the zygote; if the zygote stopped answering, from a new one (once)."""
        try:
            zygote = self._live_zygote()
            try:
                return zygote.fork()
            except OSError:  # its socket broke: it died (killed from outside, out of memory)
                logger.warning("the math-verify zygote stopped answering; starting a new one")
                self._drop_zygote(zygote)
                return self._live_zygote().fork()
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify()
            raise

    def _live_zygote(self) -> Zygote:
        with self._zygote_lock:
            if self._zygote is not None and not self._zygote.alive():
                self._zygote.close()
                self._zygote = None
            if self._zygote is None:
                self._zygote = Zygote(self.memory_limit_mb)
            return self._zygote

    def _drop_zygote(self, zygote: Zygote) -> None:
        with self._zygote_lock:
            if self._zygote is zygote:
                self._zygote = None
        zygote.close()

    def _release(self, worker: Worker) -> None:
        with self._cond:
            self._idle.append(worker)
            self._cond.notify()

    def _kill(self, worker: Worker) -> None:
        worker.kill()
        with self._cond:
            self._live -= 1
            self._cond.notify()


_default: MathVerifier | None = None
_default_lock = threading.Lock()


def default_verifier() -> MathVerifier:
    """The process-wide verifier the reward functions use (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MathVerifier()
            atexit.register(_default.close)
        return _default


def configure_verifier(num_workers: int | None = None, memory_limit_mb: int | None = DEFAULT_MEMORY_LIMIT_MB) -> MathVerifier:
    """Replace the process-wide verifier (closing the old one's idle workers); its counts start at zero."""
    global _default
    with _default_lock:
        old, _default = _default, MathVerifier(num_workers, memory_limit_mb)
        atexit.register(_default.close)
    if old is not None:
        old.close()
    return _default


def verifier_stats() -> dict[str, int]:
    """The process-wide verifier's counts: calls, prechecked, timeouts, errors (for the trainer's logs)."""
    return default_verifier().stats()
