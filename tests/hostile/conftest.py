"""The hostile tier: what a careful administrator tries before letting users on a cluster.

Hostile users (a second and third non-root user, PID reuse forced through ns_last_pid),
hostile peers (raw sockets sending malformed, oversized, wrongly typed and out-of-order
frames before and after authentication), and faults (a node daemon stopped or killed
mid-job, a master without CAP_SYS_RESOURCE). Every test here stands for a promise that
once broke; each was seen failing on the code before its fix.

The fixtures of tests/conftest.py (users, make_cluster, cluster) serve here too.
"""
