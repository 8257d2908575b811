"""Hostile users and environments: the Prometheus textfile written by root
into a directory another user controls, and test seams (fake sysfs/proc
roots, fault injection) that must not reach an installed program."""

import contextlib
import io
import json
import os
import pathlib
import select
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from thpguard import cli, kernel, metrics
from thpguard.errors import ThpguardError
from fakekernel import FakeTree
from conftest import wait_child

NOBODY = 65534


def _become_nobody():
    """Drop every id and group to `nobody` (in a forked child)."""
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)


def _as_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (to act as another user, and as the root it attacks)")


def _run_thpguard(argv, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "thpguard", *argv], env=env,
                          capture_output=True, text=True, timeout=timeout)


# -- item: test seams are explicit APIs ----------------------------------------------


def test_sysfs_root_environment_never_redirects_a_fix(tmp_path):
    """Root's `verify --fix` with THPGUARD_SYSFS_ROOT/THPGUARD_PROC_ROOT set by
    someone else writes nothing through that tree: a symlink planted there
    to a root-owned file leaves the file's bytes as they were."""
    _as_root()
    real = _run_thpguard(["verify", "--skip-selftest", "--json"])
    doc = json.loads(real.stdout)
    if any(c["fix"] and c["status"] in ("warn", "fail") for c in doc["checks"]):
        pytest.skip("this host has THP settings that --fix would change: not touching them")
    t = FakeTree(tmp_path / "tree", enabled="never", defrag="never")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.chmod(victim, 0o600)
    enabled = os.path.join(t.thp, "enabled")
    os.unlink(enabled)
    os.symlink(victim, enabled)
    env = dict(os.environ, THPGUARD_SYSFS_ROOT=t.sys, THPGUARD_PROC_ROOT=t.proc)
    out = _run_thpguard(["verify", "--fix", "--skip-selftest"], env=env)
    assert "Traceback" not in out.stderr, out.stderr
    assert victim.read_text() == "precious\n"
    assert "fix: wrote" not in out.stdout, out.stdout


def test_fake_roots_are_an_explicit_api(tmp_path, monkeypatch):
    """kernel.set_test_roots() redirects every reader; the environment
    variables that used to do it are ignored."""
    t = FakeTree(tmp_path, enabled="always")
    monkeypatch.setenv("THPGUARD_SYSFS_ROOT", t.sys)
    monkeypatch.setenv("THPGUARD_PROC_ROOT", t.proc)
    assert kernel.Roots.from_env().is_real
    assert kernel.kernel_release() == os.uname().release
    kernel.set_test_roots(t.roots)
    try:
        assert kernel.thp_mode("enabled") == "always"
        assert kernel.kernel_release() == "6.18.0-fake"
        assert not kernel.Roots.from_env().is_real
    finally:
        kernel.set_test_roots(None)
    assert kernel.Roots.from_env().is_real


def test_fix_refuses_fake_roots(tmp_path, capsys):
    """`verify --fix` writes only to the real /sys: with fake roots set it
    refuses (exit 2) and the fake tree keeps its bytes."""
    _as_root()
    t = FakeTree(tmp_path, enabled="never")
    kernel.set_test_roots(t.roots)
    try:
        code = cli.main(["verify", "--fix", "--skip-selftest"])
    finally:
        kernel.set_test_roots(None)
    out, err = capsys.readouterr()
    assert code == cli.EXIT_USAGE
    assert "--fix" in err and "real" in err
    with open(os.path.join(t.thp, "enabled")) as f:
        assert "[never]" in f.read()


@pytest.mark.parametrize("spec", ["garbage", "map:ENOMEM:lots", "nosuchop:1", ":::", "map:EWHAT"])
def test_bad_faults_variable_never_breaks_import(spec):
    """THPGUARD_FAULTS with a malformed value: `import thpguard` works, one
    warning names the variable, nothing is armed (an alloc succeeds)."""
    code = "import thpguard; r = thpguard.alloc(1 << 21, populate=False); r.close(); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, THPGUARD_FAULTS=spec),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok"]
    assert "Traceback" not in out.stderr
    assert "THPGUARD_FAULTS" in out.stderr


def test_faults_variable_ignored_when_setuid():
    """A process whose real uid differs from its effective uid (a setuid
    program) ignores THPGUARD_FAULTS: its alloc is not failed."""
    _as_root()
    code = (
        "import os; os.setresuid(65534, 0, 0)\n"
        "import thpguard\n"
        "r = thpguard.alloc(1 << 21, populate=False); r.close(); print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code],
                         env=dict(os.environ, THPGUARD_FAULTS="map:ENOMEM:5"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok"]


# -- item: --prometheus-file in a directory another user controls --------------------


@pytest.fixture
def open_base():
    """A directory every user may traverse (pytest's tmp_path is root-only)."""
    base = tempfile.mkdtemp(prefix="thpguard-sec-", dir="/tmp")
    os.chmod(base, 0o755)
    try:
        yield pathlib.Path(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def nobody_swapping(directory, target):
    """A child running as `nobody` that swaps ``directory``'s temporary
    files for symlinks to ``target`` until the block ends."""
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(stop_w)
            _become_nobody()
            while not select.select([stop_r], [], [], 0)[0]:
                try:
                    names = os.listdir(directory)
                except OSError:
                    continue
                for name in names:
                    if name.startswith(".thpguard-") and not name.endswith(".moved"):
                        path = os.path.join(directory, name)
                        try:
                            os.rename(path, path + ".moved")  # refused in a sticky directory
                            os.symlink(target, path)
                        except OSError:
                            pass
        finally:
            os._exit(0)
    os.close(stop_r)
    try:
        yield
    finally:
        os.close(stop_w)
        os.waitpid(pid, 0)


def _shared_dir_and_secret(base, mode):
    """(a directory of ``mode`` others may write, root's 0600 file beside it);
    as root only."""
    _as_root()
    shared = base / "textfile"
    shared.mkdir()
    os.chmod(shared, mode)
    secret = base / "secret"
    secret.write_text("secret\n")
    os.chmod(secret, 0o600)
    return shared, secret


def test_prometheus_file_symlink_race_changes_no_other_file(open_base):
    """Root writing --prometheus-file into a world-writable directory with
    the sticky bit, while `nobody` swaps temporary files for symlinks to a
    0600 root file: that file keeps its mode, owner and bytes, and every
    written .prom file is a regular file of mode 0644 owned by root."""
    shared, secret = _shared_dir_and_secret(open_base, 0o1777)
    with nobody_swapping(str(shared), str(secret)):
        for i in range(30):
            target = shared / "thpguard.prom"
            metrics.write_textfile(str(target), f"thpguard_test {i}\n")
            st = os.lstat(target)
            assert stat.S_ISREG(st.st_mode) and st.st_uid == 0
            assert stat.S_IMODE(st.st_mode) == 0o644
            assert target.read_text() == f"thpguard_test {i}\n"
    st = os.stat(secret)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    assert secret.read_text() == "secret\n"


def test_prometheus_file_unsafe_directory_is_refused(open_base):
    """In a directory without the sticky bit that `nobody` may write, the
    write is refused with a clear error; the file an attacker's symlink
    points at keeps mode 0600, however the race goes."""
    shared, secret = _shared_dir_and_secret(open_base, 0o777)
    refused = 0
    with nobody_swapping(str(shared), str(secret)):
        for i in range(10):
            try:
                metrics.write_textfile(str(shared / "thpguard.prom"), f"thpguard_test {i}\n")
            except metrics.UnsafeDirectoryError as exc:
                assert "writable by other users" in str(exc) and "sticky" in str(exc)
                refused += 1
    assert refused == 10
    st = os.stat(secret)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    # Asked for explicitly, the write goes through, and still never by name.
    metrics.write_textfile(str(shared / "thpguard.prom"), "thpguard_test 1\n", allow_unsafe_dir=True)
    assert stat.S_IMODE(os.lstat(shared / "thpguard.prom").st_mode) == 0o644


def _as_nobody(fn):
    """Run ``fn()`` in a child as `nobody`; fail the test if it raises."""
    pid = os.fork()
    if pid == 0:
        code_ = 1
        try:
            _become_nobody()
            fn()
            code_ = 0
        finally:
            os._exit(code_)
    status = wait_child(pid, "a child running as nobody")
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("case", ["symlink", "directory"])
def test_prometheus_file_redirect_earlier_on_the_path_is_refused(open_base, case):
    """`nobody` plants a symlink to root's directory in a shared sticky
    directory (as ``/tmp/x``), or owns a directory on the path, earlier than
    the textfile's own directory: root's write is refused with
    UnsafeDirectoryError naming the path, and nothing lands in root's
    directory (before: the file was written there)."""
    _as_root()
    shared = open_base / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    victim = open_base / "victim"
    (victim / "metrics").mkdir(parents=True)
    if case == "symlink":
        _as_nobody(lambda: os.symlink(str(victim), str(shared / "x")))
        path = shared / "x" / "metrics" / "thpguard.prom"
    else:
        def plant():
            os.mkdir(shared / "y", 0o755)
            os.symlink(str(victim / "metrics"), str(shared / "y" / "metrics"))
        _as_nobody(plant)
        path = shared / "y" / "metrics" / "thpguard.prom"
    with pytest.raises(metrics.UnsafeDirectoryError) as info:
        metrics.write_textfile(str(path), "thpguard_test 1\n")
    assert "another user (uid 65534)" in str(info.value)
    assert os.listdir(victim / "metrics") == []


def test_prometheus_file_through_root_symlinks_is_written(open_base):
    """A symlink on the path that root owns (as ``/var/run -> /run``) is
    followed: the file lands where it points, a regular 0644 file."""
    _as_root()
    real = open_base / "real"
    real.mkdir()
    os.symlink(str(real), str(open_base / "link"))
    os.symlink("../real", str(real / "up"))
    metrics.write_textfile(str(open_base / "link" / "up" / "thpguard.prom"), "x 1\n")
    st = os.lstat(real / "thpguard.prom")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644


def test_prometheus_file_dotdot_goes_up_from_where_the_symlink_led(open_base):
    """``link/..`` is the parent of the symlink's target (as the kernel
    resolves it), not the directory holding the link (as the text says)."""
    _as_root()
    (open_base / "real" / "sub").mkdir(parents=True)
    os.symlink("real/sub", str(open_base / "s2"))
    metrics.write_textfile(str(open_base / "s2" / ".." / "m.prom"), "x 1\n")
    assert (open_base / "real" / "m.prom").exists()
    assert not (open_base / "m.prom").exists()


@pytest.mark.parametrize("path, mode", [("a\0b.prom", 0o644), (b"a.prom", 0o644), ("a.prom", 0o4777),
                                        ("a.prom", 0o700), ("..", 0o644)])
def test_prometheus_file_bad_path_or_mode_is_a_thpguard_error(tmp_path, path, mode):
    """A NUL or bytes path, a directory name, or a mode beyond read/write
    bits (setuid, execute) raise thpguard's errors, and nothing is written."""
    target = os.path.join(str(tmp_path), path) if isinstance(path, str) else path
    with pytest.raises(ThpguardError):
        metrics.write_textfile(target, "x 1\n", mode=mode)
    assert os.listdir(tmp_path) == []


def test_prometheus_file_mode_ignores_umask(tmp_path):
    """The textfile is 0644 whatever the umask (node_exporter runs as
    another user and must read it)."""
    old = os.umask(0o077)
    try:
        metrics.write_textfile(str(tmp_path / "a.prom"), "x 1\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(tmp_path / "a.prom").st_mode) == 0o644


@pytest.mark.parametrize("case", ["missing", "unwritable", "is_file"])
def test_prometheus_file_bad_directory_is_a_clear_error(open_base, case, capsys):
    """`status --prometheus-file` into a missing or unwritable directory:
    one line saying which path and why, exit 2, no traceback."""
    tmp_path = open_base
    if case == "missing":
        path = tmp_path / "nope" / "thpguard.prom"
    elif case == "is_file":
        (tmp_path / "plain").write_text("")
        path = tmp_path / "plain" / "thpguard.prom"
    else:
        d = tmp_path / "ro"
        d.mkdir()
        os.chmod(d, 0o555)
        path = d / "thpguard.prom"
    if case == "unwritable" and os.geteuid() == 0:
        # root writes anywhere: run the command as nobody, in a child (the
        # interpreter's own files may be unreadable to nobody: import first)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                _become_nobody()
                sys.stderr = io.StringIO()
                rc = cli.main(["status", "--prometheus-file", str(path), "self"])
                os.write(w, json.dumps([rc, sys.stderr.getvalue()]).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            code_, err = json.loads(f.read())
        os.waitpid(pid, 0)
    else:
        code_ = cli.main(["status", "--prometheus-file", str(path), str(os.getpid())])
        err = capsys.readouterr().err
    assert code_ == cli.EXIT_USAGE, err
    assert "Traceback" not in err
    assert str(path.parent) in err
    assert not path.exists()
