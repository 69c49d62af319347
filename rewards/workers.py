"""The processes math-verify runs in: a zygote that imports it once, and workers forked from the zygote.

Why not multiprocessing's pools: their `spawn`/`forkserver` children re-run the caller's main module (a
script without a `__main__` guard then starts workers recursively; inside a Ray actor every new worker
re-imports Ray, about 0.5 s), and `fork` of the caller is unsafe because trainers and Ray actors run threads.
The zygote is a plain `python -c` subprocess: single-threaded, it imports and warms math-verify once (about
1.5 s) and then forks a worker per request in a few milliseconds, so a worker killed for overrunning its
time limit is replaced almost for free. The caller talks to each worker over a `multiprocessing` Connection.

Lifetimes: the zygote exits when the caller's end of its socket closes (the caller exited or closed it);
workers ask Linux to SIGKILL them when the zygote exits (they may be stuck in C code, unable to notice).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass
from multiprocessing.connection import Connection, Pipe

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0  # the zygote imports sympy and math-verify: seconds, more on a loaded machine
_PID = struct.Struct("q")


def equivalent(gold: str, answer: str) -> bool | None:
    """math-verify's verdict on two answers in `$...$`; None when the gold does not parse (runs in a worker)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    # Timeouts off: math-verify's own (SIGALRM) would return False silently; the caller's wall clock kills
    # the worker and counts the timeout instead.
    gold_parsed = parse(gold, config, parsing_timeout=None)  # type: ignore[arg-type]
    if not gold_parsed:
        return None
    return bool(verify(gold_parsed, parse(answer, config, parsing_timeout=None), timeout_seconds=None))  # type: ignore[arg-type]


@dataclass
class Worker:
    pid: int
    conn: Connection

    def kill(self) -> None:
        """SIGKILL (it may be stuck in C code) and drop the connection; the zygote reaps it."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.conn.close()


class Zygote:
    """The subprocess that forks math-verify workers on request; `fork()` is thread-safe."""

    def __init__(self, memory_limit_mb: int | None):
        ours, theirs = socket.socketpair()
        # The caller's sys.path, so the zygote imports the same `rewards` (a worktree, a Ray working dir).
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        code = f"from rewards.workers import zygote_main; zygote_main({theirs.fileno()}, {memory_limit_mb!r})"
        self._process = subprocess.Popen(
            [sys.executable, "-c", code], pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL
        )
        theirs.close()
        self._sock = ours
        self._sock.settimeout(STARTUP_TIMEOUT_S)
        self._lock = threading.Lock()
        try:
            ready = self._sock.recv(1)
        except OSError as error:
            ready = repr(error).encode()
        if ready != b"r":
            self.close()
            raise RuntimeError(f"the math-verify zygote did not start (exit code {self._process.poll()}, got {ready!r})")

    def fork(self) -> Worker:
        """A new worker, ready to take (gold, answer) pairs on its connection."""
        ours, theirs = Pipe()
        with self._lock:
            socket.send_fds(self._sock, [b"f"], [theirs.fileno()])
            pid = _PID.unpack(_recv_exactly(self._sock, _PID.size))[0]
        theirs.close()
        worker = Worker(pid, ours)
        if not ours.poll(STARTUP_TIMEOUT_S) or ours.recv() != "ready":
            worker.kill()
            raise RuntimeError(f"a math-verify worker (pid {pid}) did not start")
        return worker

    def alive(self) -> bool:
        return self._process.poll() is None

    def close(self) -> None:
        """Close the socket: the zygote exits, and Linux kills its workers."""
        self._sock.close()
        try:
            self._process.wait(5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the math-verify zygote exited")
        data += chunk
    return data


def zygote_main(fd: int, memory_limit_mb: int | None) -> None:
    """The zygote: warm math-verify, then fork one worker per request until the caller closes the socket."""
    sock = socket.socket(fileno=fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped by the kernel: no zombies
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # its "timeout is disabled" warnings
    warnings.simplefilter("ignore")  # hostile input would print sympy's warnings into the caller's stderr
    equivalent("1", "1")  # import sympy and math-verify once; every worker forks warm
    sock.sendall(b"r")
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, 1, 1)
        except OSError:
            return
        if not message or not fds:  # the caller closed its end (it exited, or closed the verifier)
            return
        zygote_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            sock.close()
            _worker_main(fds[0], memory_limit_mb, zygote_pid)
        os.close(fds[0])
        sock.sendall(_PID.pack(pid))


def _worker_main(fd: int, memory_limit_mb: int | None, zygote_pid: int) -> None:
    """A worker: receive (gold, answer), reply ("ok", verdict) or ("error", exception type); never returns."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    code = 0
    try:
        _die_with_parent(zygote_pid)
        if memory_limit_mb:  # a memory bomb fails in here (MemoryError, counted), not on the host
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (memory_limit_mb * 2**20,) * 2)
        conn = Connection(fd)
        conn.send("ready")
        while True:
            try:
                gold, answer = conn.recv()
            except EOFError:
                break
            try:
                reply = ("ok", equivalent(gold, answer))
            except Exception as error:  # noqa: BLE001 -- reported to the caller, which counts it
                reply = ("error", type(error).__name__)  # only the type: printing sympy objects can hang
            conn.send(reply)
    except BaseException:  # noqa: BLE001 -- a forked child must never fall back into the zygote's loop
        code = 1
    os._exit(code)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this worker when the zygote (single-threaded, so its one thread) exits."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: killed by the caller's close() or left to finish
        return
    if os.getppid() != parent_pid:  # the zygote died before prctl took effect
        os._exit(1)
