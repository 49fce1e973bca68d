"""A minimal node for tests and benchmarks: a `Restorer` as PID 1 of fresh PID + mount namespaces.

Not the node daemon (that is bpfs/node); this is the smallest thing that exercises the restore
side as a node would: its own PID namespace (so restored PIDs equal the master's), its own
mount namespace with its own /proc, images received over a socket, the restored process's
fds 0-2 passed along with the request (SCM_RIGHTS), and its wait status sent back.

Wire: each frame is a 4-byte little-endian length and a msgpack map; fds ride on the frame.
A map with "blob": n is followed by n raw bytes, which the receiver puts under "image" (an
image of a GB is sent and received without a copy into or out of msgpack).
  {"op": "restore", "image": bin, "pid": int, "uid": int, "gid": int, "groups": [int],
   "contents": {hash: bin}, "wait": bool}  + 3 fds  ->  {"pid", "status", "t_restore",
                                                          "t_loads"} | error
  {"op": "wait", "pid": int}  ->  {"status": int}    (after a restore with "wait": false)
  {"op": "missing", "image": bin}  ->  {"missing": [hash]}
  {"op": "bind", "src": str, "dst": str}  ->  {}          (bind mount inside the node)
  {"op": "exit"}
Errors come back as {"errno": int, "message": str}.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import subprocess
import sys
import time
from typing import Any, Sequence

import msgpack

from bpfs.errors import BpfsError
from bpfs.migrate.imageframe import Buffer
from bpfs.migrate.ptrace import populated

MAX_FDS = 3
SO_SNDBUFFORCE = 32
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def send(sock: socket.socket, obj: dict[str, Any], fds: Sequence[int] = (),
         blob: Sequence[Buffer] | None = None) -> None:
    """Send a frame; `blob`: buffers sent raw after it, one after the other (no join)."""
    if blob is not None:
        obj = dict(obj, blob=sum(len(b) for b in blob))
    data = msgpack.packb(obj, use_bin_type=True)
    frame = struct.pack("<I", len(data)) + data
    if fds:
        sent = socket.send_fds(sock, [frame[:4]], list(fds))
        assert sent == 4
        sock.sendall(frame[4:])
    else:
        sock.sendall(frame)
    if blob:
        _send_parts(sock, blob)


def _send_parts(sock: socket.socket, blob: Sequence[Buffer]) -> None:
    """sendall of many buffers, up to IOV_MAX a sendmsg: one sendall each cost a wake-up of
    the receiver each (a restore of 100 MB went from 90 to 360 ms)."""
    parts = [memoryview(p).cast("B") for p in blob if len(p)]
    i = 0
    while i < len(parts):
        sent = sock.sendmsg(parts[i:i + 1024])
        while sent:
            if sent >= len(parts[i]):
                sent -= len(parts[i])
                i += 1
            else:
                parts[i], sent = parts[i][sent:], 0


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    head, fds, _flags, _addr = socket.recv_fds(sock, 4, MAX_FDS)
    if not head:
        raise EOFError
    while len(head) < 4:
        more = sock.recv(4 - len(head))
        if not more:
            raise EOFError
        head += more
    msg = msgpack.unpackb(_recv_exactly(sock, struct.unpack("<I", head)[0]), raw=False,
                          strict_map_key=False)
    if "blob" in msg:
        size = msg.pop("blob")
        msg["image"] = _recv_exactly(sock, size, memoryview(populated(size))[:size])
    return msg, list(fds)


def _recv_exactly(sock: socket.socket, size: int, view: memoryview | None = None
                  ) -> memoryview:
    view = memoryview(bytearray(size)) if view is None else view
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if not n:
            raise EOFError
        got += n
    return view


# ---- the node side ----

def _bind(src: str, dst: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(src.encode(), dst.encode(), None, ctypes.c_ulong(4096), None) != 0:  # MS_BIND
        code = ctypes.get_errno()
        raise BpfsError(code, f"bind {src} on {dst}: {os.strerror(code)}")


def _wait_for(pid: int) -> int:
    """As PID 1 we reap everything; return `pid`'s raw wait status."""
    while True:
        got, status = os.waitpid(-1, 0)
        if got == pid:
            return status


def serve(sock: socket.socket, cache_dir: str | None) -> None:
    from bpfs.migrate import image as imagefmt
    from bpfs.migrate.restore import Restorer

    with Restorer(cache_dir) as restorer:
        while True:
            try:
                msg, fds = recv(sock)
            except EOFError:
                return
            try:
                op = msg["op"]
                if op == "exit":
                    send(sock, {})
                    return
                if op == "restore":
                    t0 = time.perf_counter()
                    img = imagefmt.loads(msg["image"])
                    t_loads = time.perf_counter() - t0
                    pid = restorer.restore(img, pid=msg.get("pid"), uid=msg["uid"],
                                           gid=msg["gid"], groups=msg["groups"], fds=fds,
                                           file_content=msg.get("contents") or {})
                    t1 = time.perf_counter()
                    for fd in fds:
                        os.close(fd)
                    fds = []
                    reply = {"pid": pid, "t_restore": t1 - t0, "t_loads": t_loads}
                    if msg.get("wait", True):
                        reply["status"] = _wait_for(pid)
                    send(sock, reply)
                elif op == "wait":
                    send(sock, {"status": _wait_for(msg["pid"])})
                elif op == "missing":
                    send(sock, {"missing": restorer.missing(imagefmt.loads(msg["image"]))})
                elif op == "bind":
                    _bind(msg["src"], msg["dst"])
                    send(sock, {})
                else:
                    raise BpfsError(errno.EINVAL, f"unknown op {op!r}")
            except BpfsError as exc:
                send(sock, {"errno": exc.errno, "message": exc.message})
            finally:
                for fd in fds:
                    os.close(fd)


def main(argv: Sequence[str]) -> int:
    """`python -m bpfs.migrate.loopnode FD [CACHE_DIR]`, as LoopNode starts it (an internal
    child, not a command line): serve the socket FD."""
    serve(socket.socket(fileno=int(argv[0])), argv[1] if len(argv) > 1 else None)
    return 0


# ---- the master side's handle ----

class LoopNode:
    """Start a loop node in new PID and mount namespaces; talk to it; stop it in close()."""

    def __init__(self, cache_dir: str | None = None) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for sock in (ours, theirs):   # images of a GB: fewer wake-ups (root may go past wmem_max)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 << 20)
            except OSError:
                pass
        cmd = ["unshare", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc",
               sys.executable, "-m", "bpfs.migrate.loopnode", str(theirs.fileno())]
        if cache_dir:
            cmd.append(cache_dir)
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        self.sock = ours

    def call(self, msg: dict[str, Any], fds: Sequence[int] = (),
             blob: Sequence[Buffer] | None = None) -> dict[str, Any]:
        send(self.sock, msg, fds, blob)
        reply, _ = recv(self.sock)
        if "errno" in reply:
            raise BpfsError(reply["errno"], reply["message"])
        return reply

    def restore(self, image: bytes | Sequence[Buffer], *, pid: int, uid: int = 0, gid: int = 0,
                groups: Sequence[int] = (), fds: Sequence[int] = (0, 1, 2),
                contents: dict[str, bytes] | None = None, wait: bool = True) -> dict[str, Any]:
        return self.call({"op": "restore", "pid": pid, "uid": uid, "gid": gid,
                          "groups": list(groups), "contents": contents or {}, "wait": wait},
                         fds, blob=[image] if isinstance(image, bytes) else image)

    def wait(self, pid: int) -> int:
        return self.call({"op": "wait", "pid": pid})["status"]

    def missing(self, image: bytes) -> list[str]:
        return self.call({"op": "missing", "image": image})["missing"]

    def bind(self, src: str, dst: str) -> None:
        self.call({"op": "bind", "src": src, "dst": dst})

    def close(self) -> None:
        try:
            self.call({"op": "exit"})
        except (OSError, EOFError, BpfsError):
            pass
        self.sock.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "LoopNode":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
