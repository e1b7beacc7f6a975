"""The experiment: what a run is, built once from its config, task and mesh.

    exp = experiment.build(config, mesh, task=task, steps_per_epoch=data.steps_per_epoch)
    state = exp.init_state()                       # born sharded (or restore exp.abstract_state)
    state, metrics = exp.train_step(state, batch)  # jitted: shardings, donation, remat, scan

Every tool that runs or compiles the train step builds one: `mixmae-pretrain` and
`mixmae-finetune` (train/trainer.py), `mixmae-bench` (timed on the host, or compiled ahead of
time for a TPU or GPU target: train/aot.py), the GPU check and `mixmae-convert from-torch`.
Nothing here allocates a parameter: the state is described abstractly (shapes, dtypes and
shardings) until `init_state` or a checkpoint restore fills it.

A task (pretraining or fine-tuning, `mixmae_jax/tasks/`) says what differs: the model it builds,
the objective the step minimises (`make_plan` + `loss`), the optimizer, extra state entries and
the keys of a batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from mixmae_jax.train import sharding
from mixmae_jax.train import step as step_lib


class Task(Protocol):
    """What the experiment needs of a task (`mixmae_jax.tasks.pretrain` / `.finetune`)."""

    kind: str  # "pretraining" | "fine-tuning", for messages
    batch_keys: tuple[str, ...]  # what the input yields and the step takes
    method: Any  # the config's `methods.<name>.Method`
    objective: Any  # `make_plan(rng, batch_size, num_groups)` and `loss(model, batch, plan, ...)`

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module: ...

    def make_optimizer(self, abstract_params, steps_per_epoch: int): ...

    def extra_state(self) -> dict[str, Callable[[], jax.Array]]: ...


@dataclasses.dataclass(frozen=True)
class Experiment:
    config: ml_collections.ConfigDict
    task: Task
    mesh: jax.sharding.Mesh
    graphdef: Any  # the model's static structure (nnx.GraphDef)
    tx: optax.GradientTransformation
    lr_schedule: Callable[[Any], Any]
    init_fn: Callable  # (params=None) -> a fresh state (host params: start from those)
    abstract_state: Any  # ShapeDtypeStructs carrying the state's shardings
    steps_per_epoch: int

    @property
    def method(self):
        return self.task.method

    @property
    def state_shardings(self):
        return jax.tree.map(lambda x: x.sharding, self.abstract_state)

    @property
    def abstract_params(self):
        return self.abstract_state["params"]

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_params))

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def batch_sharding(self) -> jax.sharding.NamedSharding:
        return sharding.batch_sharding(self.mesh)

    def abstract_batch(self, batch_size: int | None = None) -> dict:
        """The global batch the step takes, as ShapeDtypeStructs (uint8 images, int32 labels)."""
        b = self.config.batch_size if batch_size is None else batch_size
        s = self.config.model.img_size
        shapes = {"image": ((b, s, s, 3), jnp.uint8), "label": ((b,), jnp.int32)}
        return {k: jax.ShapeDtypeStruct(*shapes[k], sharding=self.batch_sharding)
                for k in self.task.batch_keys}

    def init_state(self, params=None):
        """A fresh state, born sharded (params: host arrays to start from instead)."""
        return jax.jit(self.init_fn, out_shardings=self.state_shardings)(params)

    @functools.cached_property
    def train_step(self):
        """The jitted `(state, batch) -> (state, metrics)`: batch over every mesh axis, state
        donated (a checkpoint save holds its own copy first)."""
        return self._jit_step(donate=True)

    def train_step_without_donation(self):
        """The same step keeping its input state (analyses that lower it more than once)."""
        return self._jit_step(donate=False)

    def _jit_step(self, *, donate: bool):
        step = step_lib.make_train_step(self.config, self.task.objective, self.graphdef,
                                        self.tx, self.lr_schedule, self.num_devices)

        def step_in_mesh(state, batch):  # the sharding hints of mixmae_jax.parallel see it
            with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
                return step(state, batch)

        batch_sh = {k: self.batch_sharding for k in self.task.batch_keys}
        return jax.jit(step_in_mesh, in_shardings=(self.state_shardings, batch_sh),
                       out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                       donate_argnums=(0,) if donate else ())


def build(config, mesh: jax.sharding.Mesh, *, task: Task, steps_per_epoch: int) -> Experiment:
    """The experiment of `task` on `mesh`; nothing is allocated (jax.eval_shape)."""
    graphdef, abstract_params = step_lib.graphdef_and_abstract_params(task.method,
                                                                      task.build_model)
    tx, lr_schedule = task.make_optimizer(abstract_params, steps_per_epoch)
    init_fn = step_lib.make_init_fn(task.method, tx, config.seed, build=task.build_model,
                                    extra=task.extra_state())
    # From the abstract params: the state's shapes without building the model a second time
    # (a build under tracing costs seconds at full size).
    abstract = jax.eval_shape(init_fn, abstract_params)
    shardings = sharding.state_shardings(abstract, mesh, tuple(config.sharding_rules))
    return Experiment(config=config, task=task, mesh=mesh, graphdef=graphdef, tx=tx,
                      lr_schedule=lr_schedule, init_fn=init_fn,
                      abstract_state=sharding.abstract_with_shardings(abstract, shardings),
                      steps_per_epoch=steps_per_epoch)
