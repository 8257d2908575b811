#!/bin/sh
# Runs inside a kernel-matrix guest, chrooted into the host's / (read-only
# over 9p; /tmp, /run and /dev/shm are tmpfs). Started by the initramfs of
# tests/kernels/run with THPG_* in the environment. Reports on the console
# as "THPG:<key>:<value>" lines, which the host parses.

cd "$THPG_REPO" || { echo "THPG:error:cannot enter $THPG_REPO"; exit 3; }
export TMPDIR=/tmp HOME=/tmp PYTHONDONTWRITEBYTECODE=1 THPGUARD_REQUIRE_THP=1
# qemu without KVM emulates the CPU (TCG): 10-50x slower than the host, on a
# host that is busy too. The tests wait on conditions; this stretches only
# their deadlines (tests/conftest.py, TIME_SCALE), which bound hangs.
export THPGUARD_TEST_TIME_SCALE="${THPG_TIME_SCALE:-10}"
echo "THPG:time_scale:$THPGUARD_TEST_TIME_SCALE"
case "$THPG_KERNEL" in *thp_cow) export THPGUARD_REQUIRE_DIRECT_COW=1 ;; esac
PY=$THPG_PYTHON
THP=/sys/kernel/mm/transparent_hugepage

echo "THPG:release:$(uname -r)"
echo "THPG:probe:$("$THPG_PROBE")"

caps() {
    "$PY" -c 'import json, thpguard, thpguard.kernel; caps = getattr(thpguard, "capabilities", thpguard.kernel.capabilities); print(json.dumps(caps().as_dict(), sort_keys=True, default=str))' 2>/tmp/caps.err
}
# verify --json carries capabilities(); ask capabilities() itself only
# where the CLI is missing (one Python start less: they are slow over 9p).
case ",$THPG_PLANT," in *,verdict,*)
    # --plant verdict: verify sees THP off, so its verdict is not the expected one.
    thp_saved=$(sed 's/.*\[\(.*\)\].*/\1/' "$THP/enabled")
    echo never > "$THP/enabled" ;;
esac
if [ -f thpguard/cli.py ]; then
    "$PY" -c 'import sys; from thpguard.cli import main; sys.exit(main(sys.argv[1:]))' \
        verify --json > /tmp/verify.json 2>/tmp/verify.err
    echo "THPG:verify_rc:$?"
    echo "THPG:verify:$(tr -d '\n' < /tmp/verify.json)"
    tail -n 3 /tmp/verify.err
    [ -n "$thp_saved" ] && echo "$thp_saved" > "$THP/enabled"
else
    echo "THPG:verify_rc:absent"
    if out=$(caps); then
        echo "THPG:caps:$out"
    else
        echo "THPG:caps_error:$(tail -n 1 /tmp/caps.err)"
    fi
fi

if [ -f "$THP/thp_cow" ]; then
    saved=$(sed 's/.*\[\(.*\)\].*/\1/' "$THP/thp_cow")
    echo never > "$THP/thp_cow"
    if out=$(caps); then echo "THPG:caps_never:$out"; fi
    echo "$saved" > "$THP/thp_cow"
fi

rc=0
case ",$THPG_PLANT," in *,empty,*)
    # --plant empty: select no test at all (pytest exits 5).
    THPG_PYTEST_ARGS="$THPG_PYTEST_ARGS -k thpg_planted_no_such_test" ;;
esac
if [ "$THPG_PYTEST" = 1 ]; then
    start=$(cut -d' ' -f1 /proc/uptime)
    # -v and streamed: a test that hangs shows by name before the guest's
    # timeout; faulthandler dumps its stack after 300 s.
    { "$PY" -m pytest -m "kernel and not stress" -v -p no:cacheprovider -rfE -o faulthandler_timeout=300 $THPG_PYTEST_ARGS tests 2>&1
      echo $? > /tmp/pytest.rc; } | tee /tmp/pytest.out
    rc=$(cat /tmp/pytest.rc)
    echo "THPG:pytest_rc:$rc"
    echo "THPG:pytest_seconds:$(awk -v s="$start" '{print $1 - s}' /proc/uptime)"
    # 5 (no tests collected) is a failure too: the host checks the count.
fi
# --copy-compare (patched kernel): the lazy copy mechanisms side by side.
if [ "$THPG_COPYCMP" = 1 ] && [ -f "$THP/thp_cow" ]; then
    echo "THPG:copycmp:$("$PY" tests/kernels/copycmp.py 2>/tmp/copycmp.err || tail -n 1 /tmp/copycmp.err)"
fi
# The patch's kselftest (patched kernel only); last, since it mounts cgroup2.
if [ -n "$THPG_KSELFTEST" ]; then
    start=$(cut -d' ' -f1 /proc/uptime)
    "$THPG_KSELFTEST" 2>&1
    krc=$?
    echo "THPG:kselftest_rc:$krc"
    echo "THPG:kselftest_seconds:$(awk -v s="$start" '{print $1 - s}' /proc/uptime)"
    [ $rc = 0 ] && rc=$krc
fi
exit $rc
