"""The text formats of the /bproc files: rendered by the master, parsed by the CLIs.

One module owns them so the filesystem and the commands cannot drift apart; the
contract test walks a live tree and parses every file with these functions.
Every file is UTF-8 text ending in a newline.

    /bproc/status           status_line*            one per configured node
    status_line   := NUM SP STATE SP MODE SP USER SP GROUP SP ADDRESS NL
    MODE          := 10 chars, like ls and bproc's bpstat: "---x--x--x"
    USER, GROUP   := a name, or "#" uid/gid when the id has no name
    ADDRESS       := the node's address, "-" while unknown

    /bproc/nodes/N/status   STATE NL
    /bproc/nodes/N/info     kv_line*   keys: INFO_KEYS
    /bproc/nodes/N/procs    (PID NL)*
    /bproc/procs/P/status   kv_line*   keys: PROC_KEYS, then bpfs.usage.USAGE_KEYS
    /bproc/procs/P/stat     proc(5)'s stat line (bpfs/usage.py)
    /bproc/procs/P/node     NUM NL
    kv_line       := KEY ":" SP VALUE NL

    /bproc/events           event_line*
    event_line    := TIME SP KIND SP ID SP WHAT (SP DETAIL)? NL
    TIME          := seconds since the epoch, 3 decimals
    KIND          := "node" | "proc"
    node WHAT DETAIL := "state" SP STATE            every change of the node's state
                      | "mode" SP OCTAL             chmod, 4 octal digits: "0110"
                      | "owner" SP UID SP GID       chown/chgrp, numeric ids
    proc WHAT DETAIL := "start" SP NODE             procs/PID appears (state starting)
                      | "signal" SP SIG             a signal went to the real process
                      | "exit" SP (CODE | "signal" SP SIG | "failed" SP ENAME)
                                                    ENAME: errno name of a failed start
    e.g.  "1732170000.123 node 3 state down", "1732170000.200 proc 4242 exit 0"

Parsers raise ValueError on text that breaks the grammar: a CLI that meets one
has found a bug in the master, not a user error.
"""

from __future__ import annotations

import grp
import pwd
import stat
from bpfs.record import record
from bpfs.usage import Usage, from_status, status_pairs
TYPE_CHECKING = False  # not at start-up (bench/results-startup.md); annotations only
if TYPE_CHECKING:
    from typing import Iterable, Mapping

NODE_STATES = ("up", "down", "boot", "error", "unavailable", "reboot", "halt", "pwroff")
INFO_KEYS = ("address", "hostname", "cpus", "arch", "kernel", "load", "mem", "uptime", "procs")
PROC_KEYS = ("pid", "node", "state", "uid", "gid", "cmd", "started", "exit")


# ---- modes and ids ---------------------------------------------------------

def mode_string(mode: int) -> str:
    """`0o111` -> `---x--x--x`, the form bproc's bpstat and `ls -l` print."""
    s = stat.filemode(stat.S_IFREG | (mode & 0o7777))
    return "-" + s[1:]


def parse_mode_string(text: str) -> int:
    if len(text) != 10:
        raise ValueError(f"bad mode string {text!r}")
    mode = 0
    for i, (ch, bit) in enumerate(zip(text[1:], "rwxrwxrwx")):
        if ch == bit:
            mode |= 1 << (8 - i)
        elif ch in "sStT":
            if ch in "st":
                mode |= 1 << (8 - i)
            mode |= (0o4000, 0o2000, 0o1000)[i // 3] if i % 3 == 2 else 0
        elif ch != "-":
            raise ValueError(f"bad mode string {text!r}")
    return mode


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"#{uid}"


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"#{gid}"


# ---- /bproc/status ---------------------------------------------------------

@record(frozen=True)
class NodeRow:
    number: int
    state: str
    mode: int
    user: str
    group: str
    address: str


def render_status_line(row: NodeRow) -> str:
    return (f"{row.number} {row.state} {mode_string(row.mode)} "
            f"{row.user} {row.group} {row.address or '-'}\n")


def render_status(rows: Iterable[NodeRow]) -> str:
    return "".join(render_status_line(r) for r in rows)


def parse_status(text: str) -> list[NodeRow]:
    rows = []
    for line in text.splitlines():
        f = line.split()
        if len(f) != 6 or f[1] not in NODE_STATES:
            raise ValueError(f"bad status line {line!r}")
        rows.append(NodeRow(int(f[0]), f[1], parse_mode_string(f[2]), f[3], f[4],
                            "" if f[5] == "-" else f[5]))
    return rows


# ---- single words and key: value files ----------------------------------------

def render_word(word: object) -> str:
    return f"{word}\n"


def parse_word(text: str) -> str:
    word = text.strip()
    if not word or len(text.splitlines()) != 1:
        raise ValueError(f"expected one word, got {text!r}")
    return word


def parse_node_state(text: str) -> str:
    state = parse_word(text)
    if state not in NODE_STATES:
        raise ValueError(f"unknown node state {state!r}")
    return state


def render_kv(pairs: Mapping[str, object]) -> str:
    return "".join(f"{k}: {v}\n" for k, v in pairs.items())


def parse_kv(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if not sep and line.endswith(":"):
            key, sep, value = line[:-1], ":", ""
        if not sep or not key or " " in key:
            raise ValueError(f"bad key: value line {line!r}")
        out[key] = value
    return out


def render_pids(pids: Iterable[int]) -> str:
    return "".join(f"{p}\n" for p in pids)


def parse_pids(text: str) -> list[int]:
    return [int(x) for x in text.split()]


@record(frozen=True)
class Facts:
    """What a node daemon reports about itself: THE facts schema. The node sends them with
    `register` and every heartbeat (bpfs/wire/messages.py bounds each field), the master
    keeps them per node (model.Node) and renders them in nodes/N/info (NodeInfo)."""
    hostname: str = ""
    cpus: int = 0
    arch: str = ""
    kernel: str = ""
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)     # the 1/5/15 minute averages
    mem_total: int = 0                                      # bytes
    mem_available: int = 0
    uptime: float = 0.0                                     # seconds since boot


@record(frozen=True)
class NodeInfo:
    """nodes/N/info, typed: the node's address, its facts, how many processes it runs.
    (In the text, `mem` is total and available bytes; `load` the 1/5/15 averages.)"""
    address: str = ""
    facts: Facts = Facts()
    procs: int = 0


def render_info(info: NodeInfo) -> str:
    f = info.facts
    return render_kv({
        "address": info.address or "-",
        "hostname": f.hostname or "-",
        "cpus": f.cpus,
        "arch": f.arch or "-",
        "kernel": f.kernel or "-",
        "load": " ".join(f"{x:.2f}" for x in f.load),
        "mem": f"{f.mem_total} {f.mem_available}",
        "uptime": f"{f.uptime:.0f}",
        "procs": info.procs,
    })


def parse_info(text: str) -> NodeInfo:
    kv = parse_kv(text)
    missing = [k for k in INFO_KEYS if k not in kv]
    if missing:
        raise ValueError(f"info lacks {', '.join(missing)}")
    load = tuple(float(x) for x in kv["load"].split())
    mem = [int(x) for x in kv["mem"].split()]
    if len(load) != 3 or len(mem) != 2:
        raise ValueError("bad load or mem in info")
    undash = lambda v: "" if v == "-" else v  # noqa: E731
    facts = Facts(undash(kv["hostname"]), int(kv["cpus"]), undash(kv["arch"]),
                  undash(kv["kernel"]), load, mem[0], mem[1],  # type: ignore[arg-type]
                  float(kv["uptime"]))
    return NodeInfo(undash(kv["address"]), facts, int(kv["procs"]))


# ---- /bproc/procs/P/status -------------------------------------------------

@record(frozen=True)
class ProcStatus:
    pid: int
    node: int
    # "starting": the master holds the ghost and the node is restoring it (procs/PID
    # appears then, before the program can print anything); then "running", "stopped",
    # "exited". A start that fails removes procs/PID (event `exit failed ENAME`).
    state: str
    uid: int
    gid: int
    cmd: str
    started: float      # epoch seconds
    exit: str = "-"     # "-" while running, "0".."255", "signal N" (or "failed ENAME")
    usage: Usage | None = None      # the node's last report; None before the first


def render_proc_status(p: ProcStatus) -> str:
    return render_kv({"pid": p.pid, "node": p.node, "state": p.state, "uid": p.uid,
                      "gid": p.gid, "cmd": p.cmd, "started": f"{p.started:.3f}",
                      "exit": p.exit, **status_pairs(p.usage)})


def parse_proc_status(text: str) -> ProcStatus:
    kv = parse_kv(text)
    missing = [k for k in PROC_KEYS if k not in kv]
    if missing:
        raise ValueError(f"proc status lacks {', '.join(missing)}")
    return ProcStatus(int(kv["pid"]), int(kv["node"]), kv["state"], int(kv["uid"]),
                      int(kv["gid"]), kv["cmd"], float(kv["started"]), kv["exit"],
                      from_status(kv))


# ---- /bproc/events -------------------------------------------------------------

@record(frozen=True)
class Event:
    time: float
    kind: str           # "node" or "proc"
    id: int
    what: str           # "state", "mode", "owner", "start", "exit", "signal", ...
    detail: str = ""


def render_event(e: Event) -> str:
    tail = f" {e.detail}" if e.detail else ""
    return f"{e.time:.3f} {e.kind} {e.id} {e.what}{tail}\n"


def parse_event(line: str) -> Event:
    f = line.rstrip("\n").split(" ", 4)
    if len(f) < 4 or f[1] not in ("node", "proc"):
        raise ValueError(f"bad event line {line!r}")
    return Event(float(f[0]), f[1], int(f[2]), f[3], f[4] if len(f) == 5 else "")


def parse_events(text: str) -> list[Event]:
    return [parse_event(line) for line in text.splitlines() if line]
