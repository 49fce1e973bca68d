"""Log lines that a hostile caller can provoke, at a rate no caller can flood.

Who may connect to the node port, or write to a ctl file, can make the daemons log as fast
as they can try; the administrator still needs to see who was refused and why. So: lines
are counted per key (a peer host, a uid); each key gets `burst` lines per `window`
seconds, then one line saying the rest of the window is only counted, and the count comes
with the key's first line of a later window. At most `keys` keys are remembered (the one
seen first is forgotten first), so a flood of new keys costs bounded memory too.
"""

from __future__ import annotations

import logging
from typing import Any, Hashable


class RateLog:
    BURST = 10
    WINDOW = 60.0
    KEYS = 1024

    def __init__(self, logger: logging.Logger, level: int, what: str = "lines") -> None:
        self.logger, self.level, self.what = logger, level, what
        self._keys: dict[Hashable, list[float]] = {}     # key -> [start, lines, quiet]

    def __len__(self) -> int:
        return len(self._keys)

    def log(self, key: Hashable, now: float, fmt: str, *args: Any) -> None:
        entry = self._keys.get(key)
        if entry is None or now - entry[0] >= self.WINDOW:
            quiet = int(entry[2]) if entry is not None else 0
            self._keys.pop(key, None)
            while len(self._keys) >= self.KEYS:
                del self._keys[next(iter(self._keys))]
            entry = self._keys[key] = [now, 0, 0]
            if quiet:
                fmt += " (and %d more %s of %s before this were not logged)"
                args += (quiet, self.what, key)
        if entry[1] < self.BURST:
            entry[1] += 1
            self.logger.log(self.level, fmt, *args)
            return
        entry[2] += 1
        if entry[2] == 1:
            self.logger.log(self.level, "%s: more than %d %s in %g s; counting the rest "
                            "without a line", key, self.BURST, self.what, self.WINDOW)
