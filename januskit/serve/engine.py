"""The serving engine: one worker thread owns the model; requests wait in a fair FIFO queue.

Compatible requests waiting together are batched into one model call: image generations with the same
sampling parameters become one `generate_images([...prompts])`, plain chats with the same parameters one
`chat_batch`. Streaming chats run alone and stop as soon as their client goes away. Nothing here knows HTTP.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable


class QueueFull(RuntimeError):
    pass


@dataclass
class Job:
    kind: str  # "chat" | "stream" | "image"
    payload: dict[str, Any]
    params: tuple  # batching key: only jobs with equal params share a model call
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    progress: float = 0.0
    on_piece: Callable[[str | None], None] | None = None  # streaming sink; None marks the end
    id: int = 0
    created: float = field(default_factory=time.time)

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    def __init__(self, janus, max_queue: int = 64, max_batch: int = 8):
        self.janus = janus
        self.max_batch = max_batch
        self._q: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._pending: list[Job] = []
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self.jobs: dict[int, Job] = {}
        self.stats = {"completed": 0, "failed": 0, "cancelled": 0, "batches": 0}
        self._thread = threading.Thread(target=self._run, name="januskit-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ submit
    def submit(self, kind: str, payload: dict, params: tuple = (), on_piece=None) -> Job:
        job = Job(kind, payload, (kind,) + tuple(params), on_piece=on_piece, id=next(self._ids))
        try:
            self._q.put_nowait(job)
        except queue.Full:
            raise QueueFull("the server is busy: too many requests are waiting; retry later") from None
        self.jobs[job.id] = job
        self._forget_old()
        return job

    def _forget_old(self, keep_s: float = 600.0) -> None:
        now = time.time()
        for jid in [j for j, job in self.jobs.items() if job.future.done() and now - job.created > keep_s]:
            self.jobs.pop(jid, None)

    def queue_depth(self) -> int:
        return self._q.qsize() + len(self._pending)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------------------------------ worker
    def _next_batch(self) -> list[Job]:
        while True:
            try:
                self._pending.append(self._q.get(timeout=0.05 if self._pending else 0.5))
            except queue.Empty:
                break
        self._pending = [j for j in self._pending if not self._drop_if_cancelled(j)]
        if not self._pending:
            return []
        head = self._pending[0]  # FIFO: the oldest job always goes next, compatible ones join it
        if head.kind == "stream":
            batch = [head]
        else:
            batch = [j for j in self._pending if j.params == head.params][: self.max_batch]
        self._pending = [j for j in self._pending if j not in batch]
        return batch

    def _drop_if_cancelled(self, job: Job) -> bool:
        if job.cancelled.is_set():
            self.stats["cancelled"] += 1
            if not job.future.done():
                job.future.cancel()
            if job.on_piece is not None:
                job.on_piece(None)
            return True
        return False

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if not batch:
                continue
            self.stats["batches"] += 1
            try:
                {"chat": self._chat, "stream": self._stream, "image": self._images}[batch[0].kind](batch)
                self.stats["completed"] += len(batch)
            except Exception as e:  # a failed request must never take the worker down
                self.stats["failed"] += len(batch)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                    if job.on_piece is not None:
                        job.on_piece(None)

    def _chat(self, batch: list[Job]) -> None:
        kw = batch[0].payload["options"]
        replies = self.janus.chat_batch([j.payload["messages"] for j in batch], system_prompt=batch[0].payload.get("system"),
                                        **kw) if len({j.payload.get("system") for j in batch}) == 1 else None
        if replies is None:  # different system prompts: answer one by one
            replies = [self.janus.chat(messages=j.payload["messages"], system_prompt=j.payload.get("system"), **kw)
                       for j in batch]
        for job, reply in zip(batch, replies):
            job.future.set_result(reply)

    def _stream(self, batch: list[Job]) -> None:
        job = batch[0]
        pieces = []
        for piece in self.janus.stream_chat(messages=job.payload["messages"], system_prompt=job.payload.get("system"),
                                            **job.payload["options"]):
            if job.cancelled.is_set():
                self.stats["cancelled"] += 1
                break
            pieces.append(piece)
            job.on_piece(piece)
        job.on_piece(None)
        job.future.set_result("".join(pieces))

    def _images(self, batch: list[Job]) -> None:
        prompts, owners = [], []
        for job in batch:
            prompts.append(job.payload["prompt"])
            owners.append(job)
        opts = dict(batch[0].payload["options"])
        n = opts.pop("n")

        def on_step(i, total):
            for job in owners:
                job.progress = i / total

        result = self.janus.generate_images(prompts, n=n, on_step=on_step, **opts)
        for k, job in enumerate(owners):
            job.progress = 1.0
            job.future.set_result(result.images[k * n:(k + 1) * n])
