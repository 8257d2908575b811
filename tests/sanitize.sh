#!/usr/bin/env bash
# Build the native core with AddressSanitizer and UndefinedBehaviorSanitizer
# and run the test suite against it. Exit 0 only when the suite passes and
# neither sanitizer reported anything (in the test process or any child).
#
#   tests/sanitize.sh [pytest arguments...]     (default: the whole suite)
#
# Needs gcc with libasan/libubsan and an environment where
# `pip install -e '.[test]'` has been done (the test dependencies are
# reused; the instrumented extension is built in a scratch copy of the
# tree, so the development build is left alone). CPython itself is not
# instrumented: libasan is preloaded and leak detection is off, since
# the interpreter's own allocations would be reported as leaks.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
scratch=$(mktemp -d "${TMPDIR:-/tmp}/thpguard-sanitize.XXXXXX")
logs="$scratch/logs"
mkdir -p "$logs"
trap 'rm -rf "$scratch"' EXIT
# Ended by a signal (tests/under-load.sh stops it so), still clean up.
trap 'exit 130' INT
trap 'exit 143' TERM

# A copy of the tracked sources (and this tree's local changes).
git ls-files -z --cached --others --exclude-standard \
    | xargs -0 cp --parents -t "$scratch"

# setup.py runs here without build isolation: it needs pyproject.toml's build
# requirement (setuptools 77 reads the SPDX licence) in this environment.
"$python" -m pip install -q 'setuptools>=77'

flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1"
(
    cd "$scratch"
    CFLAGS="$flags" LDFLAGS="-fsanitize=address,undefined" THPGUARD_WERROR=1 \
        "$python" setup.py -q build_ext --inplace >"$logs/build.txt" 2>&1 \
        || { cat "$logs/build.txt"; exit 1; }
)

libasan=$(gcc -print-file-name=libasan.so)
libubsan=$(gcc -print-file-name=libubsan.so)
export LD_PRELOAD="$libasan:$libubsan"
export ASAN_OPTIONS="detect_leaks=0:log_path=$logs/asan:handle_segv=1:allow_user_segv_handler=1"
export UBSAN_OPTIONS="print_stacktrace=1:log_path=$logs/ubsan"
export THPGUARD_SANITIZED=1  # tests whose premise the sanitizer runtime breaks skip, saying why
export PYTHONPATH="$scratch${PYTHONPATH:+:$PYTHONPATH}"

where=$(cd "$scratch" && "$python" -c 'import thpguard._cffi as m; print(m.__file__)')
case "$where" in
    "$scratch"/*) ;;
    *) echo "sanitize: imported $where, not the instrumented build" >&2; exit 1 ;;
esac
# grep reads all of nm's output: with -q it could stop early and nm's SIGPIPE
# would fail the pipeline (pipefail) on an instrumented build.
if ! nm -D "$where" | grep __asan_ >/dev/null; then
    echo "sanitize: $where is not instrumented" >&2
    exit 1
fi

started=$(date +%s)
status=0
(cd "$scratch" && "$python" -m pytest -q -p no:cacheprovider "${@:-tests}") || status=$?
echo "sanitize: suite exit status $status in $(( $(date +%s) - started )) s"

reports=$(find "$logs" -name 'asan.*' -o -name 'ubsan.*' | wc -l)
if [ "$reports" -ne 0 ]; then
    echo "sanitize: $reports sanitizer report(s):" >&2
    find "$logs" \( -name 'asan.*' -o -name 'ubsan.*' \) -exec cat {} + >&2
    exit 1
fi
echo "sanitize: no AddressSanitizer or UndefinedBehaviorSanitizer report"
exit "$status"
