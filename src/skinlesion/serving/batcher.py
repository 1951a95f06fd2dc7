"""Micro-batching: requests that arrive within a few milliseconds of each other share one batched
forward pass, so a loaded server runs batches like ``skinlesion predict`` instead of one image
at a time.

A single worker thread owns the model's forward passes. It takes the first waiting item, then
keeps collecting until ``max_batch`` items or ``max_wait_ms`` after the first, and answers each
caller through a :class:`concurrent.futures.Future`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

BatchFn = Callable[[dict[Any, np.ndarray]], Sequence[Any]]


@dataclass
class _Item:
    arrays: dict[Any, np.ndarray]  # one prepared image per preprocessing spec
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """Groups single-image requests into batches for ``batch_fn`` (stacked arrays per key ->
    one result per item, e.g. an (N, C) array).

    Example::

        batcher = MicroBatcher(lambda imgs: ensemble_probs(members, imgs, runtime, tta))
        batcher.start()
        probs = batcher.submit({spec: prepared}).result()
    """

    def __init__(
        self,
        batch_fn: BatchFn,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        lock: threading.Lock | None = None,
    ) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(
                f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch}, {max_wait_ms}"
            )
        self.batch_fn = batch_fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.lock = lock or threading.Lock()
        self.batches = 0  # batches run and images answered, for /health
        self.images = 0
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, arrays: dict[Any, np.ndarray]) -> Future:
        """Queue one prepared image; the future's result is its item of ``batch_fn``'s output."""
        if self._thread is None:
            raise RuntimeError("MicroBatcher.submit before start()")
        item = _Item(arrays)
        self._queue.put(item)
        return item.future

    def _collect(self, first: _Item) -> tuple[list[_Item], bool]:
        items, deadline = [first], time.monotonic() + self.max_wait
        while len(items) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return items, True
            items.append(item)
        return items, False

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            items, stopping = self._collect(first)
            self._answer(items)
            if stopping:
                return

    def _answer(self, items: list[_Item]) -> None:
        try:
            stacked = {k: np.stack([it.arrays[k] for it in items]) for k in items[0].arrays}
            with self.lock:
                out = self.batch_fn(stacked)
        except Exception as err:  # noqa: BLE001 - the callers get the error, the worker goes on
            log.exception("batch of %d failed", len(items))
            for it in items:
                it.future.set_exception(err)
            return
        self.batches += 1
        self.images += len(items)
        for it, row in zip(items, out, strict=True):
            it.future.set_result(row)
