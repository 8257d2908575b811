"""The thpguard command line: verify's checks against fake trees, the live
self-test, JSON against the documented schema, exit codes, and status /
watch / guard against a real child process whose huge page the test splits."""

import contextlib
import ctypes
import errno
import json
import os
import pathlib
import select
import subprocess
import sys
import time

import pytest

from thpguard import cli, kernel
from fakekernel import FakeNative, FakeTree
from conftest import communicate_within, readline_within, run_in_child, sigint_default, smaps_vma, stop_process, wait_until

MiB = 1024 * 1024
SCHEMA = pathlib.Path(__file__).resolve().parent.parent / "docs" / "verify-schema.json"


@pytest.fixture(autouse=True)
def _fresh():
    kernel.registry.clear()
    kernel.reset_warnings()
    yield
    kernel.registry.reset()


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def verify_json(capsys, *argv):
    code, out, err = run(capsys, "verify", "--json", *argv)
    doc = json.loads(out)
    validate(doc)
    return code, doc, err


def validate(doc, required=False):
    """Validate against docs/verify-schema.json (where jsonschema is installed)."""
    try:
        import jsonschema
    except ImportError:
        if required:
            pytest.skip("jsonschema is not installed")
        return
    jsonschema.validate(doc, json.loads(SCHEMA.read_text()))


def by_name(doc):
    return {c["name"]: c for c in doc["checks"]}


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake tree selected with kernel.set_test_roots, with a 6.18-like native layer."""

    def make(native=None, **kw):
        t = FakeTree(tmp_path, **kw)
        monkeypatch.setattr(kernel._files, "_test_roots", t.roots)
        n = native or FakeNative()
        kernel.registry.set_native(n)
        return t

    return make


# -- host checks on fake trees ----------------------------------------------------


@pytest.mark.parametrize("mode,status", [("always", "ok"), ("madvise", "ok"), ("never", "warn")])
def test_enabled_modes(fake, capsys, mode, status):
    """always/madvise pass; never warns (MADV_COLLAPSE still builds huge pages) and names the fix."""
    t = fake(enabled=mode)
    code, doc, _ = verify_json(capsys, "--skip-selftest")
    check = by_name(doc)["thp_enabled"]
    assert check["status"] == status and doc["capabilities"]["enabled"] == mode
    assert code == 0 and doc["verdict"] == "certain"
    if mode == "never":
        assert check["advice"] == f"echo madvise > {t.thp}/enabled"
        assert check["fix"] == {"path": f"{t.thp}/enabled", "value": "madvise"}


def test_never_without_collapse_fails(fake, capsys):
    """THP never on a kernel without MADV_COLLAPSE fails, exit 1, and the verdict names the change."""
    t = fake(enabled="never", native=FakeNative(known=(14, 23)))
    code, out, _ = run(capsys, "verify", "--skip-selftest")
    assert code == 1
    assert "fail  THP enabled" in out and f"-> echo madvise > {t.thp}/enabled" in out
    assert out.strip().splitlines()[-1].startswith("NOT CERTAIN: 2 check(s) failed (THP enabled, MADV_COLLAPSE)")


@pytest.mark.parametrize("defrag,status", [("madvise", "ok"), ("defer+madvise", "ok"), ("defer", "warn"),
                                           ("never", "warn")])
def test_defrag_modes(fake, capsys, defrag, status):
    """defrag values that never compact for advised faults warn."""
    fake(defrag=defrag)
    code, doc, _ = verify_json(capsys, "--skip-selftest")
    assert by_name(doc)["thp_defrag"]["status"] == status and code == 0


def test_pmd_size_never_in_mthp_fails(fake, capsys):
    """hugepages-2048kB/enabled = never disables PMD THP: a failed check with the file to fix."""
    t = fake(mthp={2048: "never", 64: "always"})
    code, doc, _ = verify_json(capsys, "--skip-selftest")
    c = by_name(doc)["mthp"]
    assert code == 1 and c["status"] == "fail"
    assert c["fix"]["path"] == f"{t.thp}/hugepages-2048kB/enabled" and c["fix"]["value"] == "inherit"


def test_old_kernel(fake, capsys):
    """A 5.15-like kernel: no mTHP dirs, no MADV_COLLAPSE, no PAGEMAP_SCAN; versions in the advice."""
    fake(mthp={}, native=FakeNative(known=(14, 23), scan_errno=errno.ENOTTY))
    code, doc, _ = verify_json(capsys, "--skip-selftest")
    c = by_name(doc)
    assert c["mthp"]["status"] == "n/a"
    assert c["collapse"]["status"] == "fail" and "6.1" in c["collapse"]["advice"]
    assert c["pagemap_scan"]["status"] == "warn" and "6.7" in c["pagemap_scan"]["advice"]
    assert code == 1 and doc["verdict"] == "not_certain"


def test_missing_files_never_crash(fake, capsys):
    """A tree missing defrag, khugepaged, buddyinfo and vmstat gives n/a, not a crash."""
    t = fake(khugepaged=False)
    os.unlink(f"{t.thp}/defrag")
    os.unlink(f"{t.proc}/buddyinfo")
    os.unlink(f"{t.proc}/vmstat")
    code, doc, _ = verify_json(capsys, "--skip-selftest")
    c = by_name(doc)
    assert c["thp_defrag"]["status"] == "n/a" and c["khugepaged"]["status"] == "n/a"
    assert c["fragmentation"]["status"] == "n/a" and code == 0


def test_no_thp_is_unsupported(fake, capsys):
    """A kernel without transparent_hugepage is an unsupported host: exit 4."""
    fake(thp=False)
    code, doc, _ = verify_json(capsys)
    assert code == 4 and doc["verdict"] == "unsupported" and doc["selftest_size"] is None
    assert by_name(doc)["thp_enabled"]["status"] == "fail"


def test_missing_native_module_advises_a_build(fake, capsys):
    """Without the native module, the feature checks advise a rebuild, not a newer kernel."""
    fake()
    kernel.registry.set_native(None, "native module not available (x)")
    _, doc, _ = verify_json(capsys, "--skip-selftest")
    checks = by_name(doc)
    for name in ("collapse", "pagemap_scan", "populate_write", "process_madvise"):
        assert "reinstall thpguard" in checks[name]["advice"] and "Linux" not in checks[name]["advice"]


def test_prctl_disabled_fails(fake, capsys):
    """A THP-disabled process (prctl returns 1) fails; except-advised (3) passes."""
    fake(native=FakeNative(thp_disable=1, collapse_errno=errno.EINVAL))
    code, doc, _ = verify_json(capsys, "--skip-selftest")
    assert code == 1 and by_name(doc)["prctl"]["status"] == "fail"
    assert "THP-disabled" in by_name(doc)["collapse"]["detail"]
    kernel.registry.clear()
    fake(native=FakeNative(thp_disable=3))
    code, doc, _ = verify_json(capsys, "--skip-selftest")
    assert code == 0 and "except advised" in by_name(doc)["prctl"]["detail"]


def test_cgroup_headroom(fake, capsys):
    """A v2 cgroup close to its limit warns and names memory.max; a roomy one passes."""
    t = fake()
    base = f"{t.sys}/fs/cgroup/svc"
    t.write(f"{base}/memory.max", f"{100 * MiB}\n")
    t.write(f"{base}/memory.current", f"{90 * MiB}\n")
    t.process("self", cgroup="0::/svc\n")
    code, doc, _ = verify_json(capsys, "--skip-selftest")
    c = by_name(doc)["cgroup"]
    assert c["status"] == "warn" and f"{base}/memory.max" in c["advice"] and code == 0
    t.write(f"{base}/memory.max", f"{4096 * MiB}\n")
    code, doc, _ = verify_json(capsys, "--skip-selftest")
    assert by_name(doc)["cgroup"]["status"] == "ok"


def test_fragmentation_warns(fake, capsys):
    """Little free memory in order >= 9 blocks warns with the compaction command."""
    t = fake()
    t.buddyinfo([5000, 100, 10, 0, 0, 0, 0, 0, 0, 1, 0])
    t.write(f"{t.proc}/buddyinfo", open(f"{t.proc}/buddyinfo").read().replace(
        "0      0      0      0      0      0      0      0      1      1      3",
        "0      0      0      0      0      0      0      0      0      0      0"))
    code, doc, _ = verify_json(capsys, "--skip-selftest")
    c = by_name(doc)["fragmentation"]
    assert c["status"] == "warn" and "compact_memory" in c["advice"]


# -- --fix -----------------------------------------------------------------------


def test_fix_refused_without_root(fake, capsys, monkeypatch):
    """verify --fix as a non-root user changes nothing and exits 2."""
    t = fake(enabled="never")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    before = open(f"{t.thp}/enabled").read()
    code, out, err = run(capsys, "verify", "--fix", "--skip-selftest")
    assert code == 3 and "must run as root" in err and out == ""
    assert open(f"{t.thp}/enabled").read() == before


def test_fix_writes_advised_values(fake, capsys, monkeypatch):
    """As root, --fix writes each advised value, prints it, and the re-check passes."""
    t = fake(enabled="never", defrag="never")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    # --fix refuses fake roots (it writes only the real /sys): let it write this tree.
    monkeypatch.setattr(kernel.Roots, "is_real", property(lambda self: True))
    code, out, _ = run(capsys, "verify", "--fix", "--skip-selftest")
    assert f"fix: wrote madvise to {t.thp}/enabled (was never)" in out
    assert f"fix: wrote madvise to {t.thp}/defrag (was never)" in out
    assert open(f"{t.thp}/enabled").read().strip() == "madvise"
    assert code == 0 and "ok    THP enabled" in out


def test_verify_never_writes_without_fix(fake, capsys):
    """Plain verify leaves every sysfs file as it was."""
    t = fake(enabled="never", defrag="defer")
    snapshot = {p: p.read_bytes() for p in pathlib.Path(t.sys).rglob("*") if p.is_file()}
    run(capsys, "verify", "--skip-selftest")
    assert snapshot == {p: p.read_bytes() for p in pathlib.Path(t.sys).rglob("*") if p.is_file()}


# -- output forms and exit codes -----------------------------------------------------


def test_usage_errors_exit_2(capsys):
    """Unknown commands, bad PIDs and bad sizes are usage errors: exit 2."""
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["status", "abc"]) == 2
    assert cli.main(["verify", "--size", "lots"]) == 2
    assert cli.main(["verify", "--json", "--quiet"]) == 2
    assert cli.main(["watch", "1", "--interval", "0"]) == 2
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    capsys.readouterr()


def test_quiet_prints_verdict_only(fake, capsys):
    """--quiet prints exactly one line, the verdict."""
    fake()
    code, out, _ = run(capsys, "verify", "--quiet", "--skip-selftest")
    assert code == 0 and out.splitlines() == [out.strip()] and out.startswith("CERTAIN")


def test_json_matches_schema(fake, capsys):
    """--json output of a failing and a passing host validates against the documented schema."""
    fake(enabled="never", native=FakeNative(known=(14, 23)))
    _, out, _ = run(capsys, "verify", "--json", "--skip-selftest")
    validate(json.loads(out), required=True)
    kernel.registry.clear()
    fake()
    _, out, _ = run(capsys, "verify", "--json", "--skip-selftest")
    validate(json.loads(out), required=True)


def test_json_keys_sorted(fake, capsys):
    """--json is one object, keys sorted at every level, with a schema version."""
    fake()
    _, out, _ = run(capsys, "verify", "--json", "--skip-selftest")
    doc = json.loads(out)
    assert out.count("\n") == 1 and doc["schema_version"] == 2
    assert out.strip() == json.dumps(doc, sort_keys=True)


def test_python_dash_m(tmp_path):
    """python -m thpguard runs the same command line."""
    r = subprocess.run([sys.executable, "-m", "thpguard", "verify", "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage:" in r.stderr


# -- the real host ------------------------------------------------------------------------


def test_live_verify_real_host(require_thp, capsys):
    """On this host the live self-test passes for every policy, with timings, on one screen."""
    code, out, err = run(capsys, "verify")
    lines = out.splitlines()
    assert code == 0, out + err
    assert len(lines) <= 25 and lines[-1].startswith("CERTAIN")
    for policy in ("share", "copy", "wipe", "private"):
        assert any(line.split()[:2] == ["ok", policy] for line in lines), out


def test_live_verify_json(require_thp, capsys):
    """The live --json validates against the schema; share reports split, repair and smaps truth."""
    code, doc, _ = verify_json(capsys, "--size", "4M")
    checks = by_name(doc)
    assert code == 0 and doc["selftest_size"] == 4 * MiB
    share = checks["selftest_share"]["measurements"]
    assert share["facts"]["split_blocks"] == 1
    assert share["facts"]["smaps_anon_huge_bytes"] == share["size"]
    for key in ("alloc_seconds", "fork_seconds", "split_write_seconds", "detect_seconds",
                "repair_seconds", "verify_seconds"):
        assert share["timings"][key] >= 0
    assert checks["selftest_private"]["measurements"]["facts"]["child_vma_perms"] in (None, "---p")


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def test_verify_pid_inherited_prctl(capsys):
    """--pid on a process whose parent set PR_SET_THP_DISABLE fails and names the ancestor."""
    def disable():
        _libc().prctl(41, 1, 0, 0, 0)

    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess,sys; p=subprocess.Popen(['sleep','infinity']); "
                               "print(p.pid, flush=True); sys.stdin.read(); p.kill(); p.wait()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=disable)
    try:
        child = int(parent.stdout.readline())
        assert kernel.read_status(child, kernel.Roots()).thp_enabled is False  # ground truth
        code, doc, _ = verify_json(capsys, "--pid", str(child), "--skip-selftest")
        c = by_name(doc)["prctl"]
        assert code == 1 and c["status"] == "fail"
        assert f"ancestor PID {parent.pid}" in c["detail"] and "PR_THP_DISABLE_EXCEPT_ADVISED" in c["advice"]
    finally:
        parent.stdin.close()
        parent.wait(timeout=60)


def test_verify_pid_missing(capsys):
    """--pid of a process that does not exist exits 3 (no such process), not 2 (usage)."""
    code, _, err = run(capsys, "verify", "--pid", "999999999", "--skip-selftest")
    assert code == 3 and "no process" in err


# -- status / watch / guard against a real split --------------------------------------------

TARGET = r"""
import os, sys, thpguard
r = thpguard.alloc(SIZE, fork="share")
v = r.view()
v[:] = b"\x5a" * len(v)
pid = os.fork()
if pid == 0:  # keeps sharing the huge pages, so the parent's split stays
    sys.stdin.read()
    os._exit(0)
v[r.pmd_size + 5] = 1
print(r.address, r.size, r.pmd_size, flush=True)
sys.stdin.read()
os.waitpid(pid, 0)
"""


@contextlib.contextmanager
def split_target(size=8 * MiB):
    """A process holding a thpguard region whose second block it split after fork."""
    p = subprocess.Popen([sys.executable, "-c", TARGET.replace("SIZE", str(size))],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        addr, size, pmd = map(int, p.stdout.readline().split())
        yield p.pid, addr, size, pmd
    finally:
        p.stdin.close()
        p.wait(timeout=60)


def test_status_shows_split(require_thp, capsys):
    """status finds exactly the block the target split, matching its smaps."""
    with split_target() as (pid, addr, size, pmd):
        assert smaps_vma(pid, addr).fields["AnonHugePages"] == size - pmd  # ground truth
        code, out, _ = run(capsys, "status", str(pid), "--json", "--only-eligible")
        doc = json.loads(out)
        assert code == 0 and doc["schema_version"] == 2
        proc = doc["processes"][0]
        vma = next(v for v in proc["vmas"] if v["start"] == addr)
        assert vma["split_blocks"] == 1 and vma["split_block_addresses"] == [addr + pmd]
        assert vma["pmd_mapped_bytes"] == size - pmd and vma["advised"] and vma["thp_eligible"]
        assert all(v["thp_eligible"] for v in proc["vmas"])
        code, out, _ = run(capsys, "status", str(pid))
        assert f"{addr:012x}-{addr + size:012x}" in out


def test_watch_samples_and_exit(require_thp, capsys):
    """watch prints samples, and ends with exit 0 when the process exits."""
    with split_target() as (pid, addr, size, pmd):
        code, out, _ = run(capsys, "watch", str(pid), "--interval", "0.05", "--count", "2", "--json")
        samples = [json.loads(line) for line in out.splitlines()]
        assert code == 0 and len(samples) == 2 and samples[0]["totals"]["split_blocks"] >= 1
    code, _, err = run(capsys, "watch", str(pid), "--count", "1")
    assert code == 3 and "no process" in err


def test_guard_repairs_as_root(require_thp, capsys):
    """guard --once re-collapses the split block from outside; the target's smaps confirms."""
    if os.geteuid() != 0:
        pytest.skip("guard needs CAP_SYS_NICE")
    with split_target() as (pid, addr, size, pmd):
        code, out, err = run(capsys, "guard", str(pid), "--once")
        assert code == 0, err
        assert f"repaired {addr + pmd:#x}" in out
        assert smaps_vma(pid, addr).fields["AnonHugePages"] == size  # ground truth


def main_as_nobody(*argv):
    """Run cli.main in a forked child that dropped to uid/gid nobody first
    (forked, not exec'd: nobody may not be able to read the interpreter)."""
    import io

    cli._parser()  # import what argparse loads lazily while the files are still readable

    def child():
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        # A uid change leaves the process non-dumpable (its /proc files then
        # belong to root); a process started as nobody is dumpable.
        _libc().prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    return run_in_child(child)


def test_guard_unprivileged_fails_clearly(require_thp):
    """As nobody, guard says which privilege is missing and exits 3; the split stays."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")
    with split_target() as (pid, addr, size, pmd):
        code, out, err = main_as_nobody("guard", str(pid), "--once")
        assert code == 3, err
        assert "CAP_SYS_NICE" in err and out == ""
        assert smaps_vma(pid, addr).fields["AnonHugePages"] == size - pmd


def test_status_unprivileged_other_user(require_thp):
    """As nobody, status of root's process is refused with a clear message and exit 3."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")
    with split_target() as (pid, addr, size, pmd):
        code, out, err = main_as_nobody("status", str(pid))
        assert code == 3 and "ptrace read access" in err, err


def test_status_own_process_unprivileged(require_thp):
    """As nobody, status of its own process works (PAGEMAP_SCAN on its own pagemap)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")
    code, out, err = main_as_nobody("status", "--only-eligible", "self")
    assert code == 0, err
    assert "[pagemap_scan]" in out


def test_status_smaps_fallback(require_thp):
    """Without PAGEMAP_SCAN (before 6.7), PMD-mapped bytes come from smaps and split blocks are unknown."""
    from thpguard import _procmap

    with split_target() as (pid, addr, size, pmd):
        pc = _procmap.scan_process(pid, use_scan=False)
        vma = next(v for v in pc.vmas if v.start == addr)
        assert pc.source == "smaps" and vma.split_blocks is None
        assert vma.pmd_mapped_bytes == size - pmd == smaps_vma(pid, addr).fields["AnonHugePages"]
        assert pc.totals()["split_blocks"] is None


def test_status_without_pid_lists_advised_processes(require_thp, capsys):
    """status with no PID lists readable processes that have advised or PMD-mapped VMAs."""
    with split_target() as (pid, addr, size, pmd):
        code, out, _ = run(capsys, "status", "--json", "--only-eligible")
        doc = json.loads(out)
        assert code == 0 and pid in [p["pid"] for p in doc["processes"]]


# -- conventions: exit codes, progress, Ctrl-C, JSON errors, the VMA filter -------------------


def _gone_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_status_and_watch_of_a_missing_pid_do_not_claim_it_exited(capsys):
    """A PID with no process behind it (reaped here, or never used) is named
    as either, exit 3: thpguard cannot tell the two apart."""
    pid = _gone_pid()
    for command in ("status", "watch"):
        code, out, err = run(capsys, command, str(pid))
        assert code == 3 and out == ""
        assert f"no process with PID {pid} (it never existed, or it has exited)" in err, err


def test_exit_codes_are_distinct(fake, capsys, monkeypatch):
    """Usage (2), no such process or permission (3) and unsupported host (4) differ."""
    assert cli.main(["status", "--bogus"]) == cli.EXIT_USAGE == 2
    assert run(capsys, "status", str(_gone_pid()))[0] == cli.EXIT_NO_ACCESS == 3
    assert run(capsys, "watch", str(_gone_pid()))[0] == 3
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert run(capsys, "verify", "--fix", "--skip-selftest")[0] == 3
    fake(thp=False)
    assert run(capsys, "verify", "--skip-selftest")[0] == cli.EXIT_UNSUPPORTED == 4


def test_help_shows_defaults_and_exit_codes(capsys):
    """--help names each default and the exit codes."""
    assert cli.main(["guard", "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default: 1.0)" in out and "130 interrupted" in " ".join(out.split())


def test_verify_help_names_every_exit_code_it_uses(capsys):
    """verify --help names 0, 1, 3 (--fix without root, --pid not readable) and 4."""
    assert cli.main(["verify", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert ("Exit 0 when the host can give THP certainty, 1 when a check failed, 3 when --fix is run "
            "without root or --pid names a process that does not exist or may not be read, 4 when "
            "the host is unsupported") in out


def test_run_help_shows_defaults_and_exit_codes(capsys):
    """run --help names its defaults and its own exit codes (127: program not found)."""
    assert cli.main(["run", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default share)" in out and "(default 0.05)" in out and "127 COMMAND not found" in out


@pytest.mark.parametrize("command", ["watch", "guard"])
def test_watch_guard_json_errors(capsys, command):
    """watch/guard --json report an error as a JSON line with the exit code, not only as text."""
    code, out, err = run(capsys, command, str(_gone_pid()), "--json")
    doc = json.loads(out)
    assert code == 3 and doc["event"] == "error" and doc["exit_code"] == 3
    assert doc["command"] == command and "no process" in doc["message"] and "no process" in err


def test_verify_progress_only_on_a_terminal(require_thp):
    """verify shows self-test progress on a terminal's stderr, never in a pipe or in JSON."""
    import pty

    cmd = [sys.executable, "-m", "thpguard", "verify", "--size", "2M"]
    piped = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert "self-test 1/" not in piped.stderr and "self-test 1/" not in piped.stdout
    master, slave = pty.openpty()
    seen = b""
    try:
        # The terminal is read while verify runs: unread, its buffer fills
        # on a slow run and verify's next write to stderr blocks for good.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, text=True)
        os.close(slave)
        slave = -1
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1)[0]:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end closed
                break
            if not chunk:
                break
            seen += chunk
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        tty = subprocess.CompletedProcess(cmd, proc.returncode, out, None)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert b"self-test 1/4: share" in seen and "self-test 1/" not in tty.stdout
    assert tty.returncode == piped.returncode


def test_guard_ctrl_c_prints_summary_and_exits_130(require_thp):
    """SIGINT to a running guard prints how much it repaired and exits 130."""
    if os.geteuid() != 0:
        pytest.skip("guard needs CAP_SYS_NICE")
    with split_target() as (pid, addr, size, pmd):
        g = subprocess.Popen([sys.executable, "-m", "thpguard", "guard", str(pid), "--interval", "0.05"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
        try:
            # The first repair: the guard is past its set-up.
            first = readline_within(g, g.stdout, "the guard's first repair line")
            g.send_signal(2)
            out, err = communicate_within(g, "the guard to exit after SIGINT")
        finally:
            stop_process(g)
    assert "repaired" in first, err
    assert g.returncode == 130, err
    assert "interrupted: guarded PID" in out and "1 block(s) repaired" in out


def test_guard_json_ctrl_c_summary(require_thp):
    """guard --json ends with an 'interrupted' object carrying the counts."""
    if os.geteuid() != 0:
        pytest.skip("guard needs CAP_SYS_NICE")
    with split_target() as (pid, addr, size, pmd):
        g = subprocess.Popen([sys.executable, "-m", "thpguard", "guard", str(pid), "--json",
                              "--interval", "0.05"], stdout=subprocess.PIPE, text=True, preexec_fn=sigint_default)
        try:
            first = json.loads(readline_within(g, g.stdout, "the guard's first JSON pass"))
            g.send_signal(2)
            out, _ = communicate_within(g, "the guard to exit after SIGINT")
        finally:
            stop_process(g)
    last = json.loads(out.splitlines()[-1])
    assert first["event"] == "pass" and "timestamp_seconds" in first
    assert all("ms" not in r and r["seconds"] >= 0 for r in first["repaired"])
    assert g.returncode == 130 and last["event"] == "interrupted" and last["repaired_blocks"] >= 1


def test_status_lists_what_matters_and_aligns(require_thp, capsys):
    """status hides small file VMAs unless --all; the region is listed; columns align with [vsyscall]."""
    with split_target() as (pid, addr, size, pmd):
        code, out, _ = run(capsys, "status", str(pid))
        code_all, out_all, _ = run(capsys, "status", "--all", str(pid))
    rows = [line for line in out.splitlines() if line.startswith("  ") and "-" in line.split()[0]]
    rows_all = [line for line in out_all.splitlines() if line.startswith("  ") and "-" in line.split()[0]]
    assert code == code_all == 0 and len(rows) < len(rows_all)
    assert addr in [int(line.split()[0].split("-")[0], 16) for line in rows]
    assert not any(".so" in line for line in rows) and any(".so" in line for line in rows_all)
    # Every column starts at the same offset, [vsyscall] included.
    size_columns = {line.index(line.split()[1]) + len(line.split()[1]) for line in rows_all}
    assert len(size_columns) == 1, out_all


def test_watch_ctrl_c_prints_samples_and_exits_130(require_thp):
    """SIGINT to watch prints how many samples it took and exits 130."""
    with split_target() as (pid, addr, size, pmd):
        w = subprocess.Popen([sys.executable, "-m", "thpguard", "watch", str(pid), "--interval", "0.05"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
        try:
            first = readline_within(w, w.stdout, "watch's first sample")
            w.send_signal(2)
            out, err = communicate_within(w, "watch to exit after SIGINT")
        finally:
            stop_process(w)
    assert "PMD-mapped" in first, err
    assert w.returncode == 130 and f"sample(s) of PID {pid}" in out, (out, err)


def _anon_huge_bytes(pid):
    """AnonHugePages of ``pid`` (smaps_rollup), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def test_verify_ctrl_c_exits_130(require_thp):
    """SIGINT during verify's self-test exits 130 with a one-line message, no traceback.

    The signal goes once the self-test has huge pages mapped (its first
    region), never after a fixed pause. A verify that finished before the
    signal reached it tested nothing: it is run again (five times at most).
    """
    for _ in range(5):
        v = subprocess.Popen([sys.executable, "-m", "thpguard", "verify", "--size", "256M"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=sigint_default)
        try:
            wait_until(lambda: v.poll() is not None or _anon_huge_bytes(v.pid) > 0,
                       "verify's self-test to map its region")
            v.send_signal(2)
            out, err = v.communicate(timeout=120)
        finally:
            if v.poll() is None:
                v.kill()
                v.communicate()
        if v.returncode != 0:
            break
    else:
        pytest.skip("verify finished before the signal reached it, five times")
    assert v.returncode == 130, (out, err)
    assert "interrupted during verify" in err and "Traceback" not in err, err


@contextlib.contextmanager
def _zombie():
    """A child that exited and was not reaped yet (its PID exists, its memory does not)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited; left unreaped
        yield pid
    finally:
        os.waitpid(pid, 0)


@pytest.mark.parametrize("command", ["status", "watch", "guard"])
def test_zombie_and_kernel_thread_exit_3(capsys, command):
    """A zombie or a kernel thread (PID 2) has no memory to show: exit 3 with a message, no traceback."""
    extra = {"watch": ["--count", "1"], "guard": ["--once"]}.get(command, [])
    with _zombie() as zpid:
        for pid in (zpid, 2):
            code, out, err = run(capsys, command, str(pid), *extra)
            assert code == cli.EXIT_NO_ACCESS, (pid, out, err)
            assert "Traceback" not in err and str(pid) in err



@pytest.mark.parametrize("argv", [["watch", "1", "--interval", "inf"], ["watch", "1", "--interval", "1e308"],
                                  ["guard", "1", "--interval", "inf"], ["watch", "1", "--count", "-1"]])
def test_unusable_intervals_and_counts_are_usage_errors(capsys, argv):
    """An interval no clock can sleep (inf, 1e308) or a negative count is a usage error, not a traceback later."""
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "Traceback" not in capsys.readouterr().err



def test_prometheus_file_unwritable_is_a_message(capsys, tmp_path):
    """--prometheus-file in a missing directory or onto a directory says so (exit 2), no traceback, no temp file."""
    for path in (tmp_path / "missing" / "x.prom", tmp_path):
        code, out, err = run(capsys, "status", str(os.getpid()), "--prometheus-file", str(path))
        assert code == cli.EXIT_USAGE and "Traceback" not in err and str(path) in err, err
    assert [p.name for p in tmp_path.iterdir()] == []
