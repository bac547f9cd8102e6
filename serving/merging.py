"""Faces of concurrent requests merged into one Triton call (micro-batching in the gateway).

At most ``slots`` calls are in flight. A request that finds a slot free calls at once, alone: at
low load nothing waits for company, so merging adds no latency. A request that finds every slot
busy queues; when a call ends, everything queued (up to ``max_batch`` faces) goes out as the next
call and each request gets its own rows back. Under load, one call then carries many requests'
faces: fewer round trips and protobuf messages when Triton is across a network, and batches that
Triton's dynamic batcher does not have to assemble.

A queued request waits no longer than its own time budget; when that ends first it fails like a
Triton timeout, and its faces are dropped from the next call if that has not gone out yet. A call
that fails fails every request it carried, each with the call's error.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import numpy as np

from cdface.serving.errors import ServingError

Call = Callable[[np.ndarray, float], Awaitable[np.ndarray]]  # (crops, ends_at monotonic) -> rows


@dataclass(eq=False)
class _Waiting:
    crops: np.ndarray
    ends_at: float
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class CallMerger:
    """``await merger.run(crops, ends_at)``: ``call(crops, ends_at)``'s rows, possibly from a merged call."""

    def __init__(self, call: Call, *, slots: int, max_batch: int, timeout_error: Callable[[], ServingError]) -> None:
        if slots < 1 or max_batch < 1:
            raise ValueError("slots and max_batch must be at least 1")
        self._call = call
        self._free = slots
        self.max_batch = max_batch
        self._timeout_error = timeout_error
        self._queue: deque[_Waiting] = deque()
        self._dispatches: set[asyncio.Task] = set()
        self.calls = 0     # Triton calls made, merged or not
        self.requests = 0  # run() calls they answered

    async def run(self, crops: np.ndarray, ends_at: float) -> np.ndarray:
        if len(crops) > self.max_batch:
            raise ValueError(f"{len(crops)} crops exceed the merger's batch of {self.max_batch}")
        if self._free > 0 and not self._queue:
            self._free -= 1
            try:
                self.calls += 1
                self.requests += 1
                return await self._call(crops, ends_at)
            finally:
                self._release()
        waiting = _Waiting(crops, ends_at)
        self._queue.append(waiting)
        try:
            return await asyncio.wait_for(waiting.future, max(0.0, ends_at - time.monotonic()))
        except asyncio.TimeoutError:
            raise self._timeout_error() from None

    def _release(self) -> None:
        self._free += 1
        while self._queue and self._free > 0:
            batch: list[_Waiting] = []
            size = 0
            while self._queue and size + len(self._queue[0].crops) <= self.max_batch:
                waiting = self._queue.popleft()
                if not waiting.future.done():  # not timed out or cancelled while queued
                    batch.append(waiting)
                    size += len(waiting.crops)
            if batch:
                self._free -= 1
                task = asyncio.get_running_loop().create_task(self._dispatch(batch))
                self._dispatches.add(task)
                task.add_done_callback(self._dispatches.discard)

    async def _dispatch(self, batch: list[_Waiting]) -> None:
        try:
            self.calls += 1
            self.requests += len(batch)
            rows = await self._call(np.concatenate([w.crops for w in batch]), max(w.ends_at for w in batch))
        except Exception as exc:  # every request the call carried gets its error
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(exc)
        else:
            start = 0
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_result(rows[start:start + len(waiting.crops)])
                start += len(waiting.crops)
        finally:
            for waiting in batch:  # cancelled mid-call (shutdown): nobody is left hanging
                if not waiting.future.done():
                    waiting.future.set_exception(self._timeout_error())
            self._release()
