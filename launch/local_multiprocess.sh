#!/usr/bin/env bash
# N training processes on this machine joined by jax.distributed (CPU collectives): a real
# multi-host run on one machine, for testing what crosses process boundaries (sharded state,
# per-host data, checkpoints, preemption).
#
#   launch/local_multiprocess.sh --config experiments/demo.py:smoke --workdir /tmp/coca_mp \
#       [--num_processes 2] [--port PORT] [--dry_run] [-- --config.train.steps=100 ...]
#
# Flags:
#   --config FILE[:ARGS]   experiment config (required)
#   --workdir DIR          shared workdir of all processes (required)
#   --num_processes N      processes to start (default 2); each gets one CPU device
#   --port PORT            coordinator port on 127.0.0.1 (default: a free one)
#   --python PY            interpreter (default: python)
#   --dry_run              print the commands, one per line, and start nothing (also
#                          when given after --)
#   -h, --help             this text
#   -- ARGS...             passed to every `python -m coca_jax.train` (config overrides)
#
# Each process's output lines are prefixed with "[process I]", and its pid is printed first.
# SIGTERM or SIGINT to this script is forwarded to every process; SIGTERM to ONE process
# (kill -TERM PID) acts as a preemption notice: all processes stop after the same step and write
# one checkpoint, and the same command resumes.
set -euo pipefail

script=local_multiprocess.sh
source "$(dirname "$0")/common.sh"

config="" workdir="" num=2 port="" python="python" dry_run=0
parse_flags config workdir num_processes=num port python dry_run! -- "$@"
require config workdir
if [[ -z "$port" ]]; then
  if ((dry_run)); then port=PORT
  else port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"; fi
fi

command_for() {  # the command of process $1, into the array `cmd`
  cmd=(env JAX_PLATFORMS=cpu "$python" -m coca_jax.train --config "$config" --workdir "$workdir"
       --coordinator_address "127.0.0.1:$port" --num_processes "$num" --process_id "$1"
       "${extra[@]}")
}
if ((dry_run)); then
  for ((i = 0; i < num; i++)); do command_for "$i"; printf '%q ' "${cmd[@]}"; echo; done
  exit 0
fi

pids=()
forward() { kill -"$1" "${pids[@]}" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT
for ((i = 0; i < num; i++)); do
  command_for "$i"
  "${cmd[@]}" > >(sed -u "s/^/[process $i] /") 2>&1 &
  pids+=($!)
  echo "[process $i] pid ${pids[$i]}" >&2
done
status=0
for pid in "${pids[@]}"; do
  while true; do
    rc=0; wait "$pid" || rc=$?
    # A trapped signal makes `wait` return early: wait again while the process lives.
    kill -0 "$pid" 2>/dev/null || break
  done
  ((rc == 0)) || status=$rc
done
exit $status
