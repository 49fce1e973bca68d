"""The master: the cluster model served as /bproc, the node links, migrated processes.

    daemon      MasterConfig, Master (the ctl.Services the filesystem calls), serve_master,
                run_master (`bpfs master`, bpfs/cli/bpfs_main.py), the state file's saves
    links       node links: accept, register, the FROM_NODE table, receive loop, watchdog
    procs       ProcService: the ghost table, the tracer bridge, signals, exits, a lost node
    migrations  one migration's steps: execmove -> capture -> restore -> negotiate, or
                failed; a multi-node run's fan-out (design: docs/migration.md)
    tell_bpsh   the one-way links to bpsh (ranks, error headers)
    exec        ExecService: `exec` on nodes/N/ctl, the master's own child migrated
    liveness    when a node is silent; statefile: ACLs and admin states on disk
"""
