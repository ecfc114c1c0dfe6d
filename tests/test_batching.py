"""batching: concurrent submissions share forward passes, in order, and errors reach every waiter."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from bloodcell.serve.batching import MicroBatcher


def slow_probs(images: np.ndarray, tta: bool) -> np.ndarray:
    time.sleep(0.02)  # a forward pass long enough for the queue to fill behind it
    return np.stack([images[:, 0, 0, 0].astype(float), np.full(len(images), float(tta))], 1)


def test_concurrent_images_go_through_together_and_each_gets_its_own_answer() -> None:
    batcher = MicroBatcher(slow_probs, max_batch=8)

    async def main():
        images = [np.full((4, 4, 3), i, np.uint8) for i in range(20)]
        return await asyncio.gather(*(batcher.submit(im, tta=i % 5 == 0) for i, im in enumerate(images)))

    out = asyncio.run(main())
    assert [int(p[0]) for p in out] == list(range(20))  # each answer is its own image's
    assert [bool(p[1]) for p in out] == [i % 5 == 0 for i in range(20)]  # tta kept apart
    assert batcher.images == 20 and batcher.batches < 10  # batched: at most 8 per pass, TTA apart
    batcher.close()


def test_a_lone_request_does_not_wait_for_company() -> None:
    batcher = MicroBatcher(lambda x, tta: np.zeros((len(x), 2)), max_batch=64)

    async def one():
        t0 = time.perf_counter()
        await batcher.submit(np.zeros((4, 4, 3), np.uint8))
        return time.perf_counter() - t0

    assert asyncio.run(one()) < 0.5 and batcher.batches == 1
    batcher.close()


def test_a_failing_pass_fails_its_requests_and_the_next_ones_still_run() -> None:
    calls = []

    def flaky(images, tta):
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return np.ones((len(images), 2))

    batcher = MicroBatcher(flaky)

    async def main():
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(np.zeros((2, 2, 3), np.uint8))
        return await batcher.submit(np.zeros((2, 2, 3), np.uint8))

    assert asyncio.run(main()).tolist() == [1.0, 1.0]
    batcher.close()


def test_bytes_are_decoded_in_the_batch_and_a_bad_one_fails_alone() -> None:
    def prepare(data: bytes) -> np.ndarray:
        if data == b"bad":
            raise ValueError("not an image")
        return np.full((4, 4, 3), int(data), np.uint8)

    batcher = MicroBatcher(slow_probs, max_batch=8, prepare=prepare)

    async def main():
        return await asyncio.gather(*(batcher.submit(b) for b in [b"1", b"bad", b"3", b"4"]),
                                    return_exceptions=True)

    out = asyncio.run(main())
    assert isinstance(out[1], ValueError) and str(out[1]) == "not an image"
    assert [int(out[i][0]) for i in (0, 2, 3)] == [1, 3, 4]
    assert batcher.images == 3  # the bad file never reached the model
    batcher.close()
