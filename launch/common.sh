# shellcheck shell=bash disable=SC2034,SC2154
# (SC2034/SC2154: this file and the scripts that source it share variables: PARAMS, CONFIG, ...)
# Shared pieces of the launch scripts (tpu_pod.sh, gpu_single.sh, slurm_multinode.sh).
# Sourced, never executed. Provides:
#   parse_args       --dry-run / --help / subcommand / pass-through flags for mixmae-pretrain
#   run, run_sh      print a command ("+ cmd", copy-pasteable) and run it, or only print it
#   note, die        messages on stderr, so a dry run's stdout is the command list and nothing else
#   usage            the calling script's header comment plus its parameters' current values
#   pretrain_flags   the mixmae-pretrain flags every launcher passes
#   setup_cuda_venv  the CUDA venv install shared by the single-GPU and SLURM launchers

# `${x@Q}` and empty "${arr[@]}" under `set -u` need bash >= 4.4 (macOS ships 3.2: use brew's bash).
if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "error: these launch scripts need bash >= 4.4 (this is $BASH_VERSION)" >&2
  exit 1
fi

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY_RUN=0
CMD_PREFIX="+ "  # the same prefix as `set -x`, for dry runs and for the echo before a real run
SUBCOMMAND=""
PASSTHRU=()      # flags after the subcommand, handed to mixmae-pretrain (e.g. --config.batch_size=512)

# Requirements lines that training machines must not install: the CPU jax build is replaced by the
# accelerator build, and torch is only for conversion/parity tests (on a GPU box pip would pull the
# multi-GB CUDA torch, whose exact nvidia-* pins can fight jax's CUDA plugin).
ACCEL_REQ_EXCLUDE='^(jax\[cpu\]|torch)=='

note() { printf '# %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Quote one argument only when the shell needs it, so printed commands stay readable and
# still paste back into a shell unchanged.
_quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else printf '%s' "${1@Q}"; fi
}

format_cmd() {
  local out="" a
  for a in "$@"; do out+="$(_quote "$a") "; done
  printf '%s' "${out% }"
}

# run CMD ARGS...: in a dry run print "+ CMD ARGS" on stdout; otherwise echo it on stderr (a log of
# what ran) and execute it in this shell.
run() {
  local line="$CMD_PREFIX$(format_cmd "$@")"
  if ((DRY_RUN)); then printf '%s\n' "$line"; return 0; fi
  printf '%s\n' "$line" >&2
  "$@"
}

# run_sh 'shell line': the same for a line that needs a shell (pipes, redirections).
run_sh() {
  if ((DRY_RUN)); then printf '%s%s\n' "$CMD_PREFIX" "$1"; return 0; fi
  printf '%s%s\n' "$CMD_PREFIX" "$1" >&2
  bash -c "$1"
}

# Arguments quoted for a shell on another machine (ssh --command, srun bash -c).
quote_args() {
  local out="" a
  for a in "$@"; do out+="$(printf '%q' "$a") "; done
  printf '%s' "${out% }"
}

# The header comment of the calling script (after the shebang and any #SBATCH lines, up to the
# first line that is not a comment) is its help; the parameters follow with their current values,
# so `FOO=bar script --help` shows what a run would use.
usage() {
  awk 'NR == 1 || /^#SBATCH/ { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
  if ((${#PARAMS[@]})); then
    printf '\nParameters (environment variables; current values):\n'
    local p
    for p in "${PARAMS[@]}"; do printf '  %-22s %s\n' "$p" "${!p}"; done
  fi
}

# parse_args DEFAULT_SUBCOMMAND VALID_SUBCOMMANDS "$@"
# A script may define script_flag() to take flags of its own (it returns 1 for flags it does not
# know). Pass-through flags should use the --key=value form.
parse_args() {
  local default_sub=$1 valid=" $2 "
  shift 2
  while (($#)); do
    case $1 in
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage; exit 0 ;;
      --) shift; PASSTHRU+=("$@"); break ;;
      -*)
        if ! { declare -F script_flag >/dev/null && script_flag "$1"; }; then PASSTHRU+=("$1"); fi
        ;;
      *)
        if [[ -z $SUBCOMMAND ]]; then SUBCOMMAND=$1; else PASSTHRU+=("$1"); fi
        ;;
    esac
    shift
  done
  : "${SUBCOMMAND:=$default_sub}"
  [[ $valid == *" $SUBCOMMAND "* ]] || die "unknown subcommand '$SUBCOMMAND' (one of:$valid; see --help)"
}

# A parameter still holding its placeholder would fail late and obscurely (a bucket or repository
# that does not exist); refuse before starting anything. Dry runs may keep placeholders.
require_real() {
  local name
  for name in "$@"; do
    if ((!DRY_RUN)) && [[ ${!name} == *YOUR_* ]]; then
      die "set $name (it is still the placeholder '${!name}')"
    fi
  done
}

# The jax version is pinned once, in requirements.txt; the accelerator builds must match it.
pinned_jax_version() {
  local v
  v=$(sed -n 's/^jax\[cpu\]==\([^ ;#]*\).*/\1/p' "$REPO_ROOT/requirements.txt")
  [[ -n $v ]] || die "no jax[cpu]==... pin in $REPO_ROOT/requirements.txt"
  printf '%s' "$v"
}

# The flags every launcher passes to mixmae-pretrain. Uses CONFIG, WORKDIR, and the optional
# COMPUTE_DTYPE and DATA_DIR, then PASSTHRU (later flags win, so the command line overrides).
pretrain_flags() {
  PRETRAIN_FLAGS=(--config "$CONFIG" --workdir "$WORKDIR")
  if [[ -n ${COMPUTE_DTYPE:-} ]]; then PRETRAIN_FLAGS+=("--config.compute_dtype=$COMPUTE_DTYPE"); fi
  if [[ -n ${DATA_DIR:-} ]]; then PRETRAIN_FLAGS+=("--config.data.data_dir=$DATA_DIR"); fi
  PRETRAIN_FLAGS+=("${PASSTHRU[@]}")
}

# setup_cuda_venv VENV PYTHON JAX_VERSION: a venv with the pinned stack and the CUDA 12 jax build.
# One pip resolve for everything, so pip sees the jaxlib pin and the CUDA plugin's needs together;
# the project itself goes in with --no-deps, as in the Makefile: requirements.txt is the one source
# of versions.
# The CUDA libraries come as nvidia-* wheels: no system CUDA toolkit is needed, only the driver.
setup_cuda_venv() {
  local venv=$1 python=$2 jax_version=$3 req="$1/requirements-cuda.txt"
  if ((!DRY_RUN)); then
    command -v "$python" >/dev/null || die "$python not found; install Python >= 3.11 (e.g. uv python install 3.11) and set PYTHON"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$python is older than 3.11"
  fi
  run "$python" -m venv "$venv"
  run "$venv/bin/pip" install --upgrade pip
  run_sh "grep -vE '$ACCEL_REQ_EXCLUDE' requirements.txt > $(_quote "$req")"
  run "$venv/bin/pip" install -r "$req" "jax[cuda12]==$jax_version"
  run "$venv/bin/pip" install --no-deps -e .
  run "$venv/bin/python" -c 'import jax; print("jax", jax.__version__)'
}
