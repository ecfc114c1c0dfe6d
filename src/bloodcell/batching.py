"""Micro-batching for the server: the images of concurrent requests go through the model together.

``MicroBatcher.submit(image, tta)`` queues one decoded image and waits for its probabilities. One
inference thread takes everything queued when it becomes free (at most ``max_batch``) and runs it
as one batch: nothing waits for a timer, so a lone request goes straight through, and under load
the batch grows by itself with the queue (a batch of 32 costs far less than 32 single passes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class MicroBatcher:
    """Batches ``probs_fn(images N x H x W x 3, tta) -> N x C`` over the requests waiting for it."""

    def __init__(self, probs_fn: Callable[[np.ndarray, bool], np.ndarray], max_batch: int = 64):
        self.probs_fn, self.max_batch = probs_fn, max_batch
        # One forward pass at a time: each already uses every core ORT was given.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="bloodcell-infer")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self.batches = 0  # how many forward passes, and how many images they took (for tests, stats)
        self.images = 0

    async def submit(self, image: np.ndarray, tta: bool = False) -> np.ndarray:
        """The class probabilities (C,) of one uint8 image H x W x 3."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first call, or a new event loop (a test client's)
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._run())
        future = loop.create_future()
        self._queue.put_nowait((image, tta, future))
        return await future

    async def run(self, images: np.ndarray, tta: bool = False) -> np.ndarray:
        """Probabilities of a batch a request brought whole (/predict/batch), on the same thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.probs_fn, images, tta)

    async def _run(self) -> None:
        queue, loop = self._queue, self._loop
        while True:
            items = [await queue.get()]
            while len(items) < self.max_batch and not queue.empty():
                items.append(queue.get_nowait())
            items = [it for it in items if not it[2].done()]  # a client that went away
            for tta in (False, True):
                group = [it for it in items if it[1] is tta]
                if not group:
                    continue
                try:
                    probs = await loop.run_in_executor(self.executor, self.probs_fn,
                                                       np.stack([it[0] for it in group]), tta)
                except Exception as e:  # noqa: BLE001 - each waiting request gets the error
                    for it in group:
                        if not it[2].done():
                            it[2].set_exception(e)
                    continue
                self.batches += 1
                self.images += len(group)
                for it, p in zip(group, probs, strict=True):
                    if not it[2].done():
                        it[2].set_result(p)

    def close(self) -> None:
        """Stop the inference thread (after the batch in flight)."""
        if self._task is not None:
            self._task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)
