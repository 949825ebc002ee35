#!/usr/bin/env bash
# System packages the test suite drives for real: Chromium (MLflow UI test) and, through install-slurm.sh, a
# one-node Slurm cluster. Installs only what is missing; needs root and apt (CI runs as root on Debian).
set -euo pipefail
cd "$(dirname "$0")"
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "warning: ${missing[*]} missing and cannot be installed here (needs root and apt); the tests" \
             "that use them will fail with a message saying so" >&2
    else
        echo "installing ${missing[*]} (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi
if [ -f install-slurm.sh ]; then
    bash install-slurm.sh
fi
