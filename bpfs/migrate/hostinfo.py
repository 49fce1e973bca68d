"""What a machine must match to run an image: kernel build, vdso, CPU features, xstate layout.

An image stopped at its entry point has its IFUNCs resolved for the master's CPU and calls into
the master's vdso at fixed offsets, so a node must have the same kernel build (same vdso bytes)
and at least the master's CPU features. Checked before any process is created.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os

from bpfs.migrate import procfs
from bpfs.migrate.errors import MigrateError
from bpfs.migrate.filecache import hash_bytes
from bpfs.migrate.image import Host


@functools.lru_cache(maxsize=1)
def kernel_build() -> str:
    u = os.uname()
    return f"{u.sysname} {u.release} {u.version} {u.machine}"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> tuple[str, ...]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return tuple(sorted(set(line.split(":", 1)[1].split())))
    return ()


@functools.lru_cache(maxsize=1)
def own_special() -> dict[str, tuple[int, int]]:
    """This process's vvar/vvar_vclock/vdso/vsyscall ranges (same sizes in every process)."""
    out = {}
    for m in procfs.parse_maps(procfs.read_text(os.getpid(), "maps")):
        if m.path in procfs.SPECIAL:
            out[m.path.strip("[]")] = (m.start, m.end)
    return out


@functools.lru_cache(maxsize=1)
def vdso_hash() -> str:
    start, end = own_special()["vdso"]
    return hash_bytes(ctypes.string_at(start, end - start))


def host(xcr0: int, xstate_size: int) -> Host:
    return Host(kernel_build(), vdso_hash(), list(cpu_flags()), xcr0, xstate_size)


def special_sizes(special: dict[str, tuple[int, int]]) -> dict[str, int]:
    return {k: e - s for k, (s, e) in special.items() if k != "vsyscall"}


def check_compatible(image_host: Host, image_special: dict[str, tuple[int, int]],
                     node: Host) -> None:
    """Refuse an image this machine cannot run: ENOEXEC for the kernel, EOPNOTSUPP for the CPU."""
    if image_host.kernel != node.kernel or image_host.vdso != node.vdso:
        raise MigrateError(errno.ENOEXEC, "image needs kernel build "
                           f"{image_host.kernel!r} (this node runs {node.kernel!r}"
                           f"{'' if image_host.kernel != node.kernel else ', vdso differs'})")
    if special_sizes(image_special) != special_sizes(own_special()):
        raise MigrateError(errno.ENOEXEC, "image's vdso/vvar layout differs from this kernel's")
    lacking = sorted(set(image_host.cpu_flags) - set(node.cpu_flags))
    if lacking:
        raise MigrateError(errno.EOPNOTSUPP, "this node's CPU lacks features the image needs: "
                           + " ".join(lacking[:12]))
    if image_host.xcr0 & ~node.xcr0 or image_host.xstate_size != node.xstate_size:
        raise MigrateError(errno.EOPNOTSUPP, f"image's xstate (xcr0 {image_host.xcr0:#x}, "
                           f"{image_host.xstate_size} bytes) does not fit this CPU's "
                           f"(xcr0 {node.xcr0:#x}, {node.xstate_size} bytes)")
