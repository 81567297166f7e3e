"""The workers: one thread that runs generations from a bounded FIFO of jobs, either one at a time
(`Worker`, --max-batch 1) or many together with one target forward per step (`BatchWorker`,
continuous batching: batching.py).

A Job is shared by its HTTP handler (on the event loop) and the worker thread: the worker posts
events to the job's asyncio queue through the loop (`call_soon_threadsafe`); the handler cancels it
through a threading.Event that the worker checks after every step (the batch worker: every step of
the batch, so a client that leaves frees its slot within one step).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from adaspec.api import Engine, Stream
from adaspec.config import AdaspecError, make_config
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

    def alive(self) -> bool:
        """Whether the thread still runs generations (a replica's health check, server/ray_serve.py)."""
        return self._thread.is_alive()

    def running(self) -> list[Job]:
        """The jobs generating now."""
        return [self.current] if self.current is not None else []

    def check(self, cfg) -> None:
        """Raise AdaspecError when this worker cannot run a request with this config."""
        self.engine.prepare(cfg, warn=False)

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


class BatchWorker(Worker):
    """The one thread that runs up to `settings.max_batch` generations together (batching.Batcher):
    queued jobs join the batch between steps as room allows, in arrival order; each step every
    running job advances, its new text is posted, and cancelled jobs leave at once."""

    def __init__(self, engine: Engine, capacity: int, metrics: Metrics, settings):
        from adaspec.batching import Batcher

        super().__init__(engine, capacity, metrics)
        self.batcher = Batcher(engine, settings)
        self._active: dict = {}  # batching.Sequence -> (Job, Stream, started)
        self._thread.name = "adaspec-batch-worker"

    def running(self) -> list[Job]:
        return [job for job, _, _ in list(self._active.values())]

    def check(self, cfg) -> None:
        self.engine.prepare(cfg, warn=False, batched=True)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._active and not self._closed:
                    self._cv.wait()
                if self._closed and not self._active:
                    return
            self._admit()
            self._drop_cancelled()
            if self._active:
                self._step()

    def _admit(self) -> None:
        """Move queued jobs into the batch while there is room (the first that does not fit waits)."""
        while True:
            with self._cv:
                if not self._jobs or self._closed:
                    return
                job = self._jobs[0]
                if job.cancelled.is_set():
                    self._jobs.popleft()
                    self.metrics.generations.labels(job.reason).inc()
                    job.post("cancelled")
                    continue
                try:
                    cfg = make_config(job.method, **job.options)
                except AdaspecError as e:
                    self._jobs.popleft()
                    self.metrics.generations.labels("error").inc()
                    job.post("error", APIError(400, str(e)))
                    continue
                if not self.batcher.room_for(len(job.ids), cfg):
                    return
                self._jobs.popleft()
            try:
                seq = self.batcher.admit(job.ids, cfg, self.engine.stop_strings(cfg))
            except AdaspecError as e:
                self.metrics.generations.labels("error").inc()
                job.post("error", APIError(400, str(e)))
                continue
            self._active[seq] = (job, Stream(None, self.engine.tokenizer, cfg.stop), time.monotonic())

    def _drop_cancelled(self) -> None:
        for seq, (job, _, _) in list(self._active.items()):
            if job.cancelled.is_set():
                self.batcher.cancel(seq)
                del self._active[seq]
                self.metrics.generations.labels(job.reason).inc()
                job.post("cancelled")

    def _step(self) -> None:
        size = sum(1 for s in self._active if s.decoding)
        try:
            touched = self.batcher.step()
        except Exception as e:  # one failure ends every generation of the batch, never the worker
            log.exception("batched generation failed")
            for seq, (job, _, _) in list(self._active.items()):
                self.batcher.cancel(seq)
                self.metrics.generations.labels("error").inc()
                job.post("error", APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error"))
            self._active.clear()
            return
        self.metrics.batch_step(size, self.batcher.last_rows, self.batcher.last_caps, self.batcher.head_hits)
        for seq in touched:
            job, stream, started = self._active[seq]
            if seq.new and (delta := stream.add(seq.new)):
                job.post("delta", delta)
            if seq.done:
                result = seq.run.result()
                if delta := stream.end(result):
                    job.post("delta", delta)
                del self._active[seq]
                self.metrics.finished(result, FINISH[result.finish_reason])
                job.post("done", result)
                share = (time.monotonic() - started) / max(1, len(self._active) + 1)
                self.mean_s = 0.8 * self.mean_s + 0.2 * share
