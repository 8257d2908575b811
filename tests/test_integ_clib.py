"""The native core as a C library of its own: make, test, example, install."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import REQUIRE_THP, WAIT

NATIVE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "native")
SKIPPED = 77

pytestmark = pytest.mark.skipif(
    shutil.which("make") is None or shutil.which("cc") is None,
    reason="needs make and a C compiler",
)


def make(*args, build):
    # Only a bound on a hang: the sanitized build and run of the C tests took
    # over 120 s once with every core busy.
    return subprocess.run(
        ["make", "-s", "-C", NATIVE, f"BUILD={build}", *args],
        capture_output=True, text=True, timeout=10 * WAIT,
    )


def skip_or_fail(why):
    if REQUIRE_THP:
        pytest.fail(f"THP required (THPGUARD_REQUIRE_THP=1): {why}")
    pytest.skip(why)


def test_make_test_runs_the_c_tests(tmp_path):
    """`make -C native test` builds both libraries and its C tests pass."""
    done = make("test", build=tmp_path)
    if done.returncode != 0 and f"Error {SKIPPED}" in done.stderr:
        skip_or_fail(done.stdout.strip())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all C tests passed" in done.stdout
    for name in ("libthpguard.a", "libthpguard.so", "libthpguard.so.0", "thpguard.h"):
        assert (tmp_path / name).exists(), name


def test_example_repairs_the_child(tmp_path, require_thp):
    """The C example's child is split by its writes and whole after repair."""
    assert make("examples", build=tmp_path).returncode == 0
    out = subprocess.run([str(tmp_path / "fork_repair"), "8"], capture_output=True,
                         text=True, timeout=5 * WAIT)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines() if ":" in line)
    full = "8388608 of 8388608 bytes huge"
    assert full in lines["parent after populate"]
    assert full not in lines["child after writes"]
    assert full in lines["child after repair"]
    assert full in lines["parent at the end"]
    assert lines["child fork generation"].strip() == "1"


def test_install_then_link_against_shared_library(tmp_path):
    """`make install` puts header and libraries under DESTDIR/PREFIX; a program links."""
    build, dest = tmp_path / "build", tmp_path / "dest"
    done = make("install", "PREFIX=/usr/local", f"DESTDIR={dest}", build=build)
    assert done.returncode == 0, done.stderr
    prefix = dest / "usr" / "local"
    assert (prefix / "include" / "thpguard.h").exists()
    assert (prefix / "lib" / "libthpguard.a").exists()
    assert os.path.realpath(prefix / "lib" / "libthpguard.so").endswith("libthpguard.so.0")
    source = tmp_path / "prog.c"
    source.write_text(
        '#include <stdio.h>\n#include <thpguard.h>\n'
        "int main(void) {\n"
        "    void *p; int known = 0;\n"
        "    if (tg_map_aligned(1 << 21, 1 << 21, &p) != 0) return 1;\n"
        "    if (tg_advice_known(TG_MADV_HUGEPAGE, &known) != 0) return 1;\n"
        '    printf("%d %d\\n", ((unsigned long)p & ((1 << 21) - 1)) == 0, known);\n'
        "    return tg_unmap(p, 1 << 21);\n}\n"
    )
    lib = prefix / "lib"
    subprocess.run(
        ["cc", "-I", str(prefix / "include"), str(source), "-o", str(tmp_path / "prog"),
         f"-L{lib}", f"-Wl,-rpath,{lib}", "-lthpguard"],
        check=True, timeout=5 * WAIT,
    )
    out = subprocess.run([str(tmp_path / "prog")], capture_output=True, text=True, timeout=5 * WAIT)
    assert out.returncode == 0 and out.stdout.split() == ["1", "1"], out


def test_python_extension_compiles_the_same_source():
    """The cffi build and the Makefile compile the same native sources."""
    with open(os.path.join(NATIVE, "build_cffi.py")) as f:
        build = f.read()
    with open(os.path.join(NATIVE, "Makefile")) as f:
        makefile = f.read()
    for name in ("thpguard", "uffd"):
        assert f'"native/{name}.c"' in build
        assert f"$(BUILD)/{name}.o" in makefile
