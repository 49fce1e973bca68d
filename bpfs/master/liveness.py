"""When the master last heard from a node, and how often it asks.

    heartbeat_for(ping_timeout) -> float     the heartbeat interval a timeout implies
    settings_problem(ping_timeout, heartbeat) -> str | None   why they cannot work
    check_interval(ping_timeout) -> float    how often the watchdog looks
    silence(stream) -> float | None          seconds since the kernel last received data
                                             on a node's TCP connection (None: cannot tell)

A node is alive while it sends: every frame counts (master.py stamps
`Node.last_heartbeat` when its receive task handles one), and nodes send
`facts` every `heartbeat` seconds when they have nothing else to say.

The stamp alone is not enough. Under load (a fan-out of hundreds of restores on
a loaded machine) the master's event loop runs late: with 512 embedded nodes on
2 cores the watchdog woke up to 3.0 s late during a `bpsh -a hostname`, while the
nodes' own heartbeats were at most 0.7 s late. When the loop gets going again,
the receive tasks and the watchdog wake in the same batch, and a receive task
that has read a frame yields once before it stamps it, so the watchdog judged
every node on the stamps from before the stall: with --ping-timeout 2, 503 and
then 512 of 512 nodes were marked down, each with ~500 bytes of heartbeats
unread in its socket; with 128 nodes, --ping-timeout 0.5 and heartbeats every
0.1 s, all 128 on two fan-outs of four. So the watchdog never takes the
master's stamp as the last word: for a node that looks silent it asks the
kernel when data last arrived on that socket (TCP_INFO's tcpi_last_data_recv),
which the kernel keeps up to date whether or not the master has read it. The
check may run late, and a silent node is then marked down late; it can no
longer mark a node down for the master's own delay (the same runs: none).

TCP_INFO is Linux's; elsewhere, or for a stream that is not a TCP socket,
`silence` says None and the stamp decides.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

BEATS_PER_TIMEOUT = 5           # a node may miss four heartbeats in a row
MAX_HEARTBEAT = 1.0             # facts fresher than this are not worth the traffic
MIN_CHECK, MAX_CHECK = 0.05, 1.0

# struct tcp_info (linux/tcp.h): 8 one-byte fields, then u32s; tcpi_last_data_recv is
# the 12th u32 (after rto, ato, snd_mss, rcv_mss, unacked, sacked, lost, retrans,
# fackets, last_data_sent, last_ack_sent), in milliseconds. Stable since Linux 2.4.
_LAST_DATA_RECV = struct.Struct("=I")
_LAST_DATA_RECV_OFFSET = 8 + 11 * 4
_TCP_INFO = getattr(socket, "TCP_INFO", None)


def heartbeat_for(ping_timeout: float) -> float:
    """The heartbeat interval for `ping_timeout`: a fifth of it, at most a second."""
    return min(MAX_HEARTBEAT, ping_timeout / BEATS_PER_TIMEOUT)


def settings_problem(ping_timeout: float, heartbeat: float | None) -> str | None:
    """Why these settings cannot work (a node would time out between two heartbeats), or
    None; heartbeat None is heartbeat_for(ping_timeout). The CLIs refuse them before
    anything starts; the master's check_config again."""
    if not ping_timeout > 0:
        return f"ping timeout ({ping_timeout:g} s) must be positive"
    if heartbeat is not None and not 0 < heartbeat < ping_timeout:
        return (f"heartbeat ({heartbeat:g} s) must be positive and shorter than the ping "
                f"timeout ({ping_timeout:g} s); leave it out to get "
                f"{heartbeat_for(ping_timeout):g} s")
    return None


def check_interval(ping_timeout: float) -> float:
    """How often the watchdog looks: a quarter of the timeout, within 0.05..1 s."""
    return max(MIN_CHECK, min(ping_timeout / 4, MAX_CHECK))


def silence(stream: Any) -> float | None:
    """Seconds since data last arrived on `stream`'s TCP socket, read or not (since the
    connection was made if none ever did); None when that cannot be known (not a TCP
    socket, closed, no TCP_INFO)."""
    sock = getattr(stream, "socket", None)
    if sock is None or _TCP_INFO is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 104)
    except (OSError, ValueError, AttributeError):
        return None
    if len(info) < _LAST_DATA_RECV_OFFSET + _LAST_DATA_RECV.size:
        return None
    return _LAST_DATA_RECV.unpack_from(info, _LAST_DATA_RECV_OFFSET)[0] / 1000.0
