"""NODESPEC: every grammar form, bad specs, and the compaction round trip."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from bpfs import nodeset
from bpfs.nodeset import MASTER, compact, expand, parse, resolve, runs

# nodes 0..9 (no node 5: numbering may have holes); 2 and 7 down, 8 in error
ROWS = [(n, {2: "down", 7: "down", 8: "error"}.get(n, "up")) for n in range(10) if n != 5]
UP = [0, 1, 3, 4, 6, 9]


@pytest.mark.parametrize("spec, nodes", [
    ("3", [3]),
    ("n3", [3]),
    (".3", [3]),
    ("0-3", [0, 1, 2, 3]),
    ("n0-n3", [0, 1, 2, 3]),
    ("07", [7]),                          # decimal (bproc's strtol read octal)
    (".1-.2", [1, 2]),
    ("4-6", [4, 6]),                      # 5 is not configured
    ("7-", [7, 8, 9]),
    ("3-3", [3]),
    ("0-1000000000", [0, 1, 2, 3, 4, 6, 7, 8, 9]),
    ("3,1,3", [3, 1, 3]),                 # order and duplicates kept
    ("9,0-1", [9, 0, 1]),
    ("1,,2,", [1, 2]),                    # empty chunks skipped, as bproc does
    ("all", [0, 1, 2, 3, 4, 6, 7, 8, 9]),
    ("master", [MASTER]),
    ("master,0", [MASTER, 0]),
    ("up", UP),
    ("allup", UP),
    ("down", [2, 7]),
    ("alldown", [2, 7]),
    ("!down", [0, 1, 3, 4, 6, 8, 9]),
    ("notdown", [0, 1, 3, 4, 6, 8, 9]),
    ("allnotdown", [0, 1, 3, 4, 6, 8, 9]),
    ("all!down", [0, 1, 3, 4, 6, 8, 9]),
    ("error", [8]),
    ("allnotup", [2, 7, 8]),
    ("boot", []),
    ("down,0", [2, 7, 0]),
    ("99", []),                           # not configured: dropped, like bproc
    ("5", []),
])
def test_each_form_selects_the_nodes_bproc_would(spec: str, nodes: list[int]) -> None:
    assert resolve(spec, ROWS) == nodes


def test_unknown_single_numbers_are_kept_on_request() -> None:
    assert resolve("5,1,99", ROWS, keep_unknown=True) == [5, 1, 99]
    assert resolve("4-6", ROWS, keep_unknown=True) == [4, 6]     # ranges stay clipped


def test_resolving_against_rows_in_any_order_gives_ascending_all() -> None:
    assert resolve("all", list(reversed(ROWS))) == [n for n, _ in ROWS]
    assert resolve("7-", list(reversed(ROWS))) == [7, 8, 9]


def test_no_configured_nodes() -> None:
    assert resolve("all", []) == []
    assert resolve("0-", []) == []
    assert resolve("master", []) == [MASTER]


@pytest.mark.parametrize("spec, words", [
    ("", ["empty"]),
    (",", ["empty"]),
    ("foo", ["'foo'"]),
    ("1,foo,2", ["'foo'"]),
    ("allfoo", ["'allfoo'", "unknown node state 'foo'"]),
    ("!upp", ["'!upp'", "unknown node state 'upp'"]),
    ("notx", ["unknown node state 'x'"]),
    ("5-3", ["'5-3'", "backwards"]),
    ("1-x", ["'1-x'"]),
    ("-3", ["'-3'"]),
    ("n", ["'n'"]),
    ("3x", ["'3x'"]),
    ("1-2-3", ["'1-2-3'"]),
    (" 1", ["' 1'"]),
    ("UP", ["'UP'"]),                     # case matters, as in bproc
    ("allnot", ["'allnot'"]),
    ("١", ["'١'"]),                        # non-ASCII digits are not numbers
])
def test_bad_specs_raise_a_value_error_naming_the_chunk(spec: str, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        parse(spec)
    for word in words:
        assert word in str(info.value)


def test_states_are_configurable() -> None:
    assert parse("allodd", states=("odd", "even")).resolve([(1, "odd"), (2, "even")]) == [1]
    with pytest.raises(ValueError):
        parse("up", states=("odd",))


def test_only_numbers_tells_when_no_node_list_is_needed() -> None:
    assert parse("1,3,master").only_numbers
    for spec in ("1-3", "all", "up", "4-"):
        assert not parse(spec).only_numbers


# ---- compaction ----------------------------------------------------------------------

@pytest.mark.parametrize("numbers, text", [
    ([], ""),
    ([5], "5"),
    ([0, 1], "0-1"),                       # runs of two get a dash, as in bpstat
    ([0, 1, 2, 3, 5], "0-3,5"),
    ([3, 2, 1], "3,2,1"),                  # descending: no runs
    ([1, 1, 2], "1,1-2"),
    ([MASTER, 0, 1], "master,0-1"),        # the master never joins a run
    ([7, 8, 0, 1, 9], "7-8,0-1,9"),
])
def test_compact(numbers: list[int], text: str) -> None:
    assert compact(numbers) == text
    assert expand(text) == numbers


def test_runs() -> None:
    assert runs([0, 1, 2, 5, 4]) == [(0, 2), (5, 5), (4, 4)]
    assert nodeset.run_text((2, 9)) == "2-9"


def test_expand_refuses_what_needs_the_node_list() -> None:
    for text in ("all", "up", "3-"):
        with pytest.raises(ValueError):
            expand(text)


numbers = st.lists(st.one_of(st.integers(0, 70), st.just(MASTER)), max_size=60)


@given(numbers)
def test_compact_round_trips(ns: list[int]) -> None:
    text = compact(ns)
    assert expand(text) == ns
    if ns:
        assert resolve(text, [(n, "up") for n in range(71)]) == ns


@given(st.lists(st.integers(0, 500), unique=True).map(sorted))
def test_compaction_of_sorted_numbers_is_minimal(ns: list[int]) -> None:
    text = compact(ns)
    pieces = text.split(",") if text else []
    gaps = sum(1 for a, b in zip(ns, ns[1:]) if b != a + 1)
    assert len(pieces) == (gaps + 1 if ns else 0)


@given(st.text(alphabet="0123456789n.-,!alupdowntsr", max_size=12))
def test_any_text_parses_or_raises_value_error(text: str) -> None:
    try:
        nodes = resolve(text, ROWS)
    except ValueError:
        return
    assert all(n == MASTER or n in dict(ROWS) for n in nodes)
