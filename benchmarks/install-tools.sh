#!/usr/bin/env bash
# Install what the service benchmark uses from Debian's packages: wrk, the
# HTTP load generator. Without it `python -m benchmarks --only service`
# falls back to its own, slower client (and says so in its output).
# Needs root (or sudo); runs `apt-get update` once, only if wrk is missing.
set -euo pipefail

if command -v wrk >/dev/null 2>&1; then
    echo "wrk already installed: $(command -v wrk)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends wrk
command -v wrk
