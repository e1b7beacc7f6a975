#!/usr/bin/env bash
# The accelerator check: what a lent NVIDIA GPU must show, in one call of under 8 minutes, on an
# image with Python 3.12, jax, flax, optax and orbax but no tensorflow, tfds, ml_collections, clu
# or torch (the check's import path needs none of them but ml_collections, carried as a wheel).
#
# Usage: launch/gpu_check.sh [--dry-run] [prepare|check]
#
#   prepare  here, on the CPU machine, from the project's venv: the wheels the image lacks
#            (ml_collections and PyYAML for Python PY_VERSION) into CARRY/wheels, the parity
#            references (loss and every gradient of the tiny variant of each pretraining config,
#            computed on the CPU, whose step the suite proves equal to the torch references) into
#            CARRY/refs.npz, and the batch of each bench config and dtype that fits one GPU of
#            GPU_KIND, found by compiling the step ahead of time for it (mixmae-bench --topology
#            GPU_KIND:1 --fit), into CARRY/batches.json. Then carry CARRY to the device run.
#   check    there (the default): nvidia-smi; CARRY's wheels installed; parity on the GPU (fp32,
#            highest matmul precision, the suite's limits: loss 1e-5, gradients 1e-4); two real
#            train steps with an Orbax save and restore; mixmae-bench of every pretraining config
#            at B size in bf16, then fp32, at a batch that fills the GPU (halved on
#            out-of-memory; CARRY/batches.json gives the batch that fits, so the time goes to
#            measuring), what is left after BENCH_BUDGET_S listed as skipped. Writes
#            gpu_check.json, gpu_bench.json, gpu_bench.md and the logs into OUT; exits 1 if a
#            part failed.
#
# --dry-run prints every command ("+ " prefix, one per line) instead of running it.

set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# ---- Parameters (override from the environment) ---------------------------------------------
: "${CARRY:=.gpu_carry}"               # what travels to the device machine (a git-ignored dir)
: "${OUT:=gpu_check_out}"              # results (the device tool's $OUT)
: "${PYTHON:=}"                        # default: .venv/bin/python (prepare), python3 (check)
: "${PY_VERSION:=3.12}"                # the GPU image's Python, for the wheels
: "${BENCH_CONFIGS:=}"                 # empty: every pretraining recipe (gpu_check.BENCH_CONFIGS)
: "${BENCH_DTYPES:=bfloat16 float32}"
: "${BENCH_STEPS:=5}"
: "${BENCH_BUDGET_S:=300}"             # the bench's share of the 8 minutes
: "${GPU_KIND:=h200}"                  # prepare: the lent GPU (h100, h200, a100) to fit batches for
: "${FIT:=1}"                          # prepare: 0 skips the ahead-of-time batch search
# shellcheck disable=SC2034  # read by usage() in common.sh
PARAMS=(CARRY OUT PYTHON PY_VERSION BENCH_CONFIGS BENCH_DTYPES BENCH_STEPS BENCH_BUDGET_S
  GPU_KIND FIT)

parse_args check "prepare check" "$@"
run cd "$REPO_ROOT"

if [[ $SUBCOMMAND == prepare ]]; then
  : "${PYTHON:=.venv/bin/python}"
  ml_pin=$(sed -n 's/^ml_collections==\([^ ;#]*\).*/\1/p' requirements.txt)
  [[ -n $ml_pin ]] || die "no ml_collections==... pin in requirements.txt"
  run mkdir -p "$CARRY/wheels"
  run "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$PY_VERSION" --implementation cp --dest "$CARRY/wheels" \
    "ml_collections==$ml_pin" PyYAML
  run env JAX_PLATFORMS=cpu "$PYTHON" -m mixmae_jax.gpu_check refs --out "$CARRY/refs.npz"
  if ((FIT)); then
    fit=("$PYTHON" -m mixmae_jax.gpu_check fit --kind "$GPU_KIND" --out "$CARRY/batches.json")
    read -r -a dtypes <<<"$BENCH_DTYPES"
    fit+=(--dtypes "${dtypes[@]}")
    if [[ -n $BENCH_CONFIGS ]]; then
      read -r -a configs <<<"$BENCH_CONFIGS"
      fit+=(--configs "${configs[@]}")
    fi
    run env JAX_PLATFORMS=cpu "${fit[@]}"
  fi
  note "carry $CARRY to the device run, then: launch/gpu_check.sh check"
  exit 0
fi

: "${PYTHON:=python3}"
run mkdir -p "$OUT"
run_sh "nvidia-smi > $(_quote "$OUT/nvidia-smi.txt") 2>&1 || true"
if ((DRY_RUN)) || compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
  run_sh "$(_quote "$PYTHON") -m pip install --quiet --no-deps --no-index $(_quote "$CARRY")/wheels/*.whl"
fi
status=0
# each part logs to OUT and goes on after a failure, so one call reports everything
part() {  # part NAME CMD...: run CMD, tee its output to OUT/NAME.log, remember a failure
  local name=$1
  shift
  run_sh "set -o pipefail; $(format_cmd "$@") 2>&1 | tee $(_quote "$OUT/$name.log")" || status=1
}
part parity "$PYTHON" -m mixmae_jax.gpu_check parity --refs "$CARRY/refs.npz" \
  --json "$OUT/parity.json"
part smoke "$PYTHON" -m mixmae_jax.gpu_check smoke --workdir "$OUT/smoke_workdir" \
  --json "$OUT/smoke.json"
bench=("$PYTHON" -m mixmae_jax.gpu_check bench --out "$OUT" --steps "$BENCH_STEPS"
  --budget-s "$BENCH_BUDGET_S" --batches "$CARRY/batches.json")
read -r -a dtypes <<<"$BENCH_DTYPES"
bench+=(--dtypes "${dtypes[@]}")
if [[ -n $BENCH_CONFIGS ]]; then
  read -r -a configs <<<"$BENCH_CONFIGS"
  bench+=(--configs "${configs[@]}")
fi
part bench "${bench[@]}"
part summary "$PYTHON" -m mixmae_jax.gpu_check summary --out "$OUT"
exit "$status"
