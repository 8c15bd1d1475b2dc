#!/usr/bin/env bash
# Cloud TPU VMs: every worker of a slice (or of several slices) runs the same train command;
# JAX finds the other workers itself.
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--project PROJECT] \
#       --config experiments/coca_base.py --workdir gs://BUCKET/runs/coca_base \
#       [--accelerator_type v5p-64 --create] [--slices N] [--setup] [--check_fit v5p:4x4x2] \
#       [--gcsfuse BUCKET] [--dry_run] [-- --config.data.name=NAME --config.train.steps=1000 ...]
#
# Before anything is created or started, the config is checked here (`coca_jax.train --dry_run`
# with the overrides: needs coca_jax installed on this machine; --skip_config_check skips it),
# and a config whose data.name is empty is refused. Try every launch with --dry_run first.
#
# Flags:
#   --tpu NAME              TPU VM name (with --slices > 1: the queued resource's name)
#   --zone ZONE             e.g. us-east5-a
#   --project PROJECT       Google Cloud project (default: gcloud's configured one)
#   --config FILE[:ARGS]    experiment config, a path inside the repo (required)
#   --workdir DIR           checkpoints, metrics, TensorBoard; every worker must reach it (a GCS
#                           bucket, gs://... or mounted with gcsfuse)
#   --accelerator_type T    e.g. v5p-64, v5litepod-256 (needed with --create)
#   --runtime_version V     TPU software version for --create (default: tpu-ubuntu2204-base)
#   --create                create the TPU VM (or, with --slices > 1, a queued resource of N
#                           slices) first
#   --slices N              number of slices (default 1). N > 1 runs on every worker of every
#                           slice (queued-resources ssh --node=all) and adds
#                           --config.mesh.dcn_<axis>=N so that axis spans the slices over DCN
#   --dcn_axis AXIS         mesh axis split across slices: data (default) or fsdp
#   --setup                 copy this repo (git HEAD) to every worker and pip install it first
#                           (with the gcs extra for a gs:// workdir)
#   --repo_dir DIR          where the repo lives on the workers (default: coca_jax, in $HOME)
#   --python PY             interpreter on the workers (default: python3)
#   --check_fit TOPOLOGY    first, on this machine, compile the train step for the slice with
#                           the TPU compiler (`coca_jax.bench --mode compile --target TOPOLOGY`,
#                           e.g. v5e:4x4 = v5litepod-16, v5p:4x4x2 = v5p-64; needs jax[tpu]
#                           here, no TPU) and stop unless it fits the chips' memory. One slice.
#   --gcsfuse BUCKET        mount gs://BUCKET on every worker with gcsfuse (installed there
#                           first if missing) before training, at --gcsfuse_dir; then point
#                           the data at it: -- --config.data.data_dir=/tmp/gcsfuse/BUCKET/tfds
#                           (config.data.data_dir must be a local or mounted path)
#   --gcsfuse_dir DIR       the mount point on the workers (default /tmp/gcsfuse/BUCKET)
#   --skip_config_check     do not check the config on this machine first
#   --dry_run               print the commands, one per line, and run none (also when given
#                           after --)
#   -h, --help              this text
#   -- ARGS...              passed to `python -m coca_jax.train` (config overrides)
#
# Preemption: a maintenance event or spot reclaim sends SIGTERM to the workers; JAX's preemption
# sync makes every worker stop after the same step and write one checkpoint. Run the same command
# again to resume.
set -euo pipefail

script=tpu_pod.sh
source "$(dirname "$0")/common.sh"

tpu="" zone="" project="" config="" workdir="" accel="" runtime="tpu-ubuntu2204-base"
create=0 slices=1 dcn_axis=data setup=0 repo_dir=coca_jax python=python3 dry_run=0 check_fit=""
gcsfuse="" gcsfuse_dir="" skip_config_check=0
parse_flags tpu zone project config workdir accelerator_type=accel runtime_version=runtime \
  create! slices dcn_axis setup! repo_dir python check_fit gcsfuse gcsfuse_dir skip_config_check! \
  dry_run! -- "$@"
require tpu zone config workdir
((create == 0)) || [[ -n "$accel" ]] || die "--create needs --accelerator_type (e.g. v5p-64)"
[[ "$slices" =~ ^[1-9][0-9]*$ ]] || die "--slices must be a positive integer, got '$slices'"
[[ "$dcn_axis" == data || "$dcn_axis" == fsdp ]] || die "--dcn_axis must be data or fsdp"
[[ -z "$check_fit" ]] || ((slices == 1)) || die "--check_fit compiles one slice; with \
--slices $slices, check one slice's share (--config.train.batch_size / $slices) without --slices"

[[ -z "$gcsfuse" ]] || gcsfuse_flags

((skip_config_check)) || check_config
if [[ -n "$check_fit" ]]; then  # Before anything is created or started: a non-zero exit stops here.
  run "${PYTHON:-python3}" -m coca_jax.bench --config "$config" --mode compile \
    --target "$check_fit" "${extra[@]}"
fi


where=(--zone "$zone")
[[ -z "$project" ]] || where+=(--project "$project")
if ((slices > 1)); then
  ssh=(gcloud compute tpus queued-resources ssh "$tpu" "${where[@]}" --worker=all --node=all)
  scp=(gcloud compute tpus queued-resources scp "${where[@]}" --worker=all --node=all)
  extra=("--config.mesh.dcn_${dcn_axis}=$slices" "${extra[@]}")
else
  ssh=(gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" --worker=all)
  scp=(gcloud compute tpus tpu-vm scp "${where[@]}" --worker=all)
fi

if ((create)); then
  if ((slices > 1)); then
    run gcloud compute tpus queued-resources create "$tpu" "${where[@]}" --node-count "$slices" \
      --node-prefix "$tpu" --accelerator-type "$accel" --runtime-version "$runtime"
  else
    run gcloud compute tpus tpu-vm create "$tpu" "${where[@]}" --accelerator-type "$accel" \
      --version "$runtime"
  fi
fi

if ((setup)); then
  archive="/tmp/coca_jax-$(git rev-parse --short HEAD 2>/dev/null || echo src).tar.gz"
  run git archive --format=tar.gz -o "$archive" HEAD
  run "${scp[@]}" "$archive" "$tpu:coca_jax.tar.gz"
  dir="$(quote "$repo_dir")"
  package="$repo_dir"
  [[ "$workdir" != gs://* ]] || package+="[gcs]"  # gcsfs: coca_jax's gs:// file layer.
  run "${ssh[@]}" --command "mkdir -p $dir && tar -xzf coca_jax.tar.gz -C $dir && $(quote "$python" -m pip install -q "jax[tpu]" -e "$package")"
fi

if [[ -n "$gcsfuse" ]]; then
  run "${ssh[@]}" --command "$(gcsfuse_mount "$bucket" "$mount_dir")"
fi

train=("$python" -m coca_jax.train --config "$config" --workdir "$workdir" "${extra[@]}")
run "${ssh[@]}" --command "cd $(quote "$repo_dir") && $(quote "${train[@]}")"
