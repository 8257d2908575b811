#!/usr/bin/env bash
# Install the unmodified applications the integration tests run: Redis
# from the distribution (redis-server for the node agent test and
# redis-benchmark from redis-tools for its benchmark). Debian/Ubuntu only;
# elsewhere, or without root, it says so and the tests that need Redis skip
# with that reason. Idempotent: nothing is fetched when Redis is there.
set -euo pipefail

if command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null; then
    echo "install-services: redis-server and redis-benchmark present ($(redis-server --version | cut -d' ' -f3))"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install-services: no apt-get here; install redis-server and redis-tools by hand" >&2
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install-services: not root; install redis-server and redis-tools by hand" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# Other installs may hold the dpkg lock for a while: wait for it.
apt-get -o DPkg::Lock::Timeout=600 update -q
# --no-install-recommends: no service is started here, only the binaries are
# needed (the tests start their own redis on a loopback port).
apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends redis-server redis-tools
# The package enables and starts a system redis on port 6379 where systemd
# runs; the tests never use it, so stop it if it was started.
if command -v systemctl >/dev/null && systemctl is-active --quiet redis-server 2>/dev/null; then
    systemctl stop redis-server || true
fi
redis-server --version
