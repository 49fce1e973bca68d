"""select.poll with the face of selectors.PollSelector, for bpsh's stdio server.

`selectors` imports `enum`, `collections`, `functools`... (a few ms of every bpsh run;
bench/results-startup.md), and poll, unlike epoll, takes regular files (a redirected
stdin). tests/unit/test_startup.py checks that it answers as PollSelector does.
"""

from __future__ import annotations

import select
TYPE_CHECKING = False  # typing costs start-up; annotations only
if TYPE_CHECKING:
    from typing import Any

EVENT_READ, EVENT_WRITE = 1, 2      # as selectors'


class Poller:
    """What the stdio server uses of selectors.PollSelector, on select.poll itself.

    register/modify/unregister take a socket or an fd (a closed socket is found by
    identity), with PollSelector's errors: KeyError for a second register or an unknown
    object, ValueError for bad events or fd. `select` returns (data, events) pairs; a
    hang-up or an error counts as both EVENT_READ and EVENT_WRITE, masked by what is
    watched, exactly as PollSelector reports them.
    """

    def __init__(self) -> None:
        self._poll = select.poll()
        self._map: dict[int, list[Any]] = {}        # fd -> [fileobj, events, data]

    @staticmethod
    def _fd(fileobj: Any) -> int:
        fd = fileobj if isinstance(fileobj, int) else int(fileobj.fileno())
        if fd < 0:
            raise ValueError(f"Invalid file descriptor: {fd}")
        return fd

    def _lookup(self, fileobj: Any) -> int:
        try:
            fd = self._fd(fileobj)
        except ValueError:
            fd = next((fd for fd, entry in self._map.items() if entry[0] is fileobj), -1)
        if fd not in self._map:
            raise KeyError(f"{fileobj!r} is not registered")
        return fd

    @staticmethod
    def _mask(events: int) -> int:
        if not events or events & ~(EVENT_READ | EVENT_WRITE):
            raise ValueError(f"Invalid events: {events!r}")
        return (select.POLLIN if events & EVENT_READ else 0) | \
            (select.POLLOUT if events & EVENT_WRITE else 0)

    def register(self, fileobj: Any, events: int, data: Any = None) -> None:
        mask = self._mask(events)
        fd = self._fd(fileobj)
        if fd in self._map:
            raise KeyError(f"{fileobj!r} (FD {fd}) is already registered")
        self._poll.register(fd, mask)
        self._map[fd] = [fileobj, events, data]

    def modify(self, fileobj: Any, events: int, data: Any = None) -> None:
        fd = self._lookup(fileobj)
        entry = self._map[fd]
        if events != entry[1]:
            try:
                self._poll.modify(fd, self._mask(events))
            except BaseException:
                self.unregister(fileobj)
                raise
        entry[1:] = [events, data]

    def unregister(self, fileobj: Any) -> None:
        fd = self._lookup(fileobj)
        del self._map[fd]
        try:
            self._poll.unregister(fd)
        except (OSError, KeyError):
            pass                    # the fd was closed since it was registered

    def select(self, timeout: float | None = None) -> list[tuple[Any, int]]:
        if timeout is not None:
            timeout = 0 if timeout <= 0 else int(-(-timeout * 1e3 // 1))   # ms, rounded up
        try:
            ready = self._poll.poll(timeout)
        except InterruptedError:
            return []
        out = []
        for fd, got in ready:
            events = (EVENT_WRITE if got & ~select.POLLIN else 0) | \
                (EVENT_READ if got & ~select.POLLOUT else 0)
            entry = self._map.get(fd)
            if entry is not None:
                out.append((entry[2], events & entry[1]))
        return out

    def registered(self) -> list[Any]:
        return [entry[0] for entry in self._map.values()]

    def close(self) -> None:
        self._map.clear()
