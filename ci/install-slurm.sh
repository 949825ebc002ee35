#!/usr/bin/env bash
# The one-node Slurm cluster that tests/test_slurm.py starts itself (tests/support/slurm_cluster.py): Debian's slurmctld,
# slurmd, slurm-client and munge. Installs only what is missing, quietly; needs root and apt (CI runs as root).
# The packages' own services are not used: the tests run their daemons from a temporary folder on free ports.
set -euo pipefail
missing=()
command -v slurmctld >/dev/null 2>&1 || missing+=(slurmctld)
command -v slurmd >/dev/null 2>&1 || missing+=(slurmd)
{ command -v sbatch && command -v srun && command -v scontrol && command -v sinfo; } >/dev/null 2>&1 \
    || missing+=(slurm-client)
{ command -v munged && command -v mungekey; } >/dev/null 2>&1 || missing+=(munge)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "warning: ${missing[*]} missing and cannot be installed here (needs root and apt);" \
         "tests/test_slurm.py will fail saying so" >&2
    exit 0
fi
echo "installing ${missing[*]} (apt-get)"
log=$(mktemp)
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    exit 1
fi
rm -f "$log"
