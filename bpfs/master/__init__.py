"""The master: its daemon (node server, cluster model, /bproc mount), migrated processes
(procs), the master's own exec (exec), node liveness and the state file."""
