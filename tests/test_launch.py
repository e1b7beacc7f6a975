"""The launch scripts in launch/: what their dry runs print, and that the printed commands work.

Every script runs in a subprocess with a minimal environment (so a developer's CONFIG, WORKDIR or
SLURM_* variables cannot leak in). Dry runs must print only "+ " command lines on stdout, each one
valid shell (shlex can split it). Where a command only makes sense on another machine (the TPU
workers, the srun tasks), fakes of gcloud / srun / scontrol / mixmae-pretrain on PATH run it
locally, so the quoting that reaches the remote shell is checked too, not just the text.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["tpu_pod.sh", "gpu_single.sh", "slurm_multinode.sh"]
JAX_PIN = re.search(r"^jax\[cpu\]==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)


# ---- helpers --------------------------------------------------------------------------------
def make_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def launch(script, *args, env=None, path_prepend=(), check=True):
    """Run launch/<script> with only PATH and HOME (plus `env`) in its environment."""
    base = {"PATH": os.pathsep.join([*map(str, path_prepend), os.environ["PATH"]])}
    base["HOME"] = os.environ.get("HOME", "/tmp")
    base.update(env or {})
    proc = subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def dry_run(script, *args, **kw):
    """Commands printed by a dry run, each split into argv."""
    proc = launch(script, "--dry-run", *args, **kw)
    lines = proc.stdout.splitlines()
    assert lines, proc.stderr
    for line in lines:
        assert line.startswith("+ "), f"dry-run stdout must be commands only: {line!r}"
    return [shlex.split(line[2:]) for line in lines]


def find(cmds, *words):
    """The one command whose argv starts with `words`."""
    hits = [c for c in cmds if c[: len(words)] == list(words)]
    assert len(hits) == 1, (words, cmds)
    return hits[0]


def flag(argv, name):
    """Value of `--name=value` or `--name value` in argv."""
    for i, a in enumerate(argv):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name:
            return argv[i + 1]
    raise AssertionError(f"{name} not in {argv}")


def alive(pid):
    """Whether pid runs (a zombie left for a PID 1 that does not reap counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def sh_syntax_ok(code):
    """Remote code must be POSIX sh (the workers' login shell runs it); dash checks if present."""
    shell = shutil.which("dash") or "sh"
    proc = subprocess.run([shell, "-n", "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


TPU_ENV = {
    "TPU_NAME": "t-test",
    "ZONE": "europe-west4-a",
    "ACCELERATOR_TYPE": "v5litepod-32",
    "RUNTIME_VERSION": "v2-alpha-tpuv5-lite",
    "GIT_URL": "https://example.com/org/mixmae-jax.git",
    "GIT_BRANCH": "dev",
    "WORKDIR": "gs://bkt/runs/b1",
    "CONFIG": "configs/mixmim_l.py",
}


# ---- all scripts ----------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["common.sh", "gpu_check.sh", *SCRIPTS])
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck():
    files = [f"launch/{name}" for name in ("common.sh", "gpu_check.sh", *SCRIPTS)]
    proc = subprocess.run(
        ["shellcheck", "-x", "--severity=warning", *files], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero_and_lists_parameters(script):
    out = launch(script, "--help").stdout
    assert "Usage:" in out and "--dry-run" in out
    assert "Parameters (environment variables; current values):" in out
    assert re.search(r"^  CONFIG +configs/mixmim_b\.py$", out, re.M)
    assert os.access(LAUNCH / script, os.X_OK)


@pytest.mark.parametrize("script", [*SCRIPTS, "gpu_check.sh"])
def test_unknown_subcommand_fails(script):
    proc = launch(script, "--dry-run", "frobnicate", check=False)
    assert proc.returncode != 0 and "unknown subcommand" in proc.stderr


# ---- TPU pod --------------------------------------------------------------------------------
def test_tpu_default_is_create_setup_train():
    cmds = dry_run("tpu_pod.sh", env=TPU_ENV)
    assert [c[:5] for c in cmds] == [
        ["gcloud", "compute", "tpus", "tpu-vm", verb] for verb in ("create", "ssh", "ssh")
    ]
    create = cmds[0]
    assert create[5] == "t-test"
    assert flag(create, "--zone") == "europe-west4-a"
    assert flag(create, "--accelerator-type") == "v5litepod-32"
    assert flag(create, "--version") == "v2-alpha-tpuv5-lite"  # tpu-vm create calls it --version
    assert "--spot" not in create
    assert "--spot" in dry_run("tpu_pod.sh", "create", env={**TPU_ENV, "SPOT": "1"})[0]


def test_tpu_setup_installs_python311_and_jax_tpu_on_every_worker():
    (ssh,) = dry_run("tpu_pod.sh", "setup", env=TPU_ENV)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t-test"]
    assert flag(ssh, "--worker") == "all"
    assert flag(ssh, "--zone") == "europe-west4-a"
    code = flag(ssh, "--command")
    sh_syntax_ok(code)
    assert "https://astral.sh/uv/install.sh" in code
    assert "uv python install 3.11" in code
    assert "uv venv --seed --python 3.11" in code
    assert "branch=dev;" in code
    assert 'git clone --depth 1 --branch "$branch" https://example.com/org/mixmae-jax.git' in code
    libtpu = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
    assert f'"jax[tpu]=={JAX_PIN}" -f {libtpu}' in code
    assert "install --no-deps -e ." in code
    # The pinned requirements go in without the CPU jax build and without torch.
    assert re.search(r'grep -vE "\^\(jax\\\[cpu\\\]\|torch\)==" requirements\.txt', code), code


def test_tpu_train_runs_pretrain_on_all_workers_with_bucket_workdir():
    cmds = dry_run("tpu_pod.sh", "train", "--config.batch_size=4096", env=TPU_ENV)
    (ssh,) = cmds
    assert flag(ssh, "--worker") == "all"
    code = flag(ssh, "--command")
    sh_syntax_ok(code)
    flags = ("--config configs/mixmim_l.py --workdir gs://bkt/runs/b1 --config.batch_size=4096"
             " --jax_distributed")
    assert f"; set -- {flags};" in code
    detached = 'setsid nohup "$venv/bin/mixmae-pretrain" "$@" > "$log" 2>&1 < /dev/null &'
    assert detached in code
    assert "--coordinator_address" not in code  # TPU pods find their peers themselves
    # resume is train: the trainer picks up the newest checkpoint in WORKDIR.
    assert dry_run("tpu_pod.sh", "resume", "--config.batch_size=4096", env=TPU_ENV) == cmds


def test_tpu_queued_resource_create_wait_and_delete():
    env = {**TPU_ENV, "QR_NAME": "qr-test", "SPOT": "1"}
    create, describe = dry_run("tpu_pod.sh", "--queued", "create", env=env)
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "qr-test"]
    assert flag(create, "--node-id") == "t-test"
    assert flag(create, "--accelerator-type") == "v5litepod-32"
    assert flag(create, "--runtime-version") == "v2-alpha-tpuv5-lite"
    assert flag(create, "--zone") == "europe-west4-a"
    assert "--spot" in create
    assert describe[4:6] == ["describe", "qr-test"]
    (delete,) = dry_run("tpu_pod.sh", "delete", env={**env, "QUEUED": "1"})
    assert delete[3:6] == ["queued-resources", "delete", "qr-test"] and "--force" in delete
    (delete,) = dry_run("tpu_pod.sh", "delete", env=TPU_ENV)
    assert delete[3:6] == ["tpu-vm", "delete", "t-test"]


def test_tpu_refuses_local_workdir_and_placeholders_before_creating_anything(tmp_path):
    calls = tmp_path / "gcloud.log"
    make_exe(tmp_path / "bin" / "gcloud", f'#!/bin/sh\necho "$@" >> {calls}\n')
    proc = launch("tpu_pod.sh", "--dry-run", env={**TPU_ENV, "WORKDIR": "/tmp/x"}, check=False)
    assert proc.returncode != 0 and "gs://" in proc.stderr and not proc.stdout
    env = {k: v for k, v in TPU_ENV.items() if k != "WORKDIR"}  # the gs://YOUR_BUCKET default
    proc = launch("tpu_pod.sh", "all", env=env, path_prepend=[tmp_path / "bin"], check=False)
    assert proc.returncode != 0 and "placeholder" in proc.stderr
    assert not calls.exists()


def test_tpu_train_and_stop_run_on_a_fake_worker(tmp_path):
    """The remote train/stop scripts, run by sh as a worker would: detached start, pid file,
    log, refusal to start twice, SIGTERM to the whole process group."""
    home = tmp_path / "worker"
    (home / "mixmae-jax").mkdir(parents=True)
    started = home / "started"
    make_exe(
        home / "mixmae-venv" / "bin" / "mixmae-pretrain",
        f'#!/bin/sh\necho "$PWD|$TF_CPP_MIN_LOG_LEVEL|$*" > {started}\n'
        "echo training\nexec sleep 60\n",
    )
    # Fake gcloud: `tpu-vm ssh ... --command CMD` runs CMD with sh in the fake worker's home.
    make_exe(
        tmp_path / "bin" / "gcloud",
        "#!/usr/bin/env bash\n"
        'while (($#)); do [[ $1 == --command ]] && exec sh -c "$2"; shift; done\n',
    )
    env = {**TPU_ENV, "HOME": str(home)}
    paths = [tmp_path / "bin"]
    pidfile = home / "mixmae-logs" / "train.pid"
    try:
        proc = launch("tpu_pod.sh", "train", "--config.seed=3", env=env, path_prepend=paths)
        assert "mixmae-pretrain started" in proc.stdout
        for _ in range(200):
            if started.exists() and started.read_text():
                break
            time.sleep(0.02)
        cwd, tf_level, args = started.read_text().strip().split("|")
        assert Path(cwd) == home / "mixmae-jax" and tf_level == "2"
        assert args == ("--config configs/mixmim_l.py --workdir gs://bkt/runs/b1 --config.seed=3"
                        " --jax_distributed")
        pid = int(pidfile.read_text())
        assert os.getpgid(pid) == pid  # its own process group, for `stop`
        assert (home / "mixmae-logs" / "latest.log").read_text() == "training\n"
        again = launch("tpu_pod.sh", "train", env=env, path_prepend=paths, check=False)
        assert again.returncode != 0 and "already running" in again.stderr
        launch("tpu_pod.sh", "stop", env=env, path_prepend=paths)
        for _ in range(200):
            if not alive(pid):
                break
            time.sleep(0.02)
        else:
            raise AssertionError("stop did not end the training process")
    finally:
        if pidfile.exists():  # only the process this test started
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---- single GPU -----------------------------------------------------------------------------
def test_gpu_setup_installs_cuda_jax_into_a_venv(tmp_path):
    venv = tmp_path / "venv"
    cmds = dry_run("gpu_single.sh", "setup", env={"VENV": str(venv), "PYTHON": "python3.11"})
    assert cmds[0] == ["cd", str(ROOT)]
    assert ["python3.11", "-m", "venv", str(venv)] in cmds
    install = [c for c in cmds if c[:2] == [f"{venv}/bin/pip", "install"] and "-r" in c]
    assert len(install) == 1 and f"jax[cuda12]=={JAX_PIN}" in install[0]
    assert [f"{venv}/bin/pip", "install", "--no-deps", "-e", "."] in cmds
    assert 'assert jax.default_backend() == "gpu"' in cmds[-1][-1]  # no silent CPU fallback
    # The requirements filter, run for real: no CPU jax, no torch, everything else kept.
    (grep,) = [c for c in cmds if c[0] == "grep"]
    venv.mkdir()
    subprocess.run(shlex.join(grep[:-2]) + f" > {grep[-1]}", shell=True, cwd=ROOT, check=True)
    kept = Path(grep[-1]).read_text().splitlines()
    pins = [ln for ln in (ROOT / "requirements.txt").read_text().splitlines() if "==" in ln]
    assert f"jaxlib=={JAX_PIN}" in kept and "flax==0.12.8" in kept
    assert not [ln for ln in kept if ln.startswith(("jax[cpu]", "torch"))]
    assert len([ln for ln in kept if "==" in ln]) == len(pins) - 2


def test_gpu_train_command():
    env = {"CUDA_DEVICE": "1", "MEM_FRACTION": "0.8", "WORKDIR": "/data/run1"}
    cmds = dry_run("gpu_single.sh", "train", "--config.batch_size=128", env=env)
    assert cmds == [
        ["cd", str(ROOT)],
        [
            "env",
            "CUDA_VISIBLE_DEVICES=1",
            "XLA_PYTHON_CLIENT_MEM_FRACTION=0.8",
            "TF_CPP_MIN_LOG_LEVEL=2",
            ".venv/bin/mixmae-pretrain",
            "--config",
            "configs/mixmim_b.py",
            "--workdir",
            "/data/run1",
            "--config.batch_size=128",
        ],
    ]
    (_, train) = dry_run("gpu_single.sh", env={"COMPUTE_DTYPE": "bfloat16"})  # train is default
    assert train[-1] == "--config.compute_dtype=bfloat16"


def test_gpu_train_runs_the_venv_entry_point(tmp_path):
    venv = tmp_path / "venv"
    make_exe(
        venv / "bin" / "mixmae-pretrain",
        '#!/bin/sh\necho "$CUDA_VISIBLE_DEVICES $XLA_PYTHON_CLIENT_MEM_FRACTION $PWD $*"\n',
    )
    proc = launch("gpu_single.sh", "train", env={"VENV": str(venv), "CUDA_DEVICE": "3"})
    assert proc.stdout.split() == [
        "3", "0.90", str(ROOT), "--config", "configs/mixmim_b.py", "--workdir", "workdirs/mixmim_b"
    ]  # fmt: skip
    assert "+ env CUDA_VISIBLE_DEVICES=3" in proc.stderr  # real runs log what they run
    missing = launch("gpu_single.sh", "train", env={"VENV": str(tmp_path / "none")}, check=False)
    assert missing.returncode != 0 and "gpu_single.sh setup" in missing.stderr


# ---- SLURM multi-node -----------------------------------------------------------------------
def fake_slurm(tmp_path, hosts=("gpu07", "gpu08")):
    log = tmp_path / "scontrol.log"
    host_lines = "\\n".join(hosts)
    make_exe(
        tmp_path / "bin" / "scontrol",
        f'#!/bin/sh\necho "$@" >> {log}\n'
        f'[ "$1 $2" = "show hostnames" ] && printf "{host_lines}\\n"\n',
    )
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NUM_NODES": str(len(hosts)),
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_NTASKS": str(4 * len(hosts)),
        "SLURM_CPUS_PER_TASK": "12",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "COORDINATOR_PORT": "9123",
    }
    return env, log


def test_slurm_in_job_srun_one_process_per_gpu(tmp_path):
    env, log = fake_slurm(tmp_path)
    cmds = dry_run("slurm_multinode.sh", "--config.batch_size=4096", env=env,
                   path_prepend=[tmp_path / "bin"])  # fmt: skip
    assert log.read_text().split() == ["show", "hostnames", "gpu[07-08]"]
    (srun,) = [c for c in cmds if c[0] == "srun"]  # `run` is the default inside a job
    assert flag(srun, "--nodes") == "2"
    assert flag(srun, "--ntasks") == "8"  # nodes x GPUs per node
    assert flag(srun, "--ntasks-per-node") == "4"
    assert flag(srun, "--cpus-per-task") == "12"
    assert srun[-3:-1] == ["bash", "-c"]
    task = srun[-1]
    assert "CUDA_VISIBLE_DEVICES" in task and "SLURM_LOCALID" in task
    assert task.endswith(
        "--config.batch_size=4096 --coordinator_address gpu07:9123 --num_processes 8 "
        "--process_id $SLURM_PROCID"
    )
    assert f"exec {ROOT}/.venv/bin/mixmae-pretrain --config configs/mixmim_b.py" in task


def test_slurm_submit_outside_slurm(tmp_path):
    env = {"NODES": "4", "GPUS_PER_NODE": "2", "PARTITION": "gpu", "COORDINATOR_HOST": "n001"}
    cmds = dry_run("slurm_multinode.sh", "--config.seed=1", env=env)  # submit is the default
    sbatch = find(cmds, "sbatch")
    assert flag(sbatch, "--nodes") == "4"
    assert flag(sbatch, "--gpus-per-node") == "2"
    assert flag(sbatch, "--ntasks-per-node") == "2"
    assert flag(sbatch, "--partition") == "gpu"
    assert sbatch[-3:] == [str(LAUNCH / "slurm_multinode.sh"), "run", "--config.seed=1"]
    srun = find(cmds, "srun")  # what the job will run, with the parameters as SLURM variables
    assert flag(srun, "--ntasks") == "8"
    assert srun[-1].endswith(
        "--coordinator_address n001:8476 --num_processes 8 --process_id $SLURM_PROCID"
    )


def test_slurm_sbatch_headers_one_task_per_gpu():
    text = (LAUNCH / "slurm_multinode.sh").read_text()
    head = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", text, re.M))
    assert head["ntasks-per-node"] == head["gpus-per-node"]
    # The submit defaults agree with the headers a plain `sbatch launch/slurm_multinode.sh` uses.
    sbatch = find(dry_run("slurm_multinode.sh", "submit"), "sbatch")
    for key in ("nodes", "gpus-per-node", "ntasks-per-node", "cpus-per-task"):
        assert flag(sbatch, "--" + key) == head[key], key


def test_slurm_srun_line_runs_each_task_with_its_own_id_and_gpu(tmp_path):
    """Run the job step for real with a fake srun (tasks run here, one after another) and a fake
    trainer: the per-task variables must reach each process."""
    env, _ = fake_slurm(tmp_path)
    make_exe(
        tmp_path / "bin" / "srun",
        "#!/usr/bin/env bash\nn=1 per=1\n"
        "while [[ $1 == --* ]]; do case $1 in --ntasks=*) n=${1#*=};; "
        "--ntasks-per-node=*) per=${1#*=};; esac; shift; done\n"
        'for ((i = 0; i < n; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$((i % per)) "$@"; done\n',
    )
    venv = tmp_path / "venv"
    make_exe(venv / "bin" / "mixmae-pretrain", '#!/bin/sh\necho "$CUDA_VISIBLE_DEVICES $*"\n')
    env.update(VENV=str(venv), WORKDIR="/shared/run")
    proc = launch("slurm_multinode.sh", "run", env=env, path_prepend=[tmp_path / "bin"])
    lines = proc.stdout.splitlines()
    assert len(lines) == 8
    for i, line in enumerate(lines):
        gpu, *args = line.split()
        assert gpu == str(i % 4)
        assert args == [
            "--config", "configs/mixmim_b.py", "--workdir", "/shared/run",
            "--coordinator_address", "gpu07:9123", "--num_processes", "8", "--process_id", str(i),
        ]  # fmt: skip
    # A job whose GPUs Slurm lists explicitly: each task takes its entry of the list.
    proc = launch("slurm_multinode.sh", "run", env={**env, "CUDA_VISIBLE_DEVICES": "4,5,6,7"},
                  path_prepend=[tmp_path / "bin"])  # fmt: skip
    assert [ln.split()[0] for ln in proc.stdout.splitlines()] == ["4", "5", "6", "7"] * 2


# ---- the accelerator check ----------------------------------------------------------------------
def test_gpu_check_help_and_dry_runs():
    """prepare (here): the two wheels the GPU image lacks, for its Python, and the references;
    check (there): nvidia-smi, the carried wheels, then parity, smoke, bench and summary, each
    teed to its log in OUT. (tests/test_gpu_check.py runs the check itself with fakes.)"""
    out = launch("gpu_check.sh", "--help").stdout
    assert "Usage:" in out and "--dry-run" in out and os.access(LAUNCH / "gpu_check.sh", os.X_OK)
    assert re.search(r"^  BENCH_BUDGET_S +300$", out, re.M)
    ml_pin = re.search(r"^ml_collections==(\S+)$", (ROOT / "requirements.txt").read_text(),
                       re.M).group(1)
    cd, mkdir, download, refs, fit = dry_run("gpu_check.sh", "prepare")
    assert mkdir == ["mkdir", "-p", ".gpu_carry/wheels"]
    assert download[1:4] == ["-m", "pip", "download"] and "--only-binary=:all:" in download
    assert download[download.index("--python-version") + 1] == "3.12"
    assert download[-2:] == [f"ml_collections=={ml_pin}", "PyYAML"]
    assert refs[-3:] == ["refs", "--out", ".gpu_carry/refs.npz"] and "JAX_PLATFORMS=cpu" in refs
    # the batches that fit the lent GPU, by compiling for it here
    assert fit[fit.index("fit"):fit.index("--dtypes")] == [
        "fit", "--kind", "h200", "--out", ".gpu_carry/batches.json"]
    assert dry_run("gpu_check.sh", "prepare", env={"FIT": "0"})[-1] == refs
    assert "h100" in dry_run("gpu_check.sh", "prepare", env={"GPU_KIND": "h100"})[-1]
    cmds = dry_run("gpu_check.sh", env={"OUT": "/o", "BENCH_CONFIGS": "mae_vit_b.py"})
    assert cmds[0][0] == "cd" and cmds[1] == ["mkdir", "-p", "/o"]
    text = [" ".join(c) for c in cmds]
    assert "nvidia-smi > /o/nvidia-smi.txt" in text[2]
    assert "pip install --quiet --no-deps --no-index .gpu_carry/wheels/*.whl" in text[3]
    parts = [next(a for a in c if a in ("parity", "smoke", "bench", "summary")) for c in cmds[4:]]
    assert parts == ["parity", "smoke", "bench", "summary"]
    bench = cmds[6]
    assert bench[bench.index("--dtypes") + 1:bench.index("--dtypes") + 3] == ["bfloat16",
                                                                               "float32"]
    assert bench[bench.index("--configs") + 1] == "mae_vit_b.py" and "/o/bench.log" in text[6]
    assert bench[bench.index("--batches") + 1] == ".gpu_carry/batches.json"


def test_aot_table_rows_and_the_extrapolated_batch(tmp_path):
    """launch/aot_table.py: every recipe on its targets in both dtypes (L/H with a mesh.fsdp the
    torus can hold), and the table's columns from the JSON records; the one-compile batch
    estimate is (usable - fixed) / (temp per image)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("aot_table", LAUNCH / "aot_table.py")
    aot_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(aot_table)
    rows = list(aot_table.rows())
    configs = {p.stem for p in (ROOT / "configs").glob("*.py")}
    assert {r["recipe"] for r in rows} <= configs
    assert len(rows) == 2 * sum(len(t) for t in aot_table.RECIPES.values())
    for r in rows:
        if r["recipe"].endswith(aot_table.LARGE):
            fsdp = int(r["overrides"][1].split("=")[1])
            # a v4 or v5p 4x4x4 torus: a mesh axis spans whole physical axes (4, 16 or 64)
            assert not r["topology"].endswith("4x4x4") or fsdp in (4, 16, 64), r
    gib = 1 << 30
    ok = {"mesh": {"data": 4, "fsdp": 1}, "batch": 32, "per_device_batch": 8, "remat": "dots",
          "total_bytes": 3 * gib, "temp_bytes": 2 * gib, "usable_memory_bytes": 16 * gib,
          "fits": True, "compile_s": 12.0,
          "collectives": {"all-reduce": {"count": 3, "bytes": 5e8},
                          "all-to-all": {"count": 0, "bytes": 0}}}
    row = {"recipe": "mae_vit_b", "topology": "v5e:2x2", "dtype": "bfloat16",
           "overrides": ["--config.compute_dtype=bfloat16", "--no-estimate"]}
    out = tmp_path / "t.jsonl"
    out.write_text(json.dumps({"row": row, "wall_s": 1, "result": ok}) + "\n" + json.dumps(
        {"row": {**row, "dtype": "float32"}, "wall_s": 1, "result": {"error": "mesh.fsdp: x"}})
        + "\n")
    lines = aot_table.table(str(out)).splitlines()
    assert len(lines) == 4
    # (16 - 1) GiB of room over 2 GiB / 8 images: 60 per device
    assert lines[2] == ("| mae_vit_b | v5e:2x2 (data 4) | bfloat16 | dots | 32 (8) | 3.0 / 16.0 "
                        "GiB | yes, ~60 per device | AR 0.50 GB |  | 12 s |")
    assert "error: mesh.fsdp: x" in lines[3]
    # an override beyond dtype and mesh is named with the recipe
    row["overrides"].append("--config.optim.grad_accum_steps=2")
    out.write_text(json.dumps({"row": row, "wall_s": 1, "result": ok}) + "\n")
    assert "| mae_vit_b `optim.grad_accum_steps=2` | v5e:2x2" in aot_table.table(str(out))
    # --fit's answer where its search closed; where its compiles ran out, what it found
    for exact, says in ((True, "yes, at most 58 per device"), (False, "yes, 58 per device or "
                                                                      "more")):
        fitted = {**ok, "fit_per_device_batch": 58, "fit_exact": exact}
        out.write_text(json.dumps({"row": row, "wall_s": 1, "result": fitted}) + "\n")
        assert f"| {says} |" in aot_table.table(str(out))
    # --targets: any target for the recipes asked for; an L/H recipe needs its FSDP size there
    a100 = list(aot_table.rows(only=("mae_vit_b",), targets=("a100:1x1x8",)))
    assert [(r["topology"], r["dtype"]) for r in a100] == [("a100:1x1x8", "bfloat16"),
                                                           ("a100:1x1x8", "float32")]
    with pytest.raises(SystemExit, match="a100:1x1x8: no FSDP size"):
        list(aot_table.rows(only=("mae_vit_l",), targets=("a100:1x1x8",)))
