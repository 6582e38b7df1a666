"""What changes between epochs: the learning-rate schedules and early stopping.

Both are stepped once per epoch, after its metrics row, and both keep their state in the
checkpoint (:meth:`torch.optim.lr_scheduler.LRScheduler.state_dict` and
:meth:`EarlyStopping.state_dict`), so a resumed run continues them exactly. A schedule is a
torch scheduler over the optimizer's learning rate; the rate of epoch ``e`` (counted from 1)
is the optimizer's rate during that epoch, which :func:`~pyro_vae.train.fit` records in the
``lr`` column.

References:

[1] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan Salakhutdinov (2016),
    section 5: the ``iwae`` schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ExponentialLR, LambdaLR, LRScheduler, ReduceLROnPlateau

from pyro_vae.checks import check_choice

if TYPE_CHECKING:
    from pyro_vae.config import Config

#: Stages of the ``iwae`` schedule: stage i lasts 3**i epochs at lr * 10**(-i / 7).
IWAE_STAGES = 8


def iwae_lr_factor(epoch: int) -> float:
    """The factor on the learning rate in ``epoch`` (from 1) of the IWAE paper's schedule.

    Stage ``i = 0, ..., 7`` lasts ``3**i`` epochs at ``10**(-i / 7)``, 3280 epochs in all;
    later epochs stay at the last stage's factor, 0.1.

    >>> [round(iwae_lr_factor(e), 4) for e in (1, 2, 4, 5)]
    [1.0, 0.7197, 0.7197, 0.518]
    """
    stage, last = 0, 1  # last: the final epoch of the stage
    while epoch > last and stage < IWAE_STAGES - 1:
        stage += 1
        last += 3**stage
    return 10 ** (-stage / (IWAE_STAGES - 1))


def _constant(optimizer: Optimizer, config: Config) -> LRScheduler:
    return LambdaLR(optimizer, lambda epoch: 1.0)


def _iwae(optimizer: Optimizer, config: Config) -> LRScheduler:
    # LambdaLR counts the epochs done (0 in the first epoch); the stages count from epoch 1.
    return LambdaLR(optimizer, lambda epoch: iwae_lr_factor(epoch + 1))


def _exponential(optimizer: Optimizer, config: Config) -> LRScheduler:
    return ExponentialLR(optimizer, gamma=config.lr_decay)


def _plateau(optimizer: Optimizer, config: Config) -> LRScheduler:
    # An absolute threshold of 0: any rise of valid_elbo is an improvement, as for early
    # stopping (torch's default relative threshold misjudges negative ELBOs).
    return ReduceLROnPlateau(
        optimizer,
        mode="max",
        factor=config.plateau_factor,
        patience=config.plateau_patience,
        threshold=0.0,
        threshold_mode="abs",
    )


def make_lr_scheduler(optimizer: Optimizer, config: Config) -> LRScheduler:
    """The scheduler of ``config.lr_schedule`` over ``optimizer``; step it with
    :func:`step_lr_scheduler` after every epoch.

    :raises ValueError: if the schedule is unknown.
    """
    check_choice("lr_schedule", config.lr_schedule, LR_SCHEDULES)
    return LR_SCHEDULES[config.lr_schedule](optimizer, config)


def step_lr_scheduler(scheduler: LRScheduler, row: dict) -> None:
    """Step ``scheduler`` at the end of the epoch whose metrics are ``row`` (``plateau`` reads
    its ``valid_elbo``)."""
    if isinstance(scheduler, ReduceLROnPlateau):
        scheduler.step(row["valid_elbo"])
    else:
        scheduler.step()


@dataclass
class EarlyStopping:
    """The best ``valid_elbo`` so far, and when to stop.

    :param patience: stop after this many epochs without a higher ``valid_elbo``; ``None``
        never stops (the best epoch is still tracked, for ``best.pt``).
    """

    patience: int | None = None
    best: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, epoch: int, value: float) -> bool:
        """Record the ``valid_elbo`` of ``epoch``; returns whether it is a new best."""
        if value > self.best:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def stopped(self) -> bool:
        """Whether training should stop: ``patience`` epochs in a row without a new best."""
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])


#: The learning-rate schedules by name: ``(optimizer, config) -> scheduler``.
LR_SCHEDULES: dict[str, Callable[[Optimizer, Config], LRScheduler]] = {
    "constant": _constant,
    "iwae": _iwae,
    "exponential": _exponential,
    "plateau": _plateau,
}

#: The schedules that read ``valid_elbo``, and so need a validation split.
NEEDS_VALIDATION = ("plateau",)
