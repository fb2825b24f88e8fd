"""Training stack for every zoo family: objectives -> step -> data -> checkpoints -> loop.

    state = train.create_state(cfg, train.Hparams(...), seed, mesh)
    batch = objective(key, rows)              # train.make_objective(...)
    state, metrics = train.step(state, batch)

On a mesh (the pjit path) or with pmap, `train.make_runner(cfg, hp, mesh, batch_like,
"jit" | "pmap")` gives the step with its shardings (train/parallel.py).
"""

from train.objectives import Objective, check_objective, make_objective
from train.optim import Hparams, decay_mask, make_optimizer, schedule
from train.parallel import Runner, build_mesh, make_runner, rules_from
from train.step import (TrainState, abstract_state, batch_shardings, create_state, eval_step,
                        init_state, jit_eval_step, jit_step, pmap_eval_step, pmap_step,
                        state_shardings, step)

__all__ = ["Hparams", "Objective", "Runner", "TrainState", "abstract_state", "batch_shardings",
           "build_mesh", "check_objective", "create_state", "decay_mask", "eval_step", "init_state",
           "jit_eval_step", "jit_step", "make_objective", "make_optimizer", "make_runner",
           "pmap_eval_step", "pmap_step", "rules_from", "schedule", "state_shardings", "step"]
