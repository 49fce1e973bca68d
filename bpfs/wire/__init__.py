"""The wire: the master <-> node protocol (framing, and the table of its messages) and
bpsh's request and link formats (execreq).

Empty on purpose: bpsh imports `bpfs.wire.execreq` at start-up, and importing this
package must not pull in trio or msgpack (tests/unit/test_startup.py).
"""
