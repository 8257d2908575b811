#!/usr/bin/env bash
# Run the test suite while every core is kept busy by other processes, as
# on a shared CI machine. Exit with the suite's status.
#
#   tests/under-load.sh [pytest arguments...]     (default: the whole suite)
#   tests/under-load.sh --sanitize [pytest arguments...]
#                       (the suite against the ASan/UBSan build: tests/sanitize.sh)
#
# The script starts THPGUARD_LOAD_PER_CORE (default 1) busy-looping
# processes per online core, at the suite's own priority, and stops them
# however it ends (suite done, failure, Ctrl-C, SIGTERM). A test that only
# passes on an idle machine races the clock: it fails here.
#
# Needs an environment where `pip install -e '.[test]'` has been done
# (PYTHON picks the interpreter, default python3).
set -uo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0"  # the comment above
    exit 0
fi
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
suite_command=("$python" -m pytest)
if [[ ${1:-} == --sanitize ]]; then
    shift
    suite_command=(bash tests/sanitize.sh)
fi
per_core=${THPGUARD_LOAD_PER_CORE:-1}
cores=$(nproc)
burners=()
suite=

stop() {
    if ((${#burners[@]})); then
        kill "${burners[@]}" 2>/dev/null
        wait "${burners[@]}" 2>/dev/null
    fi
    # The suite too (its whole process group: sanitize.sh runs pytest as a
    # child), when a signal ends the script before the suite ended: SIGINT
    # first, so pytest ends as on Ctrl-C and its fixtures' teardowns give
    # back what the tests took (pool pages, cgroups, servers); SIGKILL for
    # whatever is left a minute later.
    if [[ -n $suite ]]; then
        kill -INT -- -"$suite" 2>/dev/null
        for _ in $(seq 600); do
            [[ $(ps -o stat= -p "$suite" 2>/dev/null) == [^Z]* ]] || break
            sleep 0.1
        done
        kill -KILL -- -"$suite" 2>/dev/null
        wait "$suite" 2>/dev/null
    fi
}
trap stop EXIT
# A signal ends the script (the EXIT trap then stops everything it
# started) with the usual status for it.
trap 'exit 130' INT
trap 'exit 143' TERM

for _ in $(seq $((cores * per_core))); do
    # A simple command in the background: $! is the looping process itself
    # (setpriv execs it). Killed with this script even when it is killed
    # with SIGKILL and no trap runs (the parent-death signal).
    setpriv --pdeathsig KILL bash -c 'while :; do :; done' &
    burners+=($!)
done
echo "under-load: $((cores * per_core)) busy processes on $cores cores (pids ${burners[*]}); load $(cut -d' ' -f1-3 /proc/loadavg)"

# In the background, so that a signal reaches the traps while it runs; in
# a session (and process group) of its own, so that stop() reaches all of it.
# SIGINT when this script dies without running its traps (SIGKILL): pytest
# then ends as on Ctrl-C, its fixtures' teardowns included.
setsid setpriv --pdeathsig INT "${suite_command[@]}" "$@" &
suite=$!
wait "$suite"
status=$?
suite=
echo "under-load: suite exited $status; load $(cut -d' ' -f1-3 /proc/loadavg)"
exit $status
