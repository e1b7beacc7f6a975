#!/usr/bin/env bash
# Pretrain on one NVIDIA GPU (CUDA 12 driver) from this checkout.
#
# Usage: launch/gpu_single.sh [--dry-run] [SUBCOMMAND] [--config.key=value ...]
#
# Subcommands:
#   setup   make VENV with PYTHON (>= 3.11): the pinned requirements without jax[cpu] and torch,
#           plus jax[cuda12] at the pinned jax version, then this project in editable mode
#   train   run mixmae-pretrain on GPU CUDA_DEVICE in the foreground (default). Rerunning the same
#           command resumes from the newest checkpoint in WORKDIR; use tmux/nohup for long runs.
# Flags after the subcommand go to mixmae-pretrain, e.g. `train --config.batch_size=256`.
# --dry-run prints every command ("+ " prefix, one per line) instead of running it.
#
# Commands run from the repository root, so CONFIG and WORKDIR are relative to it.
# Memory: XLA preallocates MEM_FRACTION of the GPU at start (jax's default is 0.75); the rest is
# left for the CUDA context and cuDNN/cuBLAS workspaces. TensorFlow (the input pipeline) is the
# CPU build, so it takes no GPU memory. COMPUTE_DTYPE=bfloat16 (A100, H100 and newer) runs the
# matmuls in bf16 with fp32 weights, LayerNorm, softmax and loss.

set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# ---- Parameters (override from the environment) ---------------------------------------------
: "${VENV:=.venv}"
: "${PYTHON:=python3.11}"                   # only for setup
: "${JAX_VERSION:=$(pinned_jax_version)}"   # from requirements.txt (jax[cpu]==...)
: "${CUDA_DEVICE:=0}"                       # which GPU (CUDA_VISIBLE_DEVICES)
: "${MEM_FRACTION:=0.90}"                   # XLA_PYTHON_CLIENT_MEM_FRACTION
: "${CONFIG:=configs/mixmim_b.py}"          # ":variant" allowed
: "${WORKDIR:=workdirs/mixmim_b}"
: "${COMPUTE_DTYPE:=}"                      # e.g. bfloat16; empty: the config's choice
: "${DATA_DIR:=}"                           # tfds data dir; empty: the config's / TFDS_DATA_DIR
# shellcheck disable=SC2034  # read by usage() in common.sh
PARAMS=(VENV PYTHON JAX_VERSION CUDA_DEVICE MEM_FRACTION CONFIG WORKDIR COMPUTE_DTYPE DATA_DIR)

parse_args train "setup train" "$@"
[[ -n $JAX_VERSION ]] || exit 1

run cd "$REPO_ROOT"

case $SUBCOMMAND in
  setup)
    setup_cuda_venv "$VENV" "$PYTHON" "$JAX_VERSION"
    # A broken CUDA install makes jax fall back to the CPU with only a warning; fail here instead.
    run env CUDA_VISIBLE_DEVICES="$CUDA_DEVICE" "$VENV/bin/python" -c \
      'import jax; assert jax.default_backend() == "gpu", jax.devices(); print(jax.devices())'
    ;;
  train)
    if ((!DRY_RUN)) && [[ ! -x $VENV/bin/mixmae-pretrain ]]; then
      die "$VENV/bin/mixmae-pretrain not found; run: launch/gpu_single.sh setup"
    fi
    pretrain_flags
    run env CUDA_VISIBLE_DEVICES="$CUDA_DEVICE" XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION" \
      TF_CPP_MIN_LOG_LEVEL=2 "$VENV/bin/mixmae-pretrain" "${PRETRAIN_FLAGS[@]}"
    ;;
esac
