"""Reliability: a process THP-disabled by prctl degrades, or raises when strict."""

from __future__ import annotations

import errno
import os

import pytest

import thpguard
from thpguard import _native
from thpguard.errors import HugePagesUnavailableError, KernelCallError

from conftest import smaps_huge_bytes
from reliability_support import run_child

#: include/uapi/linux/prctl.h, Linux 6.18.
PR_THP_DISABLE_EXCEPT_ADVISED = 2


def _in_disabled_child(fn, flags=0):
    """Run ``fn()`` in a child that called prctl(PR_SET_THP_DISABLE, 1, flags).

    The prctl stays in that child (and its descendants): the test process
    is left as it was.
    """

    def child():
        try:
            _native.thp_disable_set(1, flags)
        except KernelCallError as exc:
            if exc.errno == errno.EINVAL and flags:
                return "unsupported"
            raise
        return fn()

    return run_child(child)


def _alloc_degrades(pmd):
    region = thpguard.alloc(4 * pmd)
    view = region.view()
    view[:] = b"\x42" * len(view)
    data_ok = bytes(view[:: 4096]) == b"\x42" * (len(view) // 4096)
    view.release()
    cov = region.coverage()
    kernel_huge = smaps_huge_bytes("self", region.address, region.address + region.size)
    collapse = region.collapse()
    region.close()
    return {
        "get": _native.thp_disable_get(),
        "degraded": region.degraded,
        "huge": cov.huge_bytes,
        "kernel_huge": kernel_huge,
        "data_ok": data_ok,
        "collapse_failures": collapse.failures,
    }


def _alloc_strict(pmd):
    try:
        thpguard.alloc(pmd, strict=True)
    except HugePagesUnavailableError as exc:
        return str(exc)
    return None


def test_prctl_disabled_alloc_degrades(require_thp, pmd):
    """THP-disabled by prctl: alloc() works on small pages, says why in
    ``degraded``, the kernel maps no huge page, the data is right, and
    collapse reports EINVAL instead of repairing."""
    got = _in_disabled_child(lambda: _alloc_degrades(pmd))
    assert got["get"] == 1
    assert "PR_SET_THP_DISABLE" in got["degraded"]
    assert got["huge"] == got["kernel_huge"] == 0
    assert got["data_ok"]
    assert set(got["collapse_failures"]) == {errno.EINVAL}


def test_prctl_disabled_strict_raises(require_thp, pmd):
    """With strict=True the same child gets HugePagesUnavailableError naming
    the prctl switch, and no region is left behind."""
    message = _in_disabled_child(lambda: _alloc_strict(pmd))
    assert message is not None and "PR_SET_THP_DISABLE" in message


def test_prctl_disable_is_inherited_by_grandchildren(require_thp, pmd):
    """The setting is inherited across fork: a grandchild degrades too."""
    got = _in_disabled_child(lambda: run_child(lambda: _alloc_degrades(pmd)))
    assert got["get"] == 1 and got["huge"] == 0
    assert "PR_SET_THP_DISABLE" in got["degraded"]


def test_prctl_except_advised_keeps_huge_pages(require_thp, pmd):
    """With PR_THP_DISABLE_EXCEPT_ADVISED (6.18), advised regions still get
    huge pages: alloc() is not degraded, strict works, collapse repairs."""
    got = _in_disabled_child(lambda: _alloc_degrades(pmd), PR_THP_DISABLE_EXCEPT_ADVISED)
    if got == "unsupported":
        pytest.skip("kernel lacks PR_THP_DISABLE_EXCEPT_ADVISED (Linux 6.18)")
    assert got["get"] == 1 | PR_THP_DISABLE_EXCEPT_ADVISED
    assert got["degraded"] is None
    assert got["huge"] == got["kernel_huge"] == 4 * pmd
    assert got["data_ok"] and got["collapse_failures"] == {}
    message = _in_disabled_child(lambda: _alloc_strict(pmd), PR_THP_DISABLE_EXCEPT_ADVISED)
    assert message is None


def test_prctl_untouched_in_test_process():
    """The tests above changed only their children."""
    assert _native.thp_disable_get() == 0
    assert os.path.exists("/proc/self/status")


def _verify_json():
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "thpguard", "verify", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    report = json.loads(out.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    return out.returncode, checks["prctl"], "Traceback" in out.stderr


def test_verify_names_inherited_prctl(require_thp):
    """`thpguard verify` run under a THP-disabled parent fails the prctl
    check (exit 1) and says the setting is inherited; with
    PR_THP_DISABLE_EXCEPT_ADVISED the check passes."""
    code, check, traceback = _in_disabled_child(_verify_json)
    assert code == 1 and not traceback
    assert check["status"] == "fail"
    assert "PR_SET_THP_DISABLE" in check["detail"] and "inherited" in check["detail"]
    got = _in_disabled_child(_verify_json, PR_THP_DISABLE_EXCEPT_ADVISED)
    if got == "unsupported":
        return
    code, check, traceback = got
    assert check["status"] == "ok" and not traceback
