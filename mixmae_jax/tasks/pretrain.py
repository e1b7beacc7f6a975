"""Pretraining: the method's model and loss (`methods/`), its optimizer, and the evaluators the
config declares (typically the k-NN monitor). Also the base of every task: the defaults a task
overrides."""

from __future__ import annotations

from mixmae_jax import config as config_lib
from mixmae_jax import eval as eval_lib
from mixmae_jax.methods import get_method
from mixmae_jax.train import optim


class Task:
    """What a run does (see `tasks/__init__.py`); the trainer calls these hooks."""

    kind = "pretraining"
    batch_keys: tuple[str, ...] = ("image",)  # what the input yields and the step takes

    def __init__(self, config):
        self.config = config
        self.method = get_method(config)

    def check_config(self, num_devices: int, process_count: int) -> None:
        """The config's checks for this many devices and processes (ConfigError naming a key);
        nothing is read or compiled."""
        config_lib.validate(self.config, num_devices=num_devices, process_count=process_count)
        eval_lib.check_config(self.config, num_devices=num_devices,
                              process_count=process_count)

    def check_data(self) -> None:
        """Checks of the data set the config names, before anything compiles."""

    def check_init(self) -> None:
        """Checks of what a fresh run's params start from (`initial_params`), before anything
        is written or compiled."""

    def input_options(self) -> dict:
        """Extra `create_train_iterator` arguments (fine-tuning: labels, RandAugment)."""
        return {}

    def build_model(self, rngs):
        return self.method.build_model(rngs)

    @property
    def objective(self):
        """`make_plan` and `loss` for the train step."""
        return self.method

    def make_optimizer(self, abstract_params, steps_per_epoch: int):
        return optim.make_optimizer(self.config, steps_per_epoch)

    def extra_state(self) -> dict:
        """More train-state entries ({name: () -> array}); checkpointed with it."""
        return {}

    def initial_params(self, abstract_params, run):
        """Params a fresh run starts from (host arrays), or None for a random init."""
        return None

    def evaluators(self, exp) -> list:
        return eval_lib.build(self.config, exp)

    def after_eval(self, exp, step: int, state, name: str, results: dict, run):
        """(state, a note for the log line) after evaluator `name` ran at `step`."""
        return state, ""

    def finish(self, exp, state, evaluators, last_results: dict, run) -> dict:
        """Summary metrics at the end of a run; `last_results`: each evaluator's newest."""
        return {}


class PretrainTask(Task):
    pass
