#!/usr/bin/env bash
#SBATCH --job-name=mixmae
#SBATCH --nodes=2
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --signal=TERM@120
# Pretrain on several GPU nodes under SLURM: one mixmae-pretrain process per GPU, started by srun.
#
# Usage: launch/slurm_multinode.sh [--dry-run] [SUBCOMMAND] [--config.key=value ...]
#    or: sbatch [sbatch options] launch/slurm_multinode.sh [--config.key=value ...]
#
# Subcommands:
#   setup   make VENV (on a filesystem all nodes share) with the pinned requirements without
#           jax[cpu] and torch, plus jax[cuda12]; run it once, on a login node (no GPU needed)
#   submit  sbatch this script for NODES x GPUS_PER_NODE processes (default outside a job);
#           the options given here override the #SBATCH lines above
#   run     inside the job (default there): srun one task per GPU, each running mixmae-pretrain
#           with --coordinator_address <first node>:COORDINATOR_PORT --num_processes $SLURM_NTASKS
#           --process_id $SLURM_PROCID, and seeing only its GPU (number $SLURM_LOCALID on its node)
# Flags after the subcommand go to mixmae-pretrain, e.g. `submit --config.batch_size=4096`.
# --dry-run prints every command ("+ " prefix, one per line) instead of running it; outside a job,
# `--dry-run submit` also prints the srun line the job would run, with NODES and GPUS_PER_NODE
# standing in for the SLURM variables (and COORDINATOR_HOST, default this host, for the node list).
#
# Resuming: the job's tasks get SIGTERM 120 s before the time limit (--signal), as they do when
# the job is preempted or cancelled, and the trainer saves a checkpoint on SIGTERM. Submitting
# again with the same WORKDIR resumes from the newest checkpoint; to run past the time limit,
# chain jobs: sbatch --dependency=afterany:<jobid> ... The node count may change between jobs
# (restore reshards); keep the global batch size.
# All nodes must see the repository, VENV and WORKDIR at the same paths (a shared filesystem).

set -euo pipefail
# sbatch runs a copy of this file from its spool directory, so common.sh is found from the
# repository (MIXMAE_REPO, set by `submit`) or the submit directory rather than from $0.
for _dir in "$(dirname "${BASH_SOURCE[0]}")" "${MIXMAE_REPO:-.}/launch" "${SLURM_SUBMIT_DIR:-.}/launch"; do
  if [[ -f $_dir/common.sh ]]; then
    # shellcheck source=launch/common.sh
    source "$_dir/common.sh"
    break
  fi
done
declare -F run >/dev/null || { echo "error: launch/common.sh not found; sbatch from the repository root or set MIXMAE_REPO" >&2; exit 1; }

# ---- Parameters (override from the environment; sbatch passes the environment to the job) ----
: "${NODES:=2}"                              # submit: nodes (--nodes)
: "${GPUS_PER_NODE:=8}"                      # submit: GPUs and tasks per node
: "${CPUS_PER_TASK:=8}"                      # submit: CPU cores per task (tf.data decodes JPEGs)
: "${TIME_LIMIT:=24:00:00}"                  # submit: --time
: "${PARTITION:=}"                           # submit: --partition (empty: the cluster default)
: "${ACCOUNT:=}"                             # submit: --account (empty: the user default)
: "${JOB_NAME:=mixmae}"
: "${COORDINATOR_PORT:=8476}"                # process 0 listens here on the first node
: "${COORDINATOR_HOST:=}"                    # empty: the first node of the job
: "${MEM_FRACTION:=0.90}"                    # XLA_PYTHON_CLIENT_MEM_FRACTION per process
: "${VENV:=$REPO_ROOT/.venv}"
: "${PYTHON:=python3.11}"                    # only for setup
: "${JAX_VERSION:=$(pinned_jax_version)}"    # from requirements.txt (jax[cpu]==...)
: "${CONFIG:=configs/mixmim_b.py}"           # relative to the repository; ":variant" allowed
: "${WORKDIR:=$REPO_ROOT/workdirs/mixmim_b}" # shared filesystem or gs://
: "${COMPUTE_DTYPE:=}"                       # e.g. bfloat16; empty: the config's choice
: "${DATA_DIR:=}"                            # tfds data dir; empty: the config's / TFDS_DATA_DIR
# shellcheck disable=SC2034  # read by usage() in common.sh
PARAMS=(NODES GPUS_PER_NODE CPUS_PER_TASK TIME_LIMIT PARTITION ACCOUNT JOB_NAME COORDINATOR_PORT
  COORDINATOR_HOST MEM_FRACTION VENV PYTHON JAX_VERSION CONFIG WORKDIR COMPUTE_DTYPE DATA_DIR)

if [[ -n ${SLURM_JOB_ID:-} ]]; then default_sub=run; else default_sub=submit; fi
parse_args "$default_sub" "setup submit run" "$@"
[[ -n $JAX_VERSION ]] || exit 1

# The first node of the allocation hosts the coordinator: srun's block distribution puts task 0
# (process 0, which serves it) there.
first_host() {
  if [[ -n $COORDINATOR_HOST ]]; then
    printf '%s' "$COORDINATOR_HOST"
  elif [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
    local hosts
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    [[ ${#hosts[@]} -gt 0 ]] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' printed nothing"
    printf '%s' "${hosts[0]}"
  else
    hostname
  fi
}

do_submit() {
  local opts=(--job-name="$JOB_NAME" --nodes="$NODES" --gpus-per-node="$GPUS_PER_NODE"
    --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" --time="$TIME_LIMIT"
    --chdir="$REPO_ROOT" --export=ALL,MIXMAE_REPO="$REPO_ROOT")
  if [[ -n $PARTITION ]]; then opts+=(--partition="$PARTITION"); fi
  if [[ -n $ACCOUNT ]]; then opts+=(--account="$ACCOUNT"); fi
  run sbatch "${opts[@]}" "$REPO_ROOT/launch/slurm_multinode.sh" run "${PASSTHRU[@]}"
  if ((DRY_RUN)); then
    note "inside the job, with NODES=$NODES GPUS_PER_NODE=$GPUS_PER_NODE standing in for SLURM_*:"
    do_run
  fi
}

do_run() {
  # Inside a job the SLURM variables are the truth; outside (dry runs) the parameters stand in.
  local nodes=${SLURM_JOB_NUM_NODES:-$NODES}
  local per_node=${SLURM_NTASKS_PER_NODE:-$GPUS_PER_NODE}
  local ntasks=${SLURM_NTASKS:-$((nodes * per_node))}
  local host
  host=$(first_host)
  if ((!DRY_RUN)) && [[ ! -x $VENV/bin/mixmae-pretrain ]]; then
    die "$VENV/bin/mixmae-pretrain not found; run: launch/slurm_multinode.sh setup"
  fi
  pretrain_flags
  # Each task's shell expands the $SLURM_* variables. A task keeps one GPU: entry SLURM_LOCALID of
  # the job's CUDA_VISIBLE_DEVICES list (GPU SLURM_LOCALID where Slurm sets none; `cut` leaves a
  # single entry as it is, where the cluster already binds one GPU per task).
  local task='export CUDA_VISIBLE_DEVICES=$(echo "${CUDA_VISIBLE_DEVICES:-$SLURM_LOCALID}" | cut -d, -f$((SLURM_LOCALID + 1)))'
  task+=" XLA_PYTHON_CLIENT_MEM_FRACTION=$(quote_args "$MEM_FRACTION") TF_CPP_MIN_LOG_LEVEL=2; exec"
  task+=" $(quote_args "$VENV/bin/mixmae-pretrain" "${PRETRAIN_FLAGS[@]}")"
  task+=" --coordinator_address $(quote_args "$host:$COORDINATOR_PORT") --num_processes $ntasks"
  task+=' --process_id $SLURM_PROCID'
  # srun no longer inherits --cpus-per-task from sbatch (Slurm >= 22.05), so pass it on.
  # --kill-on-bad-exit: one dead process would leave the others hanging in a collective.
  local cpus=()
  if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then cpus=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
  run srun --nodes="$nodes" --ntasks="$ntasks" --ntasks-per-node="$per_node" "${cpus[@]}" \
    --distribution=block --kill-on-bad-exit=1 bash -c "$task"
}

run cd "$REPO_ROOT"
case $SUBCOMMAND in
  setup) setup_cuda_venv "$VENV" "$PYTHON" "$JAX_VERSION" ;;
  submit) do_submit ;;
  run) do_run ;;
esac
