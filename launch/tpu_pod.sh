#!/usr/bin/env bash
# Every worker of a Cloud TPU VM pod slice runs the same command; JAX discovers the pod itself.
#   launch/tpu_pod.sh TPU_NAME ZONE experiments/coca_base.py gs://bucket/run [overrides...]
# The repo must be on each worker (e.g. `gcloud ... scp --worker=all`) with `pip install -e .`.
set -euo pipefail
tpu="$1"; zone="$2"; config="$3"; workdir="$4"; shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/coca_jax && python -m coca_jax.train --config $config --workdir $workdir $*"
