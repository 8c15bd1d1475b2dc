#!/usr/bin/env bash
# N processes on localhost joined by jax.distributed (CPU collectives): a real multi-host run on
# one machine, for testing what crosses process boundaries.
#   launch/local_multiprocess.sh 2 experiments/demo.py:smoke /tmp/coca_mp [overrides...]
set -euo pipefail
num="$1"; config="$2"; workdir="$3"; shift 3
port="${COCA_PORT:-$(python -c 'import portpicker; print(portpicker.pick_unused_port())')}"
pids=()
for ((i = 0; i < num; i++)); do
  python -m coca_jax.train --config "$config" --workdir "$workdir" \
    --coordinator_address "127.0.0.1:$port" --num_processes "$num" --process_id "$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
