#!/usr/bin/env bash
# GKE with xpk: one workload (a JobSet) over one or more TPU slices of an xpk cluster; every pod
# runs the same train command and JAX finds the others itself.
#
#   launch/gke_xpk.sh --cluster CLUSTER --zone ZONE [--project PROJECT] --tpu_type v5p-256 \
#       --workload coca-base-1 --config experiments/coca_base.py \
#       --workdir gs://BUCKET/runs/coca_base [--slices N] [--docker_image IMAGE] \
#       [--gcsfuse BUCKET] [--dry_run] [-- --config.data.name=NAME --config.train.steps=1000 ...]
#
# Before the workload is created, the config is checked here (`coca_jax.train --dry_run` with the
# overrides: needs coca_jax installed on this machine; --skip_config_check skips it), and a
# config whose data.name is empty is refused. Try every launch with --dry_run first.
#
# Flags:
#   --cluster NAME          xpk cluster (made with `xpk cluster create`)
#   --zone ZONE             e.g. us-east5-a
#   --project PROJECT       Google Cloud project (default: gcloud's configured one)
#   --tpu_type T            slice type, e.g. v5p-256, v5litepod-256
#   --workload NAME         workload name (lowercase, digits, '-')
#   --config FILE[:ARGS]    experiment config, a path inside the repo (required)
#   --workdir gs://...      checkpoints, metrics, TensorBoard (a GCS bucket every pod can write)
#   --slices N              number of slices (default 1); N > 1 adds
#                           --config.mesh.dcn_<axis>=N so that axis spans the slices over DCN
#   --dcn_axis AXIS         mesh axis split across slices: data (default) or fsdp
#   --docker_image IMAGE    an image with this repo installed (workdir of the image = the repo);
#                           without it xpk builds one from --base_docker_image and this directory
#   --base_docker_image I   base for that build (default: python:3.11); `pip install 'jax[tpu]' -e .`
#                           runs in each pod before training (-e '.[gcs]' for a gs:// workdir)
#   --max_restarts N        restarts of the whole workload after a failure or preemption
#                           (default 3); each restart resumes from the latest checkpoint
#   --gcsfuse BUCKET        every pod mounts gs://BUCKET with gcsfuse (installed first if
#                           missing; the pod needs /dev/fuse, as xpk's privileged TPU pods have)
#                           at --gcsfuse_dir before training; then point the data at it:
#                           -- --config.data.data_dir=/tmp/gcsfuse/BUCKET/tfds
#   --gcsfuse_dir DIR       the mount point in the pods (default /tmp/gcsfuse/BUCKET)
#   --skip_config_check     do not check the config on this machine first
#   --dry_run               print the commands and run nothing (also when given after --)
#   -h, --help              this text
#   -- ARGS...              passed to `python -m coca_jax.train` (config overrides)
set -euo pipefail

script=gke_xpk.sh
source "$(dirname "$0")/common.sh"

cluster="" zone="" project="" tpu_type="" workload="" config="" workdir="" slices=1 dcn_axis=data
image="" base_image="python:3.11" max_restarts=3 dry_run=0 gcsfuse="" gcsfuse_dir=""
skip_config_check=0
parse_flags cluster zone project tpu_type workload config workdir slices dcn_axis \
  docker_image=image base_docker_image=base_image max_restarts gcsfuse gcsfuse_dir \
  skip_config_check! dry_run! -- "$@"
require cluster zone tpu_type workload config workdir
[[ "$slices" =~ ^[1-9][0-9]*$ ]] || die "--slices must be a positive integer, got '$slices'"
[[ "$dcn_axis" == data || "$dcn_axis" == fsdp ]] || die "--dcn_axis must be data or fsdp"
[[ "$workload" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--workload '$workload': use lowercase letters, digits and '-'"

[[ -z "$gcsfuse" ]] || gcsfuse_flags

((skip_config_check)) || check_config
((slices == 1)) || extra=("--config.mesh.dcn_${dcn_axis}=$slices" "${extra[@]}")
train="$(quote python3 -m coca_jax.train --config "$config" --workdir "$workdir" "${extra[@]}")"
[[ -z "$gcsfuse" ]] || train="$(gcsfuse_mount "$bucket" "$mount_dir") && $train"
xpk=(xpk workload create --cluster "$cluster" --zone "$zone")
[[ -z "$project" ]] || xpk+=(--project "$project")
xpk+=(--workload "$workload" --tpu-type "$tpu_type" --num-slices "$slices"
      --max-restarts "$max_restarts")
if [[ -n "$image" ]]; then
  xpk+=(--docker-image "$image" --command "$train")
else
  package="."
  [[ "$workdir" != gs://* ]] || package+="[gcs]"  # gcsfs: coca_jax's gs:// file layer.
  xpk+=(--base-docker-image "$base_image" --script-dir .
        --command "python3 -m pip install -q 'jax[tpu]' -e $(quote "$package") && $train")
fi
run "${xpk[@]}"
