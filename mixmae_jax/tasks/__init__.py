"""What a run does, beside the loop that runs it: pretraining (`pretrain.py`) and fine-tuning
(`finetune.py`) are tasks of the one trainer (`train/trainer.py`), found from `config.task`.

A task owns what differs: the model it builds, the objective of the step, the optimizer, extra
state, the data's extra features, where its params start, its evaluators (`config.evals`) and
what it does with their results. The trainer owns the rest: devices, checkpoints, resume,
metrics, preemption.
"""

from __future__ import annotations

from mixmae_jax.train import checkpoint as ckpt_lib
from mixmae_jax.train import experiment, sharding

KINDS = ("pretrain", "finetune")


def for_config(config):
    """The task of a config: fine-tuning when `config.task == "finetune"`, else pretraining."""
    kind = config.get("task", "pretrain")
    if kind not in KINDS:
        from mixmae_jax.config import ConfigError

        raise ConfigError(f"task: {kind!r}, one of {', '.join(KINDS)}")
    if kind == "finetune":
        from mixmae_jax.tasks.finetune import FinetuneTask

        return FinetuneTask(config)
    from mixmae_jax.tasks.pretrain import PretrainTask

    return PretrainTask(config)


def build_experiment(config, devices=None, *, steps_per_epoch: int = 1000):
    """The experiment of `config` on `devices` (default: this host's), its config checked as the
    trainer checks it, the dataset aside: for tools that compile or run the step on synthetic
    data (the bench, its ahead-of-time mode, the GPU check). `steps_per_epoch` only shapes the
    schedule."""
    mesh = sharding.make_mesh(config.mesh, devices)
    task = for_config(config)
    processes = len({d.process_index for d in mesh.devices.flat})
    task.check_config(mesh.devices.size, processes)
    return experiment.build(config, mesh, task=task, steps_per_epoch=steps_per_epoch)


def train(config, workdir: str, **kwargs) -> dict:
    """`trainer.train` of the config's task (`mixmae-pretrain`, `mixmae-finetune`)."""
    from mixmae_jax.train import trainer

    return trainer.train(config, workdir, for_config(config), **kwargs)


def restore_params(workdir: str, step: int | None = None, *, best: bool = False,
                   pretraining_only: bool = False):
    """(config, params, step) of a run's checkpoint, on this host's devices (for tools): the
    params only, not the optimizer moments. best: a fine-tuning run's best-top-1 params;
    pretraining_only: refuse a fine-tuning run (tools that need the pretraining model)."""
    config = ckpt_lib.load_config_snapshot(workdir)
    if pretraining_only and config.get("task", "pretrain") == "finetune":
        raise ValueError(f"--workdir {workdir}: a fine-tuning run (its classifier has no "
                         "decoder); this tool reads pretraining runs")
    if best and config.get("task", "pretrain") != "finetune":
        raise ValueError(f"--best: {workdir} is a pretraining run; only fine-tuning keeps a "
                         "best checkpoint")
    exp = experiment.build(config, sharding.single_device_mesh(), task=for_config(config),
                           steps_per_epoch=1)
    ckpt = ckpt_lib.Checkpointer(workdir, save_every=0, keep=0, read_only=True,
                                 subdir=ckpt_lib.BEST_DIR if best else ckpt_lib.CHECKPOINT_DIR)
    try:
        steps = ckpt.all_steps()
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}")
        if step not in steps:
            raise FileNotFoundError(f"--step {step}: no such checkpoint in {workdir} (steps: "
                                    f"{', '.join(map(str, steps)) or 'none'})")
        try:
            params = ckpt.restore_params(step, exp.abstract_params)
        except Exception as e:  # noqa: BLE001 - any read failure: name the step and the others
            others = [s for s in steps if s != step]
            reason = ckpt_lib.read_error_cause(e)
            raise ValueError(
                f"checkpoint step {step} in {ckpt.directory / str(step)} cannot be read "
                f"({reason}); other steps: {', '.join(map(str, others)) or 'none'} (--step N)"
            ) from e
    finally:
        ckpt.close()
    return config, params, int(step)
