"""Checks of decoded msgpack values (an image's, bpfs.migrate.image): each returns the value
when it is good and raises `corrupt` (EINVAL, "corrupt image: ...") naming it when not.

Every checker returns at once when the value is good and formats its message only when it
is not: a node checks every image it restores, and eager f-strings were most of it.
"""

from __future__ import annotations

from typing import Any

from bpfs.migrate.errors import corrupt


def check(cond: bool, what: str) -> None:
    if not cond:
        raise corrupt(what)


def exact_map(obj: Any, keys: tuple[str, ...], what: str) -> dict:
    if type(obj) is dict and len(obj) == len(keys) and all(k in obj for k in keys):
        return obj
    check(isinstance(obj, dict), f"{what} is not a map")
    missing = [k for k in keys if k not in obj]
    check(not missing, f"{what} lacks {', '.join(missing)}")
    extra = [k for k in obj if k not in keys]
    check(not extra, f"{what} has unknown keys {extra!r}")
    return obj


KINDS = {str: "a string", bool: "a bool", bytes: "binary", list: "a list"}


def typed(v: Any, kind: type, what: str) -> Any:
    """`v` if its type is exactly `kind` (str, bool, bytes or list), else corrupt."""
    if type(v) is kind:
        return v
    raise corrupt(f"{what} is not {KINDS[kind]}")


def bounded(v: Any, lo: int, hi: int, what: str) -> int:
    """`v` if it is an int (not a bool) in [lo, hi], else corrupt."""
    if type(v) is int and lo <= v <= hi:
        return v
    raise corrupt(f"{what} is not an integer in [{lo}, {hi}]")
