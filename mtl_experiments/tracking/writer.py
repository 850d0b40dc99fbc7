"""``BackgroundWriter``: one thread that does a logger's store writes, in order, off the training thread."""

from __future__ import annotations

import atexit
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class BackgroundWriter:
    """Calls ``write(batch)`` on one daemon thread for the items ``put`` in, in the order they were put; a batch is
    the items that waited together (at most ``batch_items``), so a slow store gets fewer, larger writes.

    - ``put`` blocks while ``max_items`` items wait (back-pressure: memory stays bounded when the store is slower
      than training);
    - ``flush`` returns once every item put before it went through ``write`` (or, if the thread died, writes what
      is left on the calling thread);
    - an exception from ``write`` goes to ``on_error(exc, batch)`` and the thread goes on with the next batch: a
      failed write never stops training;
    - the thread starts with the first ``put`` and ends at ``close`` (also at interpreter exit, after a flush).
    """

    def __init__(
        self,
        write: Callable[[list], None],
        on_error: Callable[[BaseException, list], None],
        max_items: int = 256,
        batch_items: int = 64,
        name: str = "mtl-writer",
    ):
        if max_items < 1 or batch_items < 1:
            raise ValueError(f"max_items and batch_items must be >= 1, got {max_items} and {batch_items}")
        self.write, self.on_error = write, on_error
        self.max_items, self.batch_items, self.name = max_items, batch_items, name
        self._items: deque = deque()
        self._busy = 0  # items handed to write() that it has not returned from
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False

    @property
    def waiting(self) -> int:
        """Items put but not yet written (queued or being written)."""
        return len(self._items) + self._busy

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def put(self, item: Any) -> None:
        with self._cond:
            while len(self._items) >= self.max_items and self.alive():
                self._cond.wait()
            self._items.append(item)
            if not self.alive():
                self._start()
            self._cond.notify_all()

    def flush(self) -> None:
        with self._cond:
            while (self._items or self._busy) and self.alive():
                self._cond.wait(timeout=1.0)
            left = list(self._items)
            self._items.clear()
            self._busy = 0
        for i in range(0, len(left), self.batch_items):  # only when the thread died (never in normal operation)
            self._call(left[i : i + self.batch_items])

    def close(self, timeout: float = 60.0) -> None:
        """Flush, then end the thread (a later ``put`` starts a new one)."""
        self.flush()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._cond:
            self._closing, self._thread = False, None
        atexit.unregister(self.close)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        atexit.register(self.close)  # a daemon thread dies with the interpreter: what it still holds is written first

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closing:
                    self._cond.wait()
                if not self._items:
                    return
                batch = [self._items.popleft() for _ in range(min(self.batch_items, len(self._items)))]
                self._busy = len(batch)
                self._cond.notify_all()  # room for a blocked put
            self._call(batch)
            with self._cond:
                self._busy = 0
                self._cond.notify_all()

    def _call(self, batch: list) -> None:
        try:
            self.write(batch)
        except Exception as e:  # noqa: BLE001 - the writer must outlive any failure: on_error reports it
            try:
                self.on_error(e, batch)
            except Exception:  # noqa: BLE001
                log.exception("%s: reporting a failed write failed too", self.name)
