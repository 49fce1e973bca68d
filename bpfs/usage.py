"""A process's usage (CPU times, memory, faults, state, nice) and proc(5)'s stat line.

Pure and light (no I/O; bpfs.formats imports it, and so may a CLI at start-up). One
parser, `parse_stat`, reads a stat line wherever it comes from: a node's /proc/P/stat
(bpfs/node/usage.py), the ghost's on the master, /bproc/procs/P/stat in tests and tools.

`Usage` is what the master keeps of a process (model.Proc.usage), in the master's units:
seconds of CPU, bytes, counts, and `started` in epoch seconds of the master's clock. A
node reports ticks of its own clock (its `hz`) and each process's age; the master turns
them into a Usage (`from_sample`), so nothing depends on the nodes' clocks agreeing with
the master's: `started` is the master's time at the first report less the age then, and
kept from then on. `cpu_percent` is the CPU used between the last two reports over the
node's own time between them (top's figure); at the first report, over the process's
life (ps's figure).

/bproc/procs/P/stat (`render_stat`) is proc(5)'s layout, all 52 fields, so a reader of
/proc/P/stat (ps, psutil, top's code) reads it unchanged:

    pid (comm) state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt
    utime stime cutime cstime priority nice num_threads itrealvalue starttime vsize rss
    rsslim ... (0 for what the master cannot know) ... exit_code

From the node: comm, state, faults, times, nice, threads, vsize, rss. From the ghost on
the master (the same PID): ppid, pgrp, session, tty_nr and tpgid, so a job's process shows
in the master's terminal and process tree where its ghost is. Times are in the master's
clock ticks (SC_CLK_TCK); `starttime` is in ticks since the master's boot (btime of the
master's /proc/stat), as for a local process; rss is in pages; priority is 20 + nice.
"""

from __future__ import annotations

from bpfs.record import record

STAT_FIELDS = 52
UNSET = "-"                     # a usage key before the node's first report


@record(frozen=True)
class Usage:
    state: str = "R"            # proc(5)'s letter: R S D T t Z X I ...
    comm: str = ""
    utime: float = 0.0          # seconds
    stime: float = 0.0
    cutime: float = 0.0         # waited-for children's
    cstime: float = 0.0
    minflt: int = 0
    majflt: int = 0
    cminflt: int = 0
    cmajflt: int = 0
    nice: int = 0
    threads: int = 1
    vsize: int = 0              # bytes
    rss: int = 0                # bytes
    started: float = 0.0        # epoch seconds, the master's clock
    cpu_percent: float = 0.0
    at: float = 0.0             # the node's clock (its uptime) at the sample, seconds
    sampled: float = 0.0        # epoch seconds (master) when the master received it

    @property
    def cpu(self) -> float:
        return self.utime + self.stime


# ---- proc(5)'s stat line ----------------------------------------------------------

def parse_stat(text: str) -> tuple[str, list[str]]:
    """(comm, [field 3 (state), field 4, ...]) of a stat line; ValueError if it is not one.
    comm may hold spaces and parentheses: it ends at the *last* ')'."""
    head, sep, tail = text.rpartition(")")
    pid, open_, comm = head.partition(" (")
    if not sep or not open_ or not pid.strip().isdigit():
        raise ValueError(f"not a stat line: {text[:60]!r}")
    rest = tail.split()
    if len(rest) < 22:
        raise ValueError(f"stat line with {len(rest) + 2} fields")
    return comm, rest


def stat_int(rest: list[str], field: int) -> int:
    """Field number `field` (proc(5)'s numbering, from 1) of parse_stat's `rest`."""
    return int(rest[field - 3])


def render_stat(pid: int, u: Usage, ids: tuple[int, int, int, int, int], hz: int,
                boot: float, page: int = 4096) -> str:
    """The stat line of `pid` (see the module doc). `ids`: ppid, pgrp, session, tty_nr,
    tpgid; `hz`: ticks a second; `boot`: the master's boot time (epoch)."""
    def ticks(seconds: float) -> int:
        return max(0, round(seconds * hz))
    comm = u.comm.replace("\n", "?")[:15] or "?"
    fields = [pid, f"({comm})", u.state or "R", *ids, 0, u.minflt, u.cminflt, u.majflt,
              u.cmajflt, ticks(u.utime), ticks(u.stime), ticks(u.cutime), ticks(u.cstime),
              20 + u.nice, u.nice, u.threads, 0, ticks(u.started - boot), u.vsize,
              u.rss // page, 2**64 - 1]
    fields += [0] * (STAT_FIELDS - len(fields))
    fields[37] = 17             # exit_signal: SIGCHLD, a process's usual
    return " ".join(map(str, fields)) + "\n"


# ---- status keys -------------------------------------------------------------------

USAGE_KEYS = ("stat_state", "utime", "stime", "cutime", "cstime", "cpu_percent", "rss_kb",
              "vsz_kb", "minflt", "majflt", "nice", "threads", "sampled")


def status_pairs(u: Usage | None) -> dict[str, object]:
    """The usage keys of procs/P/status (all "-" before the node's first report)."""
    if u is None:
        return {k: UNSET for k in USAGE_KEYS}
    return {"stat_state": u.state, "utime": f"{u.utime:.2f}", "stime": f"{u.stime:.2f}",
            "cutime": f"{u.cutime:.2f}", "cstime": f"{u.cstime:.2f}",
            "cpu_percent": f"{u.cpu_percent:.1f}", "rss_kb": u.rss // 1024,
            "vsz_kb": u.vsize // 1024, "minflt": u.minflt, "majflt": u.majflt,
            "nice": u.nice, "threads": u.threads, "sampled": f"{u.sampled:.3f}"}


def from_status(kv: dict[str, str], comm: str = "") -> Usage | None:
    """The Usage in status keys (parse_kv's dict); None when absent or not reported yet.
    ValueError if they are there but garbled."""
    if kv.get("utime", UNSET) == UNSET:
        return None
    return Usage(kv["stat_state"], comm, float(kv["utime"]), float(kv["stime"]),
                 float(kv["cutime"]), float(kv["cstime"]), int(kv["minflt"]),
                 int(kv["majflt"]), 0, 0, int(kv["nice"]), int(kv["threads"]),
                 int(kv["vsz_kb"]) * 1024, int(kv["rss_kb"]) * 1024, 0.0,
                 float(kv["cpu_percent"]), 0.0, float(kv["sampled"]))


# ---- from a node's report ------------------------------------------------------------

def from_sample(s: "Sample", hz: int, at: float, now: float, before: Usage | None) -> Usage:
    """A node's figures for one process (`s`: ticks of the node's `hz`, its `at` the node's
    clock at the sample) as the master keeps them; `before` is the last Usage kept."""
    sec = 1.0 / hz
    cpu = (s.utime + s.stime) * sec
    if before is not None:
        started = before.started
        percent = before.cpu_percent if at <= before.at else \
            max(0.0, cpu - before.cpu) / (at - before.at) * 100
    else:
        age = s.age * sec
        percent = cpu / age * 100 if age > 0 else 0.0
        started = now - age
    return _usage((s.state, s.comm, s.utime * sec, s.stime * sec, s.cutime * sec,
                   s.cstime * sec, s.minflt, s.majflt, s.cminflt, s.cmajflt, s.nice,
                   s.threads, s.vsize, s.rss, started, round(percent, 1), at, now))


def _usage(values: tuple) -> Usage:
    """Usage(*values), all fields given, without the record's generic __init__ (a master
    makes one per process per report: a report of 1,000 took 4.7 ms, now 2.6 here)."""
    u = object.__new__(Usage)
    u.__dict__.update(zip(_USAGE_FIELDS, values))
    return u


_USAGE_FIELDS: tuple = Usage.__record_fields__


@record(frozen=True)
class Sample:
    """One process's figures as a node reads them (bpfs/wire/messages.py's ProcUsage has
    these fields, bounded): ticks of the node's clock, bytes, counts."""
    pid: int
    id: int                     # the restore that made it (0: not a restore's)
    state: str
    comm: str
    utime: int
    stime: int
    cutime: int
    cstime: int
    minflt: int
    majflt: int
    cminflt: int
    cmajflt: int
    nice: int
    threads: int
    age: int                    # ticks since it started, at the sample
    vsize: int
    rss: int                    # bytes


def sample_of(pid: int, mid: int, text: str, uptime: float, hz: int, page: int) -> tuple:
    """A node's sample of `pid` from its /proc/PID/stat `text`: a tuple of Sample's fields
    in their order (bpfs/wire/messages.py's ProcUsage takes it as is: a node reads a
    thousand of these every report), each within the message's bounds. ValueError if
    garbled."""
    head, sep, tail = text.rpartition(")")
    comm = head.partition(" (")[2]
    r = tail.split()
    if not sep or len(r) < 22:
        raise ValueError(f"not a stat line: {text[:60]!r}")
    nice, threads = int(r[16]), int(r[17])
    return (pid, mid, r[0][:1] or "?", comm[:64], int(r[11]), int(r[12]),
            max(int(r[13]), 0), max(int(r[14]), 0), int(r[7]), int(r[9]), int(r[8]),
            int(r[10]), min(max(nice, -20), 19), min(max(threads, 0), 1 << 22),
            max(0, round(uptime * hz) - int(r[19])), int(r[20]), int(r[21]) * page)


# ---- what users read -----------------------------------------------------------------

def cpu_time(seconds: float) -> str:
    """CPU time as ps's TIME column writes it: [DD-]HH:MM:SS."""
    s = int(seconds)
    days, s = divmod(s, 86400)
    text = f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{days}-{text}" if days else text
