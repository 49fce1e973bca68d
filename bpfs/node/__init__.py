"""The node side of bpfs: the bpslave daemon and the embedded (simulated) cluster.

    daemon.py     `start(cfg, spec)`: what bpslave (bpfs/cli/bpslave.py) runs
    config.py     NodeConfig, exit statuses, --master parsing (no heavy imports)
    launcher.py   new PID + mount (+ UTS) namespaces; the daemon runs as their PID 1
    nsutil.py     ctypes: unshare, mount, umount2, sethostname, prctl
    service.py    the daemon proper (trio): Node (reconnects), the FROM_MASTER table
    session.py    one connection: register, heartbeats, reports, dispatch by a table
    init.py       PID 1 duties: the Reaper (exit statuses by pid), kill_namespace
    procs.py      migration on the node: restore, files, signal; exit reports
    restorer.py   the Restorer, used from the event loop's thread; user credentials
    stdio.py      fds 0-2 of a restored process: links to bpsh, /dev/null, user files
    facts.py      the facts (formats.Facts) sent with register and every heartbeat
    embedded.py   `bpfs up` / `bpfs down`: master + K simulated nodes, PID records

Import discipline: daemon, config, launcher and nsutil must not import trio,
msgpack or psutil (the launcher that stays behind is a bare interpreter);
service, init and facts may.
"""
