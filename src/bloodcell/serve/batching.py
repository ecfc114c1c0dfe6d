"""Micro-batching for the server: the images of concurrent requests go through the model together.

``MicroBatcher.submit(item, tta)`` queues one image and waits for its probabilities. One inference
thread takes everything queued when it becomes free (at most ``max_batch``) and runs it as one
batch: nothing waits for a timer, so a lone request goes straight through, and under load the
batch grows by itself with the queue. An item is a decoded uint8 array, or the bytes of an image
file, which that thread decodes with ``prepare`` first (one hand-off between threads per batch
instead of two per request; a file that fails to decode fails its own request only).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class MicroBatcher:
    """Batches ``probs_fn(images N x H x W x 3, tta) -> N x C`` over the requests waiting for it."""

    def __init__(self, probs_fn: Callable[[np.ndarray, bool], np.ndarray], max_batch: int = 64,
                 prepare: Callable[[bytes], np.ndarray] | None = None):
        self.probs_fn, self.max_batch, self.prepare = probs_fn, max_batch, prepare
        # One forward pass at a time: each already uses every core ORT was given.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="bloodcell-infer")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self.batches = 0  # how many forward passes, and how many images they took (for tests, stats)
        self.images = 0

    async def submit(self, image: np.ndarray | bytes, tta: bool = False) -> np.ndarray:
        """The class probabilities (C,) of one uint8 image H x W x 3 (or file bytes, decoded by
        ``prepare``; its exception, if it raises, is this call's)."""
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
                    results = await loop.run_in_executor(self.executor, self._work,
                                                         [it[0] for it in group], tta)
                except Exception as e:  # noqa: BLE001 - each waiting request gets the error
                    results = [e] * len(group)
                for it, r in zip(group, results, strict=True):
                    if not it[2].done():
                        (it[2].set_exception if isinstance(r, Exception) else it[2].set_result)(r)

    def _work(self, items: list, tta: bool) -> list:
        """In the inference thread: decode what is bytes, one forward pass; per item its
        probabilities or its decoding error."""
        results: list = [None] * len(items)
        arrays = []
        for i, item in enumerate(items):
            if isinstance(item, np.ndarray):
                arrays.append((i, item))
                continue
            try:
                arrays.append((i, self.prepare(item)))
            except Exception as e:  # noqa: BLE001 - that request's own error (ImageError)
                results[i] = e
        if arrays:
            probs = self.probs_fn(np.stack([a for _, a in arrays]), tta)
            self.batches += 1
            self.images += len(arrays)
            for (i, _), p in zip(arrays, probs, strict=True):
                results[i] = p
        return results

    def close(self) -> None:
        """Stop the inference thread (after the batch in flight)."""
        if self._task is not None:
            self._task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)
