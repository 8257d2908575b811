"""Fake sysfs/procfs trees for the parsers in thpguard.kernel and the CLI checks.

Only text files are faked here; nothing pretends to be the kernel's memory
management (tests that need that run against the real kernel).
"""

from __future__ import annotations

import contextlib
import errno
import os
import textwrap

CHOICES = {
    "enabled": ["always", "madvise", "never"],
    "defrag": ["always", "defer", "defer+madvise", "madvise", "never"],
    "shmem_enabled": ["always", "within_size", "advise", "never", "deny", "force"],
    "thp_cow": ["always", "madvise", "never"],
}

SMAPS_ANON = """\
7f0000000000-7f0000800000 rw-p 00000000 00:00 0
Size:               8192 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:                8192 kB
Pss:                8192 kB
Anonymous:          8192 kB
AnonHugePages:      6144 kB
Swap:                  0 kB
THPeligible:    1
VmFlags: rd wr mr mw me ac hg
"""

SMAPS_FILE = """\
55d0c0a00000-55d0c0a02000 r--p 00000000 fe:00 260131                     /usr/bin/cat
Size:                  8 kB
Rss:                   8 kB
AnonHugePages:         0 kB
THPeligible:           0
VmFlags: rd mr mw me
"""


def choice(options, selected):
    return " ".join(f"[{o}]" if o == selected else o for o in options) + "\n"


class FakeTree:
    """A fake /sys and /proc under *base*; ``roots`` is ready for thpguard.kernel."""

    def __init__(self, base, enabled="madvise", defrag="madvise", pmd=2097152,
                 mthp=None, khugepaged=True, thp=True, thp_cow=None):
        from thpguard.kernel import Roots

        self.sys = os.path.join(str(base), "sys")
        self.proc = os.path.join(str(base), "proc")
        self.roots = Roots(sys=self.sys, proc=self.proc)
        os.makedirs(self.sys, exist_ok=True)
        os.makedirs(self.proc, exist_ok=True)
        self.thp = os.path.join(self.sys, "kernel/mm/transparent_hugepage")
        if thp:
            self.set_mode("enabled", enabled)
            self.set_mode("defrag", defrag)
            self.set_mode("shmem_enabled", "never")
            if thp_cow is not None:
                self.set_mode("thp_cow", thp_cow)
            if pmd is not None:
                self.write(f"{self.thp}/hpage_pmd_size", f"{pmd}\n")
            for size_kb, mode in (mthp if mthp is not None else {2048: "inherit", 64: "never"}).items():
                self.write(f"{self.thp}/hugepages-{size_kb}kB/enabled",
                           choice(["always", "inherit", "madvise", "never"], mode))
            if khugepaged:
                for name, value in (("defrag", 1), ("max_ptes_none", 511), ("max_ptes_shared", 256),
                                    ("max_ptes_swap", 64), ("pages_to_scan", 4096),
                                    ("scan_sleep_millisecs", 10000), ("alloc_sleep_millisecs", 60000)):
                    self.write(f"{self.thp}/khugepaged/{name}", f"{value}\n")
        self.write(f"{self.proc}/sys/kernel/osrelease", "6.18.0-fake\n")
        self.write(f"{self.proc}/vmstat", "nr_free_pages 100\nthp_fault_alloc 5\nthp_split_pmd 2\n"
                                          "thp_collapse_alloc 1\n"
                   + ("thp_cow_alloc 0\nthp_cow_fallback 0\n" if thp_cow is not None else ""))
        self.buddyinfo([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
        self.process("self")

    def write(self, path, text):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)

    def set_mode(self, name, value):
        self.write(f"{self.thp}/{name}", choice(CHOICES[name], value))

    def buddyinfo(self, normal):
        self.write(f"{self.proc}/buddyinfo",
                   "Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1      3\n"
                   "Node 0, zone   Normal " + " ".join(f"{n:6d}" for n in normal) + "\n")

    def process(self, pid, thp_enabled=1, threads=1, ppid=1, name="fake", smaps=None,
                cgroup="0::/\n", mountinfo=""):
        d = f"{self.proc}/{pid}"
        status = textwrap.dedent(f"""\
            Name:\t{name}
            PPid:\t{ppid}
            Uid:\t0\t0\t0\t0
            Threads:\t{threads}
            CapEff:\t000001ffffffffff
            """)
        if thp_enabled is not None:
            status += f"THP_enabled:\t{thp_enabled}\n"
        self.write(f"{d}/status", status)
        self.write(f"{d}/smaps", smaps if smaps is not None else SMAPS_FILE + SMAPS_ANON)
        self.write(f"{d}/cgroup", cgroup)
        self.write(f"{d}/mountinfo", mountinfo)
        return d


class FakeNative:
    """Stands in for thpguard._native in the capability probe's unit tests:
    it answers what an older or newer kernel would, with no memory at all."""

    MADV_HUGEPAGE = 14
    MADV_POPULATE_WRITE = 23
    MADV_COLLAPSE = 25
    MADV_THP_COW = 257

    def __init__(self, known=(14, 23, 25), collapse_errno=0, scan_errno=0, thp_disable=0,
                 pidfd_errno=0, tc_tree=None):
        # tc_tree: a FakeTree whose smaps for "self" shows the tc VmFlag on
        # what MADV_THP_COW advised, as the thp_cow patch's kernel does.
        self.tc_tree = tc_tree
        self.known = set(known)
        self.collapse_errno = collapse_errno
        self.scan_errno = scan_errno
        self._thp_disable = thp_disable
        self.pidfd_errno = pidfd_errno
        self.mapped = []

    @contextlib.contextmanager
    def faults_suspended(self):
        yield

    def advice_known(self, advice):
        return advice in self.known

    def map_aligned(self, size, align):
        import mmap
        import ctypes

        m = mmap.mmap(-1, size)
        self.mapped.append(m)
        return ctypes.addressof(ctypes.c_char.from_buffer(m))

    def unmap(self, addr, size):
        self.unmapped = True

    def madvise(self, addr, length, advice):
        if advice == self.MADV_COLLAPSE and self.collapse_errno:
            raise OSError(self.collapse_errno, os.strerror(self.collapse_errno))
        if advice == self.MADV_THP_COW:
            if advice not in self.known:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            if self.tc_tree is not None:
                self.tc_tree.process("self", smaps=(
                    f"{addr:x}-{addr + length:x} rw-p 00000000 00:00 0\n"
                    f"Size:               {length // 1024} kB\n"
                    "AnonHugePages:         0 kB\n"
                    "VmFlags: rd wr mr mw me ac tc\n"))

    def collapse(self, addr, length, chunk, retries):
        return [self.collapse_errno]

    def pagemap_scan(self, fd, start, end):
        if self.scan_errno:
            raise OSError(self.scan_errno, os.strerror(self.scan_errno))
        return []

    def pidfd_open(self, pid):
        if self.pidfd_errno:
            raise OSError(self.pidfd_errno, os.strerror(self.pidfd_errno))
        return os.open("/dev/null", os.O_RDONLY)

    def process_madvise(self, pidfd, iov, advice):
        return sum(n for _, n in iov)

    def thp_disable_get(self):
        return self._thp_disable
