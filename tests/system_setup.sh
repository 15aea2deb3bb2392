#!/usr/bin/env bash
# What the test suite needs from the machine beyond .venv: a C++ compiler (train/csrc and DeepSpeed's CPU op
# are built on first use) and a real SLURM (slurmctld, slurmd, slurm-client, munge) for tests/test_slurm.py.
# As root with apt-get it installs what is missing; otherwise it says in one line what will be skipped and how
# to enable it. `make test` runs it first, so `make test` and CI (.ci/run) set up the same way.
set -euo pipefail

missing=()
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v slurmctld >/dev/null 2>&1 || missing+=(slurmctld slurmd slurm-client munge)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    echo "bertfit tests: ${missing[*]} not installed and not root: the SLURM tests are skipped" \
         "(and CPU training runs its Python path without g++); to enable them run as root:" \
         "apt-get install ${missing[*]}" >&2
fi
