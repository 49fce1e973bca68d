"""Plain records for modules on the CLIs' start-up path.

`dataclasses` imports `inspect` (and with it `ast` and `tokenize`) and generates code
per class: about 12 ms of bpsh's start-up on this machine, a quarter of `bpsh 1 true`.
`record` gives the part of it those modules use — fields from the class's annotations,
defaults, `Factory` for mutable defaults, `__repr__`, `__eq__` and, when frozen,
immutability and `__hash__` — without generating code. Daemons may keep dataclasses.

    @record(frozen=True)
    class Row:
        number: int
        state: str = "down"
        tags: list = Factory(list)
"""

from __future__ import annotations

_MISSING = object()


class Factory:
    """A default made fresh for each instance (dataclasses' default_factory)."""

    def __init__(self, make) -> None:
        self.make = make


def record(cls=None, *, frozen: bool = False, eq: bool = True):
    """Class decorator; see the module docstring. Misuse raises TypeError like a dataclass."""
    def wrap(cls):
        names = tuple(cls.__dict__.get("__annotations__", {}))
        defaults = {n: cls.__dict__[n] for n in names if n in cls.__dict__}
        for n, d in defaults.items():
            if isinstance(d, Factory):
                delattr(cls, n)
        cls.__record_fields__ = names
        cls.__init__ = _make_init(cls.__name__, names, defaults, frozen)
        cls.__repr__ = _repr
        if eq:
            cls.__eq__ = _eq
            cls.__hash__ = _hash if frozen else None
        if frozen:
            cls.__setattr__ = _refuse
            cls.__delattr__ = _refuse
        return cls
    return wrap if cls is None else wrap(cls)


def _make_init(name: str, names: tuple, defaults: dict, frozen: bool):
    setter = object.__setattr__

    def __init__(self, *args, **kwargs) -> None:
        if len(args) > len(names):
            raise TypeError(f"{name}() takes {len(names)} arguments, {len(args)} given")
        for n, v in zip(names, args):
            setter(self, n, v)
        for n in names[len(args):]:
            v = kwargs.pop(n, _MISSING)
            if v is _MISSING:
                d = defaults.get(n, _MISSING)
                if d is _MISSING:
                    raise TypeError(f"{name}() missing argument {n!r}")
                v = d.make() if isinstance(d, Factory) else d
            setter(self, n, v)
        if kwargs:
            raise TypeError(f"{name}() got unexpected arguments {sorted(kwargs)}")
        post = getattr(self, "__post_init__", None)
        if post is not None:
            post()
    return __init__


def _values(self) -> tuple:
    return tuple(getattr(self, n) for n in self.__record_fields__)


def _repr(self) -> str:
    inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__record_fields__)
    return f"{type(self).__name__}({inner})"


def _eq(self, other) -> bool:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self) -> int:
    return hash(_values(self))


def _refuse(self, name, value=None) -> None:
    raise AttributeError(f"cannot assign to field {name!r} of a frozen {type(self).__name__}")
