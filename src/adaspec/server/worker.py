"""The worker: one thread that runs generations in arrival order from a bounded FIFO of jobs.

A Job is shared by its HTTP handler (on the event loop) and the worker thread: the worker posts
events to the job's asyncio queue through the loop (`call_soon_threadsafe`); the handler cancels it
through a threading.Event that the worker checks after every step that releases text.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from adaspec.api import Engine
from adaspec.config import AdaspecError
from adaspec.server.metrics import Metrics
from adaspec.server.schemas import FINISH, APIError

log = logging.getLogger("adaspec.server")


@dataclass(eq=False)  # identity equality: a job is withdrawn from the queue by identity
class Job:
    """One generation request, shared by its handler (event loop) and the worker thread."""

    ids: list[int]  # prompt token ids
    method: str
    options: dict  # make_config options
    arrived: float  # time.monotonic() at arrival
    deadline: float  # time.monotonic() by which the answer must be complete (inf = no limit)
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("delta", str) / ("done", Result) / ...
    cancelled: threading.Event = field(default_factory=threading.Event)
    reason: str = "cancelled"  # why it was cancelled: cancelled (client left), timeout or shutdown

    def post(self, kind: str, value: Any = None) -> None:
        """From the worker thread: hand an event to the handler."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    def cancel(self, reason: str) -> None:
        if not self.cancelled.is_set():
            self.reason = reason
            self.cancelled.set()


class QueueFull(Exception):
    pass


class Worker:
    """The one thread that runs generations, in arrival order, from a bounded FIFO of jobs."""

    def __init__(self, engine: Engine, capacity: int, metrics: Metrics):
        self.engine, self.capacity, self.metrics = engine, capacity, metrics
        self._jobs: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.current: Job | None = None
        self.mean_s = 1.0  # moving average of generation time, for Retry-After
        self._thread = threading.Thread(target=self._run, name="adaspec-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def depth(self) -> int:
        return len(self._jobs)

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(self._jobs) >= self.capacity:
                raise QueueFull
            self._jobs.append(job)
            self._cv.notify()

    def withdraw(self, job: Job) -> bool:
        """Take a job out of the queue; False when the worker already has it (or it is done)."""
        with self._cv:
            try:
                self._jobs.remove(job)
                return True
            except ValueError:
                return False

    def close(self) -> list[Job]:
        """Take no more jobs; return those still waiting. The running one continues unless cancelled."""
        with self._cv:
            self._closed = True
            left = list(self._jobs)
            self._jobs.clear()
            self._cv.notify_all()
        return left

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _take(self) -> Job | None:
        with self._cv:
            while not self._jobs and not self._closed:
                self._cv.wait()
            return self._jobs.popleft() if self._jobs else None

    def _run(self) -> None:
        while (job := self._take()) is not None:
            self.current = job
            t0 = time.monotonic()
            try:
                self._generate(job)
            finally:
                self.current = None
                self.mean_s = 0.8 * self.mean_s + 0.2 * (time.monotonic() - t0)

    def _generate(self, job: Job) -> None:
        if job.cancelled.is_set():
            self.metrics.generations.labels(job.reason).inc()
            job.post("cancelled")
            return
        try:
            stream = self.engine.stream(job.ids, method=job.method, chat=False, **job.options)
            for delta in stream:
                job.post("delta", delta)
                if job.cancelled.is_set():
                    stream.close()
                    self.metrics.generations.labels(job.reason).inc()
                    job.post("cancelled")
                    return
        except AdaspecError as e:  # validated before queueing, so rare (e.g. a drafter's shorter context)
            self.metrics.generations.labels("error").inc()
            job.post("error", APIError(400, str(e)))
        except Exception as e:
            log.exception("generation failed")
            self.metrics.generations.labels("error").inc()
            job.post("error", APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error"))
        else:
            self.metrics.finished(stream.result, FINISH[stream.result.finish_reason])
            job.post("done", stream.result)
