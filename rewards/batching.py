"""Turn per-sample async reward calls into batched calls of a model.

The reward runner calls a plugin once per sample, all samples of a batch concurrently in one
event loop. :class:`MicroBatcher` collects those calls for up to ``max_wait_s`` (or until
``max_batch`` are waiting) and runs ``batch_fn(items) -> results`` once, in a thread, so a model
scores a whole batch in a few forward passes.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Sequence


class MicroBatcher:
    def __init__(self, batch_fn: Callable[[list[Any]], Sequence[Any]], max_batch: int = 32,
                 max_wait_s: float = 0.005):
        self.batch_fn = batch_fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (e.g. one asyncio.run per batch)
            self._loop, self._pending, self._timer = loop, [], None
        fut = loop.create_future()
        self._pending.append((item, fut))
        if len(self._pending) >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.max_wait_s, self._flush)
        return await fut

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            asyncio.ensure_future(self._run(batch))

    async def _run(self, batch) -> None:
        items = [item for item, _ in batch]
        try:
            results = await asyncio.get_running_loop().run_in_executor(None, self.batch_fn, items)
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for "
                                   f"{len(items)} items")
        except Exception as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), res in zip(batch, results):
            if not fut.done():
                fut.set_result(res)
