#!/usr/bin/env bash
# GKE with xpk: one workload (a JobSet) over one or more TPU slices of an xpk cluster; every pod
# runs the same train command and JAX finds the others itself.
#
#   launch/gke_xpk.sh --cluster CLUSTER --zone ZONE [--project PROJECT] --tpu_type v5p-256 \
#       --workload coca-base-1 --config experiments/coca_base.py \
#       --workdir gs://BUCKET/runs/coca_base [--slices N] [--docker_image IMAGE] [--dry_run] \
#       [-- --config.train.steps=1000 ...]
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
#                           runs in each pod before training
#   --max_restarts N        restarts of the whole workload after a failure or preemption
#                           (default 3); each restart resumes from the latest checkpoint
#   --dry_run               print the xpk command and run nothing
#   -- ARGS...              passed to `python -m coca_jax.train` (config overrides)
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit "${1:-2}"; }
die() { echo "gke_xpk.sh: $*" >&2; exit 2; }

cluster="" zone="" project="" tpu_type="" workload="" config="" workdir="" slices=1 dcn_axis=data
image="" base_image="python:3.11" max_restarts=3 dry_run=0 extra=()
while (($#)); do
  case "$1" in
    --cluster) cluster="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --tpu_type) tpu_type="$2"; shift 2 ;;
    --workload) workload="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --slices) slices="$2"; shift 2 ;;
    --dcn_axis) dcn_axis="$2"; shift 2 ;;
    --docker_image) image="$2"; shift 2 ;;
    --base_docker_image) base_image="$2"; shift 2 ;;
    --max_restarts) max_restarts="$2"; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument '$1' (config overrides go after --; see --help)" ;;
  esac
done
missing=()
for name in cluster zone tpu_type workload config workdir; do
  [[ -n "${!name}" ]] || missing+=("--$name")
done
((${#missing[@]} == 0)) || die "missing ${missing[*]} (see --help)"
[[ "$slices" =~ ^[1-9][0-9]*$ ]] || die "--slices must be a positive integer, got '$slices'"
[[ "$dcn_axis" == data || "$dcn_axis" == fsdp ]] || die "--dcn_axis must be data or fsdp"
[[ "$workload" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--workload '$workload': use lowercase letters, digits and '-'"

quote() {  # The arguments as one shell-quoted line (plain words stay as they are).
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
run() {  # Prints the command (--dry_run) or runs it.
  if ((dry_run)); then quote "$@"; else "$@"; fi
}

((slices == 1)) || extra=("--config.mesh.dcn_${dcn_axis}=$slices" "${extra[@]}")
train="$(quote python3 -m coca_jax.train --config "$config" --workdir "$workdir" "${extra[@]}")"
xpk=(xpk workload create --cluster "$cluster" --zone "$zone")
[[ -z "$project" ]] || xpk+=(--project "$project")
xpk+=(--workload "$workload" --tpu-type "$tpu_type" --num-slices "$slices"
      --max-restarts "$max_restarts")
if [[ -n "$image" ]]; then
  xpk+=(--docker-image "$image" --command "$train")
else
  xpk+=(--base-docker-image "$base_image" --script-dir .
        --command "python3 -m pip install -q 'jax[tpu]' -e . && $train")
fi
run "${xpk[@]}"
