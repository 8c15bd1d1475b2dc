#!/usr/bin/env bash
# Single process on this machine (CPU, or every local GPU/TPU chip).
#
#   launch/local.sh CONFIG WORKDIR [TRAIN FLAGS...]
#   launch/local.sh experiments/demo.py /tmp/coca_demo [--config.train.steps=100 ...] [--dry_run]
#
# CONFIG is an experiment config FILE[:ARGS], WORKDIR the run's directory; every further argument
# goes to `python -m coca_jax.train` as it is. With --dry_run (anywhere) training does not start:
# coca_jax.train validates the config, builds the model abstractly and prints its summary.
# $PYTHON picks the interpreter (default: python).
#   -h, --help   this text
set -euo pipefail

script=local.sh
source "$(dirname "$0")/common.sh"

for arg in "$@"; do
  [[ "$arg" == "--" ]] && break
  [[ "$arg" == -h || "$arg" == --help ]] && usage 0
done
(($# >= 2)) || die "needs CONFIG and WORKDIR, e.g. launch/local.sh experiments/demo.py /tmp/coca_demo (see --help)"
[[ "$1" != -* && "$2" != -* ]] || die "CONFIG and WORKDIR come first, then the train flags (see --help)"
config="$1"; workdir="$2"; shift 2
args=()
for arg in "$@"; do [[ "$arg" == "--" ]] || args+=("$arg"); done  # `--` is optional here.
exec "${PYTHON:-python}" -m coca_jax.train --config "$config" --workdir "$workdir" "${args[@]}"
