"""Node sets: bproc's NODESPEC grammar, and its inverse for compact listings.

Pure: a spec is parsed once (`parse`) and resolved against the cluster's nodes
as `(number, state)` pairs (`NodeSpec.resolve`), so the CLIs can read
/bproc/status however they like and this module is tested without one.

    nodespec := chunk ("," chunk)*           empty chunks are skipped: "1,,2"
    chunk    := number                       one node: 5, n5, .5
              | number "-" number?           a range, both ends included; "4-" runs
                                             to the highest configured node
              | "all"                        every configured node
              | "master"                     the master, node -1
              | "all"? ("!" | "not")? STATE  nodes in (or, negated, not in) STATE:
                                             up, allup, !down, notdown, allnotdown
    number   := ("n" | ".")? DIGITS

Behaviour follows bproc 4.0's `bproc_nodefilter` (clients/bproc.c): chunks add
nodes in the order written and keep duplicates ("3,1,3" is 3, 1, 3); `all` and
state chunks add nodes in ascending order; ranges keep only configured nodes; a
single number that is not configured is dropped, unless the caller asks
`keep_unknown=True` (bpctl does, to report "N: <strerror>" for it).

Where bproc was lax we are strict, with a ValueError naming the chunk: a word
that is not a state ("al", "upp") selected nothing in bproc and is an error
here, as are a reversed range ("5-3") and the empty spec. Numbers are decimal
("010" is 10; bproc's strtol read it as octal). `states` defaults to
formats.NODE_STATES.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not at start-up (bench/results-startup.md); annotations only
if TYPE_CHECKING:
    from typing import Iterable, Sequence

MASTER = -1
Row = tuple[int, str]          # (node number, state) as in /bproc/status


class _Chunk:
    """One comma-separated piece of a spec; `select` yields its node numbers."""

    def select(self, rows: Sequence[Row], keep_unknown: bool) -> list[int]:
        raise NotImplementedError


class _Range(_Chunk):
    def __init__(self, lo: int, hi: int | None, single: bool) -> None:
        self.lo, self.hi, self.single = lo, hi, single

    def select(self, rows: Sequence[Row], keep_unknown: bool) -> list[int]:
        known = {n for n, _ in rows}
        if self.single:
            return [self.lo] if keep_unknown or self.lo in known else []
        hi = max(known, default=-1) if self.hi is None else self.hi
        return sorted(n for n in known if self.lo <= n <= hi)

    def numbers(self) -> list[int]:
        if self.hi is None:
            raise ValueError(f"open range '{self.lo}-' needs the node list")
        return list(range(self.lo, self.hi + 1))


class _Master(_Chunk):
    def select(self, rows: Sequence[Row], keep_unknown: bool) -> list[int]:
        return [MASTER]

    def numbers(self) -> list[int]:
        return [MASTER]


class _State(_Chunk):
    """`all`, or nodes whose state is (or with `invert`, is not) `state`."""

    def __init__(self, state: str | None, invert: bool) -> None:
        self.state, self.invert = state, invert

    def select(self, rows: Sequence[Row], keep_unknown: bool) -> list[int]:
        return sorted(n for n, s in rows
                      if self.state is None or (s == self.state) != self.invert)


class NodeSpec:
    """A parsed NODESPEC; `text` is what the user wrote."""

    def __init__(self, text: str, chunks: Sequence[_Chunk]) -> None:
        self.text = text
        self._chunks = tuple(chunks)

    def resolve(self, rows: Iterable[Row], keep_unknown: bool = False) -> list[int]:
        """Node numbers in spec order, duplicates kept. `rows` are the configured nodes."""
        rows = list(rows)
        out: list[int] = []
        for chunk in self._chunks:
            out.extend(chunk.select(rows, keep_unknown))
        return out

    @property
    def only_numbers(self) -> bool:
        """True if the spec is single numbers and `master` only, so that
        `resolve(rows, keep_unknown=True)` needs no node list (bpctl skips reading it)."""
        return all(isinstance(c, _Master) or (isinstance(c, _Range) and c.single)
                   for c in self._chunks)

    def __repr__(self) -> str:
        return f"NodeSpec({self.text!r})"


def parse(text: str, states: Sequence[str] | None = None) -> NodeSpec:
    """Parse a NODESPEC; ValueError names the chunk that breaks the grammar."""
    if states is None:
        from bpfs.formats import NODE_STATES    # not at import: bpsh renders a node
        states = NODE_STATES                    # list with `compact` alone
    pieces = [p for p in text.split(",") if p]
    if not pieces:
        raise ValueError("empty node specification")
    return NodeSpec(text, [_parse_chunk(p, states) for p in pieces])


def resolve(text: str, rows: Iterable[Row], keep_unknown: bool = False) -> list[int]:
    """`parse(text).resolve(rows)` in one call."""
    return parse(text).resolve(rows, keep_unknown)


def _parse_chunk(chunk: str, states: Sequence[str]) -> _Chunk:
    if chunk == "master":
        return _Master()
    if chunk == "all":
        return _State(None, False)
    if chunk[0] in "n." or chunk[0].isdigit():
        lo, dash, hi = chunk.partition("-")
        if _number(lo) is not None and (not dash or not hi or _number(hi) is not None):
            return _range(chunk, lo, dash, hi)
    return _state_chunk(chunk, states)


def _number(text: str) -> int | None:
    """`5`, `n5` or `.5` -> 5; anything else -> None (ASCII digits only)."""
    digits = text[1:] if text[:1] in ("n", ".") else text
    if digits.isascii() and digits.isdigit():
        return int(digits)
    return None


def _range(chunk: str, lo: str, dash: str, hi: str) -> _Range:
    first = _number(lo)
    assert first is not None
    if not dash:
        return _Range(first, first, single=True)
    last = _number(hi) if hi else None
    if last is not None and last < first:
        raise ValueError(f"bad node specification '{chunk}': the range runs backwards")
    return _Range(first, last, single=False)


def _state_chunk(chunk: str, states: Sequence[str]) -> _State:
    word = chunk[3:] if chunk.startswith("all") else chunk
    prefixed = word != chunk
    for neg in ("!", "not"):
        if word.startswith(neg):
            word, prefixed, invert = word[len(neg):], True, True
            break
    else:
        invert = False
    if word in states:
        return _State(word, invert)
    if prefixed and word.isidentifier():
        raise ValueError(f"bad node specification '{chunk}': unknown node state '{word}' "
                         f"(states: {', '.join(states)})")
    raise ValueError(f"bad node specification '{chunk}': not a node number, range, "
                     f"'all', 'master' or [all][!|not]STATE ({', '.join(states)})")


# ---- compaction: numbers -> "0-3,5" ------------------------------------------------

def runs(numbers: Iterable[int]) -> list[tuple[int, int]]:
    """Order-keeping runs of consecutive ascending numbers: [0,1,2,5,4] -> (0,2),(5,5),(4,4).

    This is bproc bpstat's grouping: a run grows while the next number is the
    last plus one, so duplicates and descending numbers start new runs. The
    master (-1) is never part of a run.
    """
    out: list[tuple[int, int]] = []
    for n in numbers:
        if out and n == out[-1][1] + 1 and out[-1][1] != MASTER:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return out


def run_text(run: tuple[int, int]) -> str:
    """(0, 3) -> "0-3", (5, 5) -> "5", (-1, -1) -> "master"."""
    first, last = run
    if first == MASTER:
        return "master"
    return str(first) if first == last else f"{first}-{last}"


def compact(numbers: Iterable[int]) -> str:
    """[0, 1, 2, 3, 5] -> "0-3,5"; a valid NODESPEC that `expand` turns back into `numbers`."""
    return ",".join(run_text(r) for r in runs(numbers))


def expand(text: str, limit: int | None = None) -> list[int]:
    """The numbers of a spec made only of numbers, closed ranges and `master` (no node list).

    With `limit`, a spec of more numbers is a ValueError before any is listed, so a
    short text ("0-999999999") cannot make a long list.
    """
    if not text:
        return []
    chunks = parse(text)._chunks
    for chunk in chunks:
        if not isinstance(chunk, (_Range, _Master)):
            raise ValueError(f"'{text}' needs the node list to expand")
        if isinstance(chunk, _Range) and chunk.hi is None:
            raise ValueError(f"open range '{chunk.lo}-' needs the node list")
    if limit is not None:
        count = sum(c.hi - c.lo + 1 if isinstance(c, _Range) and c.hi is not None else 1
                    for c in chunks)
        if count > limit:
            raise ValueError(f"{count} nodes, more than {limit}")
    out: list[int] = []
    for chunk in chunks:
        out.extend(chunk.numbers())     # type: ignore[attr-defined]
    return out
