"""The ``serve.batching: loop`` policy: a thread that steps one ``calm_core.batching.Batch`` for as
long as it has rows, admitting waiting requests between steps, so a request never waits for
another one to finish.

A request whose deadline passes while it waits ends with ``RequestTimeout``; anything that escapes
a step ends the requests of that batch and the loop goes on. ``StepLoop.health`` says whether the
thread is alive and stepping (the replica's ``check_health``). Threads and PyTorch: no Ray here
(the Serve deployment in ``pipelines.serve.app`` wraps it).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

from calm_core.batching import Batch, Member, RequestTimeout, step_stats
from calm_core.engine import Engine, GenRequest


class StepLoop:
    """A daemon thread stepping one Batch; ``submit`` hands it a request and a sink that receives
    ``(deltas, finished)`` after every step (or the exception that ended the request)."""

    def __init__(self, engine: Engine, max_rows: int, on_step: Callable[[int, int], None] = lambda rows, tokens: None,
                 timeout_s: float = float("inf")):
        self.batch, self.max_rows, self.on_step, self.timeout_s = Batch(engine), max_rows, on_step, timeout_s
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: list[Member] = []
        self.busy_since: float | None = None  # when the work in progress began (None: idle, waiting for requests)
        self.last_step: float | None = None  # time.monotonic() of the last step done
        self.restarts = 0  # errors that escaped a step and ended its batch
        self.stopped = False  # set to end the thread (a replica shutting down; tests)
        self.thread = threading.Thread(target=self._run, name="calm-step-loop", daemon=True)
        self.thread.start()

    def submit(self, r: GenRequest, sink: Callable) -> Member:
        """Queue a request; set the returned member's ``cancelled`` to drop it."""
        m = Member.start(self.batch.engine, r, sink, self.timeout_s)
        self.inbox.put(m)
        return m

    def health(self, step_timeout_s: float) -> str | None:
        """None when the loop is alive and not stuck; else why not (for ``check_health``)."""
        if not self.thread.is_alive():
            return "the step loop thread has ended"
        busy = self.busy_since
        if busy is not None and time.monotonic() - busy > step_timeout_s:
            return f"the step loop has been in one step for {time.monotonic() - busy:.0f} s (> {step_timeout_s:g} s)"
        return None

    def _admit(self) -> None:
        """Take the queued requests (waiting for one when idle) and join those that fit."""
        if not self.batch.members and not self.waiting:
            self.busy_since = None
            while not self.stopped:
                try:
                    self.waiting.append(self.inbox.get(timeout=1.0))  # wakes now and then to see ``stopped``
                    break
                except queue.Empty:
                    continue
        self.busy_since = time.monotonic()
        while True:
            try:
                self.waiting.append(self.inbox.get(block=False))
            except queue.Empty:
                break
        now = time.monotonic()
        for m in [m for m in self.waiting if now > m.deadline]:
            self.waiting.remove(m)
            self._send(m, RequestTimeout(f"the request waited past its deadline ({self.timeout_s:g} s) without starting"))
        joining, rows = [], self.batch.rows
        while self.waiting and (not rows or rows + self.waiting[0].rows <= self.max_rows):
            m = self.waiting.pop(0)
            if not m.cancelled:
                joining.append(m)
                rows += m.rows
        if not joining:
            return
        try:
            self.batch.join(joining)  # one prefill for all of them
        except Exception:  # one of them cannot start: each alone, so that only it fails
            for m in joining:
                try:
                    self.batch.join([m])
                except Exception as e:
                    self._send(m, e)

    def _run(self) -> None:
        while not self.stopped:
            try:
                self._admit()
                out = self.batch.step()
                self.last_step = time.monotonic()
                for m, e in self.batch.failed:
                    self._send(m, e)
                if out:
                    self.on_step(*step_stats(out))
                for m, deltas, finished in out:
                    self._send(m, (deltas, finished))
            except Exception as e:  # noqa: BLE001 - it ends every request of the batch; the loop goes on
                self.restarts += 1
                for m in self.batch.members:
                    self._send(m, e)
                self.batch = Batch(self.batch.engine)

    @staticmethod
    def _send(m: Member, item) -> None:
        """Hand a request its step; a sink that raises (its consumer is gone) drops that request only."""
        try:
            m.sink(item)
        except Exception:  # noqa: BLE001
            m.cancelled = True
