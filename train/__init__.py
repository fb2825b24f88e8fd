"""Training stack for every zoo family: objectives -> step -> data -> checkpoints -> loop.

    state = train.create_state(cfg, train.Hparams(...), seed, mesh)
    batch = objective(key, rows)              # train.make_objective(...)
    state, metrics = train.step(state, batch)
"""

from train.objectives import Objective, check_objective, make_objective
from train.optim import Hparams, decay_mask, make_optimizer, schedule
from train.step import (TrainState, abstract_state, batch_shardings, create_state, eval_step,
                        init_state, jit_eval_step, jit_step, state_shardings, step)

__all__ = ["Hparams", "Objective", "TrainState", "abstract_state", "batch_shardings",
           "check_objective", "create_state", "decay_mask", "eval_step", "init_state",
           "jit_eval_step", "jit_step", "make_objective", "make_optimizer", "schedule",
           "state_shardings", "step"]
