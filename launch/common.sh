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
parse_flags() {
  local specs=() spec name flag var switch found
  while [[ "$1" != "--" ]]; do specs+=("$1"); shift; done
  shift
  extra=()
  while (($#)); do
    case "$1" in
      -h|--help) usage 0 ;;
      --) shift; extra=("$@"); return 0 ;;
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
