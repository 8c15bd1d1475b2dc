#!/usr/bin/env bash
# Single process on this machine (CPU, or every local GPU/TPU chip).
#   launch/local.sh experiments/demo.py /tmp/coca_demo [--config.train.steps=100 ...]
set -euo pipefail
config="$1"; workdir="$2"; shift 2
exec python -m coca_jax.train --config "$config" --workdir "$workdir" "$@"
