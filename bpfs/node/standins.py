"""Stand-ins: a process forked on this node that moved away stays here as its own ghost.

A process forked on a node (Q, a child of R here, a cluster PID with a ghost under R's
ghost on the master) can move like any other (bpfs/node/mover.py). But R must still be
able to wait for Q and get its real exit status, to signal Q by its PID, and Q's PID must
stay taken here. So when Q moves away, this node keeps the stopped Q as a **stand-in**,
the way the master keeps a ghost (docs/ghosts.md), with the same machinery: a tracer
thread of the node's own (bpfs.migrate.tracer.Tracer, started at the first such move)
seizes Q, dumps it where it stands (`dump_moving`) and, once Q runs elsewhere, parks it
(`park_moved`: its memory unmapped, asleep in pause(), its fds 0-2 closed). Then:

- a signal sent to the stand-in (by R, or anyone here the kernel let signal it) is
  suppressed and passed to the master as a `kill` of Q by root (the kernel has made the
  sender's checks here): it reaches Q's ghost there, which passes it on to the real Q;
- a SIGKILL kills the stand-in at once: the master is told to kill Q (`kill` SIGKILL),
  which must not outlive what its parent saw;
- when Q stops or goes on (job control) where it runs, the master says so (`signal`
  SIGSTOP/SIGTSTP.../SIGCONT for the stand-in) and the stand-in enters a group-stop or
  leaves it (`set_stopped`, as a ghost does), so R's waitpid(WUNTRACED) sees it;
- when Q ends wherever it is, the master says so (`ended`, its wait status) and the
  stand-in ends the same way (`finish`: the exit code, or death by the same signal); R
  reaps it, and the supervisor reports `exited` as for any child forked here.

Q's stdio (what it inherited from R: the job's links to bpsh, a file, /dev/null) stays
here too: before the stand-in closes its fds 0-2, a **relay** (bpfs.cli.bpsh.relay, as
Q's user, holding copies of Q's fds 0-2) is started, and Q's links wherever it runs go
to that relay (`relayed` tells the master its port and token), which writes into the
same files and sockets Q had, and feeds it what they give. The relay ends after the
stand-in (it holds a pidfd of it).

If the move fails, Q goes on here exactly as it was (`release_moving`) and the relay is
killed. When Q moves back to this node, the `restore` goes into its stand-in
(`restore_in`: the tracer's, as the master restores a process into its ghost): Q runs
here again as R's child, its links made again to the relay, reported as the restore's
process (its `exited`, the supervisor's, carries the restore's id). When the master's
connection goes, every stand-in dies with the tracer (`session_over`), as everything the
node held dies.

Errors: the ptrace steps' MigrateError (EBUSY, ESRCH...) fail the move as they do for a
restored process; a relay that cannot start fails it with EIO.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import subprocess
import threading
from typing import Any

import trio

from bpfs import procstatus
from bpfs.errors import BpfsError
from bpfs.migrate import ptrace as pt
from bpfs.wire import messages, relaystart

log = logging.getLogger("bpslave")

STEP_TIMEOUT = 120.0            # a step of the node's tracer (a big dump takes a while)
RELAY_TIMEOUT = 10.0            # the relay saying its port
STDIO = (0, 1, 2)


class Standins:
    """The node's stand-ins, by PID, and the tracer thread that holds them."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.tracer: Any = None
        self.held: dict[int, Any] = {}          # pid -> the session it reports to
        self._finishing: set[int] = set()       # ended by the master's word: say nothing
        self.moving: set[int] = set()           # being moved away (StandinOps made)
        self._early: dict[int, int] = {}        # `ended` before its stand-in was parked
        self._token: trio.lowlevel.TrioToken | None = None

    def ops(self, session: Any, mid: int, pid: int) -> "StandinOps":
        """The move steps for `pid`, forked here (trio's thread; starts the tracer)."""
        self._start()
        return StandinOps(self, session, mid, pid, trio.lowlevel.current_trio_token())

    def _start(self) -> None:
        if self.tracer is not None:
            return
        from bpfs.migrate.tracer import Tracer
        self._token = trio.lowlevel.current_trio_token()
        sup = self.node.supervisor
        if sup is not None:
            sup.settle()                # its doorbell takes a PID: not a directed one
        tracer = Tracer(on_signal=self._signalled, on_exit=self._gone)
        try:
            tracer.start()
        except BpfsError as exc:
            raise BpfsError(exc.errno or errno.EIO, f"this node cannot hold a stand-in: "
                            f"{exc.message}") from None
        self.tracer = tracer

    # ---- the master's word -------------------------------------------------------

    def ended(self, pid: int, status: int) -> bool:
        """Q ended elsewhere with wait `status`: its stand-in ends so. False if `pid` is
        no stand-in here."""
        if pid not in self.held and pid in self.moving and len(self._early) < 4096:
            self._early[pid] = status           # its `drop` is being done: at `settled`
            return True
        if pid not in self.held or self.tracer is None:
            return False
        self._finishing.add(pid)
        if os.WIFSIGNALED(status):
            fut = self.tracer.finish(pid, signal=os.WTERMSIG(status))
        else:
            fut = self.tracer.finish(pid, exit_code=os.WEXITSTATUS(status))
        fut.add_done_callback(lambda f: f.cancelled() or f.exception() is None or
                              log.warning("stand-in %d: ending it: %s", pid, f.exception()))
        return True

    def job(self, pid: int, sig: int) -> bool:
        """Q stopped by `sig` (or went on: SIGCONT) where it runs: the stand-in too (a
        group-stop its parent's waitpid(WUNTRACED) sees). False: no stand-in `pid`."""
        if pid not in self.held or self.tracer is None:
            return False
        fut = self.tracer.set_stopped(pid, sig != signal.SIGCONT, sig)
        fut.add_done_callback(lambda f: f.cancelled() or f.exception() is None or
                              log.info("stand-in %d: job state: %s", pid, f.exception()))
        return True

    async def restore_in(self, session: Any, req: messages.Restore) -> None:
        """Q moves back here: its image goes into its stand-in (the tracer's `restore_in`,
        as the master restores a process into its ghost), which then runs as Q again,
        R's child still; its links are made again to where they went (the relay). Then
        `restored`, or `failed` with the step's errno (the stand-in parked as it was, or,
        past the point of no return, dead: its end kills Q through the master)."""
        from bpfs.migrate import loads
        from bpfs.node import stdio
        from bpfs.node.procs import Held
        pid, fds = req.pid, [None, None, None]
        assert pid is not None
        try:
            image = await trio.to_thread.run_sync(loads, req.image)
            links = _links(session, req, pid)
            if not links.ready():
                await links.wait()
            fds = links.fds()
            mine = {n: fd for n, fd in enumerate(fds) if fd is not None}
            fut = self.tracer.restore_in(pid, image, mine, close_others=True)
            await trio.to_thread.run_sync(fut.result, STEP_TIMEOUT)
        except Exception as exc:        # cancelled: the session is over, so is everything
            if not isinstance(exc, (BpfsError, TimeoutError)):
                log.error("restore %d into stand-in %d failed", req.id, pid, exc_info=exc)
            err = getattr(exc, "errno", None) or errno.EIO
            text = getattr(exc, "message", None) or f"node error: {exc}"
            session.report(messages.Failed(id=req.id, errno=err, message=text[:4096]))
            return
        finally:
            stdio.close_all(fds)
        self.held.pop(pid, None)
        sup = self.node.supervisor
        child = sup.children.get(pid) if sup is not None else None
        if child is not None:
            child.id = req.id               # its `exited` is this restore's now
        self.node.procs.hold(pid, Held(session, req.id, image.argv[0] if image.argv
                                       else image.comm))
        session.report(messages.Restored(id=req.id, pid=pid))
        log.debug("restore %d: pid %d back into its stand-in", req.id, pid)

    def session_over(self) -> None:
        """The master is gone: every stand-in dies (the node kills what it held)."""
        tracer, self.tracer = self.tracer, None
        self.held.clear()
        self._finishing.clear()
        self.moving.clear()
        self._early.clear()
        if tracer is not None:
            tracer.stop()

    def settled(self, pid: int) -> None:
        """The move of `pid` is over (trio's thread): parked as a stand-in, or let go."""
        self.moving.discard(pid)
        status = self._early.pop(pid, None)
        if status is not None and not self.ended(pid, status):
            log.info("stand-in %d: it ended elsewhere (%#x) but is not here", pid, status)

    # ---- the tracer's reports (its thread) ------------------------------------------

    def _post(self, fn: Any, *args: Any) -> None:
        if self._token is None:
            return
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass

    def _signalled(self, pid: int, sig: int) -> None:
        self._post(self._pass_on, pid, sig)

    def _gone(self, pid: int, status: int) -> None:
        self._post(self._ended_here, pid, status)

    def _pass_on(self, pid: int, sig: int) -> None:
        """A signal for the stand-in: to Q through the master (its ghost passes it on)."""
        session = self.held.get(pid)
        if session is not None:
            self._kill(session, pid, sig)

    def _ended_here(self, pid: int, status: int) -> None:
        session = self.held.pop(pid, None)
        if pid in self._finishing:
            self._finishing.discard(pid)
            return
        if session is not None:         # killed here (SIGKILL): Q must not live on
            log.info("stand-in %d killed (status %#x): killing its process", pid, status)
            self._kill(session, pid, signal.SIGKILL)

    def _kill(self, session: Any, pid: int, sig: int) -> None:
        sup = self.node.supervisor
        seq = sup.next_seq() if sup is not None else 0
        session.report(messages.Kill(seq=seq, pid=pid, sig=sig, ruid=0, euid=0))


class StandinOps:
    """What the mover's thread does to a process forked here (bpfs/node/mover.py's
    `DirectOps` does the same to a restored one): each step a Future of the node's
    tracer, waited for in the move's thread."""

    def __init__(self, standins: Standins, session: Any, mid: int, pid: int,
                 token: trio.lowlevel.TrioToken) -> None:
        self.standins, self.session, self.mid, self.pid = standins, session, mid, pid
        self.token = token
        self.relay: subprocess.Popen[bytes] | None = None
        self.relayed: messages.Relayed | None = None
        standins.moving.add(pid)

    def _wait(self, fut: Any) -> Any:
        return fut.result(timeout=STEP_TIMEOUT)

    def seize(self) -> None:
        try:
            self._wait(self.standins.tracer.seize_running(self.pid))
        except BaseException:
            self._settle()
            raise

    def _settle(self) -> None:
        try:
            self.token.run_sync_soon(self.standins.settled, self.pid)
        except trio.RunFinishedError:
            pass

    def dump(self, links: Any) -> Any:
        """The image (fds 0-2 left out: the relay carries them), then the relay started;
        `relayed`, kept here, goes ahead of the image's `part`s and `dumped` (the mover
        sends them in that order, one queue)."""
        image = self._wait(self.standins.tracer.dump_moving(self.pid, set(STDIO)))
        port, token = self._start_relay()
        self.relayed = messages.Relayed(id=self.mid, port=port, token=token)
        return image

    def drop(self) -> None:
        """It runs elsewhere now: the stopped copy becomes its stand-in. Held from the
        moment its parking is queued: a `finish` for it queues behind (a failed parking
        kills it, and its end kills the moved process too)."""
        tracer = self.standins.tracer
        try:
            fut = tracer.park_moved(self.pid, STDIO)
            self.standins.held[self.pid] = self.session
            self._wait(fut)
        except BaseException:
            # killed while it waited for its verdict (a SIGKILL here): its end, once the
            # tracer takes it, kills the moved process too (`_ended_here`)
            tracer.kill(self.pid)
            raise
        finally:
            self._settle()
        log.debug("move %d: pid %d stands in here", self.mid, self.pid)

    def release(self, err: int | None) -> None:
        try:
            self._kill_relay()
            self._wait(self.standins.tracer.release_moving(self.pid, err))
        finally:
            self._settle()

    # ---- the relay ----

    def _start_relay(self) -> tuple[int, str]:
        fds = [os.open(os.devnull, os.O_RDWR) if fd is None else fd
               for fd in pt.copy_fds(self.pid, STDIO)]
        try:
            st = procstatus.read(self.pid)
            uid, gid = int(st["Uid"].split()[0]), int(st["Gid"].split()[0])
            groups = [int(g) for g in st.get("Groups", "").split()]   # as they are
        except (OSError, KeyError, ValueError):
            for fd in fds:
                os.close(fd)
            raise BpfsError(errno.ESRCH, f"process {self.pid} is gone") from None
        token = os.urandom(16).hex()
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        try:
            self.relay = trio.from_thread.run_sync(
                self._spawn, fds, uid, gid, groups, token, ready_w, trio_token=self.token)
        finally:
            for fd in (*fds, ready_w):
                os.close(fd)
        try:
            return _read_port(ready_r), token
        except BpfsError:
            self._kill_relay()
            raise
        finally:
            os.close(ready_r)

    def _spawn(self, fds: list[int], uid: int, gid: int, groups: list[int], token: str,
               ready_w: int) -> "subprocess.Popen[bytes]":
        """In trio's thread: a pending directed fork takes its PID first (settle)."""
        sup = self.standins.node.supervisor
        if sup is not None:
            sup.settle()
        token_r, token_w = os.pipe2(os.O_CLOEXEC)
        os.write(token_w, token.encode())       # 32 bytes: the pipe holds them
        os.close(token_w)
        try:
            return subprocess.Popen(
                relaystart.argv(self.pid, token_r, "0.0.0.0", ready_w), stdin=fds[0], stdout=fds[1], stderr=fds[2],
                pass_fds=(ready_w, token_r), env=relaystart.environment(), cwd="/",
                start_new_session=True,
                user=uid, group=gid, extra_groups=groups if uid != 0 else None)
        except OSError as exc:
            raise BpfsError(exc.errno or errno.EIO, "cannot start the stdio relay: "
                            f"{exc.strerror}") from None
        finally:
            os.close(token_r)

    def _kill_relay(self) -> None:
        relay, self.relay = self.relay, None
        if relay is not None:
            try:
                relay.kill()
            except OSError:
                pass
            threading.Thread(target=relay.wait, daemon=True).start()


def _links(session: Any, req: messages.Restore, pid: int) -> Any:
    """Its links, made again (`again` came) or first ones, as a restore makes them."""
    from bpfs.node import earlylinks
    return earlylinks.links_for(session, req, pid)


def _read_port(fd: int) -> int:
    line = b""
    while not line.endswith(b"\n") and len(line) < relaystart.READY_MAX:
        ready, _, _ = select.select([fd], [], [], RELAY_TIMEOUT)
        got = os.read(fd, relaystart.READY_MAX) if ready else b""
        if not got:
            break
        line += got
    try:
        return relaystart.port_of(line)
    except ValueError:
        raise BpfsError(errno.EIO, "the stdio relay did not start") from None
