"""Client-disconnect watches that start only for requests still waiting after a while."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

DISCONNECT_WATCH_DELAY = 0.05


class _DisconnectWatch:
    """Runs `on_disconnect` when the client goes away, once started."""

    __slots__ = ("on_disconnect", "proto", "task")

    def __init__(self, proto: Any, on_disconnect: Callable[[], object]) -> None:
        self.proto = proto
        self.on_disconnect = on_disconnect
        self.task: asyncio.Future[Any] | None = None

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.proto.client_disconnect())
        self.task.add_done_callback(self._fired)

    def _fired(self, task: asyncio.Future[Any]) -> None:
        if not task.cancelled():
            self.on_disconnect()

    def stop(self) -> None:
        # NOTE: Granian's awaitable keeps its done callback after a cancel and is invisible to the
        # cyclic GC: awaitable -> self._fired -> self -> awaitable would leak every watch (with its
        # proto and upstream response) for good. Drop the callback and our reference to break it.
        task, self.task = self.task, None
        if task is not None:
            task.remove_done_callback(self._fired)
            task.cancel()


class SlowRequestWatch:
    """Watches for client disconnects only on requests that are still waiting after a while.

    NOTE: a disconnect watch costs a task per request; most answers come back in a millisecond, so a
    single sweeper moves requests from `fresh` to `aging` every `period` and starts watches on those
    that were already aging (waiting between one and two periods). Per request that is one dict
    insert and one delete; slow generations still learn of a client that left within two periods.
    The sweeper runs only while some request waits in `fresh` or `aging`.
    """

    def __init__(self, period: float = DISCONNECT_WATCH_DELAY) -> None:
        self.period = period
        self.fresh: dict[object, tuple[Any, Callable[[], object]]] = {}
        self.aging: dict[object, tuple[Any, Callable[[], object]]] = {}
        self.watching: dict[object, _DisconnectWatch] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, token: object, proto: Any, on_disconnect: Callable[[], object]) -> None:
        self.fresh[token] = (proto, on_disconnect)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sweep())

    def remove(self, token: object) -> None:
        if self.fresh.pop(token, None) is None and self.aging.pop(token, None) is None:
            watch = self.watching.pop(token, None)
            if watch is not None:
                watch.stop()

    async def _sweep(self) -> None:
        # NOTE: it stops once nothing waits to be watched (an idle gateway must not wake every period);
        # the next `add` starts it again. Started watches need no sweeping, only their own task.
        while self.fresh or self.aging:
            await asyncio.sleep(self.period)
            for token, (proto, on_disconnect) in self.aging.items():
                watch = _DisconnectWatch(proto, on_disconnect)
                watch.start()
                self.watching[token] = watch
            self.aging = self.fresh
            self.fresh = {}
        self._task = None

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
