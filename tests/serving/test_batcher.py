"""Micro-batching: requests that wait together run as one batch; each caller gets its own row;
a failing batch fails its callers only."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from skinlesion.serving.batcher import MicroBatcher


def test_groups_requests_and_returns_each_its_row() -> None:
    sizes: list[int] = []
    release = threading.Event()

    def batch_fn(imgs: dict[str, np.ndarray]) -> np.ndarray:
        release.wait(10)  # the first batch holds the worker while the others queue up
        sizes.append(len(imgs["a"]))
        return imgs["a"].reshape(len(imgs["a"]), -1).sum(1, keepdims=True) * np.ones((1, 2))

    batcher = MicroBatcher(batch_fn, max_batch=4, max_wait_ms=0)
    batcher.start()
    futures = [batcher.submit({"a": np.full((2, 2), i, dtype=np.float64)}) for i in range(9)]
    release.set()
    rows = [f.result(10) for f in futures]
    batcher.stop()
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(row, [4.0 * i, 4.0 * i])
    assert sum(sizes) == 9 and max(sizes) == 4 and len(sizes) < 9
    assert batcher.images == 9 and batcher.batches == len(sizes)


def test_a_failing_batch_fails_its_callers_and_the_worker_goes_on() -> None:
    def batch_fn(imgs: dict[str, np.ndarray]) -> np.ndarray:
        if (imgs["a"] < 0).any():
            raise RuntimeError("bad batch")
        return imgs["a"].reshape(len(imgs["a"]), -1)

    batcher = MicroBatcher(batch_fn, max_batch=1, max_wait_ms=0)
    batcher.start()
    bad = batcher.submit({"a": np.array([-1.0])})
    with pytest.raises(RuntimeError, match="bad batch"):
        bad.result(10)
    assert batcher.submit({"a": np.array([2.0])}).result(10).tolist() == [2.0]
    batcher.stop()


def test_concurrent_submitters() -> None:
    batcher = MicroBatcher(lambda imgs: imgs["a"] * 2, max_batch=8, max_wait_ms=2)
    batcher.start()
    with ThreadPoolExecutor(16) as pool:
        out = list(pool.map(lambda i: batcher.submit({"a": np.array([i])}).result(10), range(64)))
    batcher.stop()
    assert [int(o[0]) for o in out] == [2 * i for i in range(64)]


def test_submit_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="before start"):
        MicroBatcher(lambda imgs: imgs["a"]).submit({"a": np.zeros(1)})
