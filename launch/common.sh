# Shared by the launch scripts (sourced, not run): flag parsing, errors, --dry_run printing.
# A script sets `script` (its name, for messages) before sourcing this file, and keeps its help
# text in its leading comment block (what `usage` prints).

usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit "${1:-2}"; }
die() { echo "$script: $*" >&2; exit 2; }

# parse_flags SPEC... -- ARGS...
# Each SPEC names a flag: "name" (--name VALUE sets $name), "name=var" (sets $var instead) or a
# trailing "!" for a switch without a value ("dry_run!" sets dry_run=1). Everything after a
# literal `--` in ARGS goes to the array `extra` (config overrides for coca_jax.train);
# -h/--help prints the help; anything else is an error naming the argument.
# --dry_run anywhere means a dry run: after `--` too (where it stays in the train command), so a
# misplaced --dry_run can never launch for real.
parse_flags() {
  local specs=() spec name flag var switch found
  while [[ "$1" != "--" ]]; do specs+=("$1"); shift; done
  shift
  extra=()
  while (($#)); do
    case "$1" in
      -h|--help) usage 0 ;;
      --) shift; extra=("$@"); dry_run_in_extra; return 0 ;;
    esac
    found=0
    for spec in "${specs[@]}"; do
      name="${spec%!}"; switch=0; [[ "$spec" == *! ]] && switch=1
      flag="${name%%=*}"; var="${name#*=}"
      [[ "$1" == "--$flag" ]] || continue
      if ((switch)); then
        printf -v "$var" 1; shift
      else
        (($# >= 2)) || die "--$flag needs a value (see --help)"
        printf -v "$var" '%s' "$2"; shift 2
      fi
      found=1; break
    done
    ((found)) || die "unknown argument '$1' (config overrides go after --; see --help)"
  done
}

dry_run_in_extra() {
  local a
  for a in "${extra[@]}"; do
    case "$a" in
      --dry_run|-dry_run|--dry_run=[Tt]rue|--dry_run=1)
        dry_run=1
        echo "$script: --dry_run after -- : a dry run (the commands are printed, none is run)" >&2 ;;
    esac
  done
}

# require NAME...: dies naming every --NAME whose variable is empty.
require() {
  local missing=() name
  for name in "$@"; do [[ -n "${!name}" ]] || missing+=("--$name"); done
  ((${#missing[@]} == 0)) || die "missing ${missing[*]} (see --help)"
}

quote() {  # The arguments as one shell-quoted line (plain words stay as they are).
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

run() {  # Prints the command (with dry_run=1) or runs it.
  if ((dry_run)); then quote "$@"; else "$@"; fi
}

# check_config: before anything is created or started, validates the experiment config with its
# overrides on this machine (`coca_jax.train --dry_run`: every key and value, the abstract build)
# and refuses an empty config.data.name (a pod that boots without its dataset only fails later).
# Uses $PYTHON (default python3) with coca_jax installed here; a dry run prints the command.
check_config() {
  local py="${PYTHON:-python3}" out name
  # On this machine's CPU: the check needs no accelerator and must not take one a job is using.
  local cmd=(env JAX_PLATFORMS=cpu "$py" -m coca_jax.train --config "$config" --dry_run "${extra[@]}")
  if ((dry_run)); then quote "${cmd[@]}"; return 0; fi
  out="$("${cmd[@]}")" || die "the config check failed (its error is above): nothing was \
created or started (a mesh sized for the pod's chips fails here: --skip_config_check)"
  name="$(printf '%s' "$out" | "$py" -c 'import json, sys; s = sys.stdin.read(); print(json.loads(s[s.index("{"):])["data_name"])')" \
    || die "could not read the config check's summary: nothing was created or started"
  [[ -n "$name" ]] || die "config.data.name is empty in --config $config: name the dataset \
to train on, e.g. -- --config.data.name=NAME --config.data.data_dir=DIR (a dataset built with \
python -m coca_jax.data.build, reachable from every worker: see --gcsfuse); nothing was created or started"
}

# gcsfuse_mount BUCKET DIR: the shell line that mounts gs://BUCKET at DIR on a worker (as the
# Cloud TPU docs and MaxText do: `gcsfuse --implicit-dirs`), installing gcsfuse from Google's
# apt repository first where it is missing. Mounting twice is a no-op.
gcsfuse_mount() {
  local bucket dir s
  bucket="$(quote "$1")"; dir="$(quote "$2")"
  s='s=$(command -v sudo || true)'
  echo "if ! command -v gcsfuse >/dev/null; then $s; \$s apt-get update -qq && \$s apt-get install -y -qq curl lsb-release ca-certificates >/dev/null && echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | \$s tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | \$s tee /usr/share/keyrings/cloud.google.asc >/dev/null && \$s apt-get update -qq && \$s apt-get install -y -qq gcsfuse; fi && mkdir -p $dir && { mountpoint -q $dir || gcsfuse --implicit-dirs $bucket $dir; }"
}

# gcsfuse_flags: checks --gcsfuse BUCKET / --gcsfuse_dir DIR and sets `bucket` and `mount_dir`.
gcsfuse_flags() {
  bucket="${gcsfuse#gs://}"; bucket="${bucket%/}"
  [[ "$bucket" =~ ^[a-z0-9][-a-z0-9_.]*[a-z0-9]$ ]] || die "--gcsfuse '$gcsfuse': give a bucket \
name (gs://BUCKET or BUCKET, no path); point --config.data.data_dir under the mount instead"
  mount_dir="${gcsfuse_dir:-/tmp/gcsfuse/$bucket}"
  [[ "$mount_dir" == /* ]] || die "--gcsfuse_dir '$mount_dir' must be an absolute path (the same on every worker)"
}
