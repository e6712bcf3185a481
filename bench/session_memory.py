"""A command in a session of its own: its wall time, the peak memory of everything it started, and
nothing of it left running afterwards.

A job that starts Ray starts processes its own process does not wait for (the raylet, Ray Data and
Ray Train workers, Serve replicas), so the job's ``ru_maxrss`` misses most of its memory. Started
with ``start_new_session``, the job and every Ray process it starts share its session id (checked:
the raylet, GCS, workers and agents of a private ``ray.init`` all do), and nothing else on the
machine does, whoever else runs Ray there. Every ``interval_s`` a thread sums the resident memory
(RSS) of the session's processes; that peak is the step's figure. Pages shared between processes
(the torch libraries each Ray worker maps) are counted once per process, so it errs high. The
machine's used memory (total - available) less its level when the command started is kept as a
cross-check; it also moves with whatever else runs on the machine.

A guard stops the session when the machine's available memory falls below ``min_free_gb`` (before
the kernel's OOM killer picks a process, maybe not one of ours) or after ``timeout_s``; the usage
says which. Processes of the session still alive after the command ends are listed and stopped,
by pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

GB = 1e9


@dataclass
class Usage:
    """What one command cost."""

    seconds: float
    rc: int  # the command's exit status (negative: the signal that ended it)
    peak_gb: float  # summed RSS of the session's processes, at its highest sample
    machine_gb: float  # the machine's used memory at its highest, less its level at the start
    min_free_gb: float  # the machine's lowest available memory while it ran
    stopped: str = ""  # why the guard stopped it, in words ("" when it ended by itself)
    reason: str = ""  # "memory" | "timeout" | "signal" (did not end after stop()) | ""
    leftovers: list[str] = field(default_factory=list)  # session processes alive after it ended (stopped)


def machine_used() -> int:
    vm = psutil.virtual_memory()
    return vm.total - vm.available


def session_pids(sid: int) -> list[int]:
    out = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid:
                out.append(pid)
        except OSError:  # gone, or not ours to ask about
            pass
    return out


def session_rss(sid: int) -> int:
    total = 0
    for pid in session_pids(sid):
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total


class Session:
    """``with Session(argv, log) as s: s.wait()`` (a server: talk to it, then leave the block: SIGINT,
    as Ctrl-C), then ``s.usage()``."""

    def __init__(self, argv: list[str], log: Path, env: dict | None = None, cwd: Path | None = None,
                 min_free_gb: float = 1.0, timeout_s: float = 3600, interval_s: float = 0.2, linger_s: float = 30):
        self.argv, self.log, self.env, self.cwd, self.linger_s = argv, log, env, cwd, linger_s
        self.min_free, self.timeout_s, self.interval_s = min_free_gb * GB, timeout_s, interval_s
        self.peak = self.machine_peak = 0
        self.lowest_free = psutil.virtual_memory().available
        self.stopped, self.reason, self.rc, self.leftovers = "", "", 0, []
        self._done = threading.Event()

    def __enter__(self) -> "Session":
        self.idle = machine_used()
        self.t0 = time.perf_counter()
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                                         start_new_session=True)
        self.sid = self.proc.pid  # a new session's id is its leader's pid
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, session_rss(self.sid))
            vm = psutil.virtual_memory()
            self.machine_peak = max(self.machine_peak, vm.total - vm.available)
            self.lowest_free = min(self.lowest_free, vm.available)
            if not self.stopped and vm.available < self.min_free:
                self._guard("memory", f"stopped: the machine's available memory fell to {vm.available / GB:.1f} GB "
                            f"(guard {self.min_free / GB:.1f} GB) at {self.peak / GB:.1f} GB for this step")
            elif not self.stopped and time.perf_counter() - self.t0 > self.timeout_s:
                self._guard("timeout", f"stopped: still running after {self.timeout_s:.0f} s")
            self._done.wait(self.interval_s)

    def _guard(self, reason: str, why: str) -> None:
        self.reason, self.stopped = reason, why
        self._kill()

    def _kill(self, sig: int = signal.SIGKILL) -> None:
        for pid in session_pids(self.sid):
            try:
                os.kill(pid, sig)
            except OSError:
                pass

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGINT, grace_s: float = 60) -> None:
        """``sig`` to the command (SIGINT: its Ctrl-C), SIGKILL to the session after ``grace_s``."""
        if self.running():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._guard("signal", f"stopped: did not end within {grace_s:.0f} s of signal {sig}")

    def wait(self) -> int:
        return self.proc.wait()

    def usage(self) -> Usage:
        """The figures (after the ``with`` block: the leftovers are known then)."""
        return Usage(self.t1 - self.t0, self.rc, self.peak / GB, (self.machine_peak - self.idle) / GB,
                     self.lowest_free / GB, self.stopped, self.reason, self.leftovers)

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:  # the benchmark itself is stopping (Ctrl-C, SIGTERM): nothing of it stays
            self._guard("signal", f"stopped: the benchmark was interrupted ({exc_type.__name__})")
        self.stop()
        self.rc = self.proc.wait()
        self.t1 = time.perf_counter()
        deadline = time.monotonic() + self.linger_s  # a raylet leaves a few seconds after its driver
        while session_pids(self.sid) and time.monotonic() < deadline:
            time.sleep(0.5)
        self._done.set()
        self._thread.join()
        for pid in session_pids(self.sid):
            try:
                self.leftovers.append(" ".join(psutil.Process(pid).cmdline()[:1])[:60] or str(pid))
            except psutil.Error:
                pass
        self._kill(signal.SIGTERM)
        time.sleep(2 if self.leftovers else 0)
        self._kill()


def run(argv: list[str], log: Path, **kw) -> Usage:
    """Run a command to its end in its own session; its usage."""
    with Session(argv, log, **kw) as s:
        s.wait()
    return s.usage()
