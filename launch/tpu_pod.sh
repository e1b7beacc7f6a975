#!/usr/bin/env bash
# Pretrain on a Cloud TPU VM / pod slice: create it, install the project on every worker, and run
# mixmae-pretrain on all workers at once with checkpoints and metrics in a GCS bucket.
#
# Usage: launch/tpu_pod.sh [--dry-run] [--queued] [SUBCOMMAND] [--config.key=value ...]
#
# Subcommands:
#   all      create + setup + train (default)
#   create   create the TPU VM (`tpu-vm create`), or with --queued (or QUEUED=1) a queued resource
#            (`queued-resources create`), and wait until its node is ACTIVE
#   setup    on every worker: uv, its own Python 3.11 (the TPU images ship 3.10; jax 0.10.2 needs
#            >= 3.11), a venv, the repository at GIT_BRANCH, the pinned requirements with jax[tpu]
#   train    start mixmae-pretrain on every worker, detached (setsid nohup), logging to
#            LOG_DIR/train-<time>.log on each worker (LOG_DIR/latest.log points at the newest)
#   resume   the same as train: the trainer restores the latest checkpoint in WORKDIR by itself
#   logs     follow the training log of worker LOG_WORKER
#   stop     SIGTERM the training on every worker (the trainer saves a checkpoint on SIGTERM)
#   delete   delete the TPU VM, or with --queued the queued resource and its node
# Flags after the subcommand go to mixmae-pretrain, e.g. `train --config.batch_size=4096`.
# --dry-run prints every command ("+ " prefix, one per line) instead of running it.
#
# Preemption and resuming. WORKDIR lives in a bucket, so checkpoints outlive the VMs, and
# mixmae-pretrain always restores the newest checkpoint in WORKDIR (an empty WORKDIR starts at
# step 0). It also saves one on SIGTERM, which the VM's shutdown on preemption sends, time
# permitting; at worst a run loses the steps since the last periodic save. After a preemption:
#   * spot / preemptible TPU VM: the node stays PREEMPTED and cannot be restarted; delete it and
#     build a new one:   launch/tpu_pod.sh delete && launch/tpu_pod.sh all
#   * queued resource (--queued): it goes to SUSPENDED and is not refilled by itself; delete it
#     (with --force, its node too) and queue it again; `all` waits until the new node is ACTIVE:
#                        launch/tpu_pod.sh --queued delete && launch/tpu_pod.sh --queued all
#   * the VM survived but the program died (or was stopped): launch/tpu_pod.sh resume
# A new VM has fresh disks, which is why `all` runs setup again (if that first ssh fails because
# the workers are still booting, run `setup` and then `train`). Keep the same WORKDIR, CONFIG and
# global batch size; the mesh may change (restore reshards), so the slice size may differ.
#
# Needs: gcloud (authenticated; PROJECT or `gcloud config set project`), bash >= 4.4, a bucket
# the TPU's service account can write, and GIT_URL reachable from the workers (for a private
# repository use an https URL with a token, or a deploy key on the workers).

set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# ---- Parameters (override from the environment) ---------------------------------------------
: "${TPU_NAME:=mixmae-v4-64}"
: "${ZONE:=us-central2-b}"
: "${ACCELERATOR_TYPE:=v4-64}"
: "${RUNTIME_VERSION:=tpu-ubuntu2204-base}"
: "${PROJECT:=}"                            # empty: gcloud's configured project
: "${QUEUED:=0}"                            # 1 (or --queued): use a queued resource
: "${QR_NAME:=${TPU_NAME}-qr}"              # queued resource id (its node is TPU_NAME)
: "${SPOT:=0}"                              # 1: spot capacity (cheaper, preemptible)
: "${POLL_SECONDS:=60}"                     # queued resource state polling interval
: "${GIT_URL:=$(git -C "$REPO_ROOT" remote get-url origin 2>/dev/null || echo https://github.com/YOUR_ORG/mixmae-jax.git)}"
: "${GIT_BRANCH:=main}"
: "${PYTHON_VERSION:=3.11}"
: "${JAX_VERSION:=$(pinned_jax_version)}"   # from requirements.txt (jax[cpu]==...)
: "${LIBTPU_FIND_LINKS:=https://storage.googleapis.com/jax-releases/libtpu_releases.html}"
# Paths on the workers; $HOME is expanded there.
: "${REMOTE_DIR:=\$HOME/mixmae-jax}"
: "${REMOTE_VENV:=\$HOME/mixmae-venv}"
: "${LOG_DIR:=\$HOME/mixmae-logs}"
: "${LOG_WORKER:=0}"
: "${CONFIG:=configs/mixmim_b.py}"          # relative to the repository; ":variant" allowed
: "${WORKDIR:=gs://YOUR_BUCKET/mixmae/mixmim_b}"
: "${COMPUTE_DTYPE:=}"                      # e.g. bfloat16; empty: the config's choice
: "${DATA_DIR:=}"                           # tfds data dir, e.g. gs://YOUR_BUCKET/tensorflow_datasets
# shellcheck disable=SC2034  # read by usage() in common.sh
PARAMS=(TPU_NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION PROJECT QUEUED QR_NAME SPOT POLL_SECONDS
  GIT_URL GIT_BRANCH PYTHON_VERSION JAX_VERSION LIBTPU_FIND_LINKS REMOTE_DIR REMOTE_VENV LOG_DIR
  LOG_WORKER CONFIG WORKDIR COMPUTE_DTYPE DATA_DIR)

script_flag() {
  case $1 in
    --queued) QUEUED=1 ;;
    *) return 1 ;;
  esac
}

parse_args all "all create setup train resume logs stop delete" "$@"
[[ -n $JAX_VERSION ]] || exit 1

# Check what a subcommand needs before anything starts: `all` should not create a pod slice and
# then find out that WORKDIR is unusable.
check_setup_params() { require_real GIT_URL; }
check_train_params() {
  [[ $WORKDIR == gs://* ]] || die "WORKDIR must be a gs:// path (every worker writes there, and local disks die with the VM): $WORKDIR"
  require_real WORKDIR
}
case $SUBCOMMAND in
  all) check_setup_params; check_train_params ;;
  setup) check_setup_params ;;
  train | resume) check_train_params ;;
esac

GCLOUD_FLAGS=(--zone="$ZONE")
if [[ -n $PROJECT ]]; then GCLOUD_FLAGS+=(--project="$PROJECT"); fi

# A remote script is written as lines and sent as one `--command` line: "; " between lines,
# except after a line ending in "&" (a background job), where "; " would be a syntax error.
# Remote code is POSIX sh, as the workers' login shell runs it.
join_lines() {
  local out="" line
  for line in "$@"; do
    if [[ $line == *'&' ]]; then out+="$line "; else out+="$line; "; fi
  done
  printf '%s' "${out%; }"
}

# tpu_ssh WORKER LINE...: run the lines on one worker, or on all of them at once (WORKER=all).
# The lines start with shell variables holding the parameters (dir, venv, logs: paths on the
# worker, where $HOME expands), so the lines after them can be plain single-quoted text.
tpu_ssh() {
  local worker=$1
  shift
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker="$worker" \
    --command "$(join_lines 'set -eu' "dir=\"$REMOTE_DIR\"" "venv=\"$REMOTE_VENV\"" \
      "logs=\"$LOG_DIR\"" "$@")"
}

# ---- Subcommands ----------------------------------------------------------------------------
do_create() {
  local spot=()
  if ((SPOT)); then spot=(--spot); fi
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources create "$QR_NAME" --node-id="$TPU_NAME" \
      "${GCLOUD_FLAGS[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
      --runtime-version="$RUNTIME_VERSION" "${spot[@]}"
    wait_until_active
  else
    # tpu-vm create returns once the node is READY (or fails at once if there is no capacity:
    # that is what --queued is for).
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${spot[@]}"
  fi
}

# A queued resource is granted whenever capacity frees up (minutes to days); poll its state.
wait_until_active() {
  local describe=(gcloud compute tpus queued-resources describe "$QR_NAME" "${GCLOUD_FLAGS[@]}"
    --format='value(state.state)')
  if ((DRY_RUN)); then
    run "${describe[@]}"
    note "(repeated every ${POLL_SECONDS}s until the state is ACTIVE)"
    return 0
  fi
  local state
  while true; do
    state=$("${describe[@]}") || state=""  # a failed poll (network hiccup) is not the end
    case $state in
      ACTIVE) note "queued resource $QR_NAME is ACTIVE"; return 0 ;;
      FAILED | SUSPENDED) die "queued resource $QR_NAME is $state; delete it and create it again" ;;
      *) note "queued resource $QR_NAME is ${state:-unknown}; waiting ${POLL_SECONDS}s" ;;
    esac
    sleep "$POLL_SECONDS"
  done
}

do_setup() {
  # Idempotent: rerunning updates the checkout and the packages (e.g. after pushing a fix).
  # The workers' checkout is a deployment copy, hence `reset --hard` to the branch head.
  tpu_ssh all \
    "branch=$(quote_args "$GIT_BRANCH")" \
    'export PATH="$HOME/.local/bin:$PATH"' \
    'command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh' \
    "uv python install $(quote_args "$PYTHON_VERSION")" \
    "[ -x \"\$venv/bin/python\" ] || uv venv --seed --python $(quote_args "$PYTHON_VERSION") \"\$venv\"" \
    "[ -d \"\$dir/.git\" ] || git clone --depth 1 --branch \"\$branch\" $(quote_args "$GIT_URL") \"\$dir\"" \
    'git -C "$dir" fetch --depth 1 origin "$branch"' \
    'git -C "$dir" reset --hard FETCH_HEAD' \
    'cd "$dir"' \
    "grep -vE \"$ACCEL_REQ_EXCLUDE\" requirements.txt > \"\$venv/requirements-tpu.txt\"" \
    "\"\$venv/bin/pip\" install -r \"\$venv/requirements-tpu.txt\" \"jax[tpu]==$JAX_VERSION\" -f $(quote_args "$LIBTPU_FIND_LINKS")" \
    '"$venv/bin/pip" install --no-deps -e .' \
    '"$venv/bin/python" -c "import sys, jax; print(sys.version.split()[0], jax.__version__)"'
}

do_train() {
  pretrain_flags
  # No coordinator flags: on a TPU pod jax.distributed.initialize() finds its peers by itself
  # (from the metadata server); --jax_distributed asks for it, since the environment of an ssh
  # session may not show that this is a pod.
  PRETRAIN_FLAGS+=(--jax_distributed)
  # setsid puts the trainer in its own process group (so `stop` can signal all of it) and, with
  # nohup and no terminal on stdin/stdout, lets it outlive the ssh session.
  tpu_ssh all \
    "set -- $(quote_args "${PRETRAIN_FLAGS[@]}")" \
    'mkdir -p "$logs"' \
    'if [ -f "$logs/train.pid" ] && kill -0 "$(cat "$logs/train.pid")" 2>/dev/null; then echo "mixmae-pretrain is already running on $(hostname); run stop first" >&2; exit 1; fi' \
    'cd "$dir"' \
    'log="$logs/train-$(date +%Y%m%d-%H%M%S).log"' \
    'ln -sfn "$log" "$logs/latest.log"' \
    'TF_CPP_MIN_LOG_LEVEL=2 setsid nohup "$venv/bin/mixmae-pretrain" "$@" > "$log" 2>&1 < /dev/null &' \
    'echo $! > "$logs/train.pid"' \
    'echo "$(hostname): mixmae-pretrain started, log $log"'
}

do_logs() {
  tpu_ssh "$LOG_WORKER" 'tail -n 200 -F "$logs/latest.log"'
}

do_stop() {
  # A negative pid signals the process group; no `--` before it, as dash's kill rejects one.
  # The pid file is kept: `train` treats a dead pid as stale, and a live one (still saving its
  # checkpoint) as a reason to wait.
  tpu_ssh all \
    'if [ -f "$logs/train.pid" ]; then kill -TERM "-$(cat "$logs/train.pid")" 2>/dev/null || true; fi'
}

do_delete() {
  if ((QUEUED)); then
    # --force also deletes the queued resource's node, whatever state it is in.
    run gcloud compute tpus queued-resources delete "$QR_NAME" "${GCLOUD_FLAGS[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --quiet
  fi
}

case $SUBCOMMAND in
  all) do_create; do_setup; do_train ;;
  create) do_create ;;
  setup) do_setup ;;
  train | resume) do_train ;;
  logs) do_logs ;;
  stop) do_stop ;;
  delete) do_delete ;;
esac
