import math

import pytest
import torch

from pyro_vae import Config
from pyro_vae.schedules import (
    LR_SCHEDULES,
    EarlyStopping,
    iwae_lr_factor,
    make_lr_scheduler,
    step_lr_scheduler,
)

LR = 1e-3


def optimizer(lr: float = LR) -> torch.optim.Optimizer:
    return torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def epoch_lrs(config: Config, valid_elbos: list[float]) -> list[float]:
    """The learning rate of each epoch (from 1) of ``config.lr_schedule`` when the epochs
    measure ``valid_elbos``."""
    opt = optimizer(config.lr)
    scheduler = make_lr_scheduler(opt, config)
    lrs = []
    for value in valid_elbos:
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        step_lr_scheduler(scheduler, {"valid_elbo": value})
    return lrs


def test_iwae_schedule_is_3_to_the_i_epochs_at_lr_times_10_to_the_minus_i_over_7():
    stages = [LR * 10 ** (-i / 7) for i in range(8) for _ in range(3**i)]
    assert len(stages) == 3280
    expected = stages + [LR / 10] * 20  # the last stage's rate after the 3280 epochs
    lrs = epoch_lrs(Config(lr=LR, lr_schedule="iwae"), [0.0] * len(expected))
    assert lrs == pytest.approx(expected, rel=1e-12, abs=0)
    # The stage boundaries, epoch by epoch: 1 | 2 3 4 | 5 ... 13 | 14 ...
    assert [iwae_lr_factor(e) == iwae_lr_factor(e - 1) for e in (2, 3, 4, 5, 13, 14)] == [
        False,
        True,
        True,
        False,
        True,
        False,
    ]


@pytest.mark.parametrize("gamma", [0.5, 0.99, 1.0])
def test_exponential_schedule_is_lr_times_gamma_to_the_epochs_done(gamma):
    lrs = epoch_lrs(Config(lr=LR, lr_schedule="exponential", lr_decay=gamma), [0.0] * 6)
    assert lrs == pytest.approx([LR * gamma**e for e in range(6)], rel=1e-12, abs=0)


def test_constant_schedule_keeps_the_rate():
    assert epoch_lrs(Config(lr=LR), [-3.0, -5.0, -4.0, -6.0]) == [LR] * 4


def test_plateau_schedule_lowers_the_rate_after_patience_epochs_without_a_rise():
    config = Config(
        lr=LR,
        lr_schedule="plateau",
        validation_size=10,
        plateau_factor=0.5,
        plateau_patience=1,
    )
    # Epoch:      1      2      3      4      5      6      7      8
    elbos = [-50.0, -40.0, -41.0, -42.0, -39.0, -39.0, -39.0, -39.0]
    # A rise at 2 and 5 (-39 again is no rise); two epochs without one halve the rate.
    expected = [LR, LR, LR, LR, LR / 2, LR / 2, LR / 2, LR / 4]
    assert epoch_lrs(config, elbos) == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize("name", sorted(LR_SCHEDULES))
def test_every_schedule_continues_exactly_from_its_state_dict(name):
    config = Config(lr=LR, lr_schedule=name, validation_size=10, lr_decay=0.7, plateau_patience=0)
    elbos = [-5.0, -4.0, -4.5, -4.6, -3.0, -3.5, -3.6, -3.7]
    expected = epoch_lrs(config, elbos)
    opt = optimizer()
    scheduler = make_lr_scheduler(opt, config)
    for value in elbos[:3]:
        opt.step()
        step_lr_scheduler(scheduler, {"valid_elbo": value})
    saved = opt.state_dict(), scheduler.state_dict()
    # As fit resumes: a fresh optimizer and scheduler, then the optimizer state, then the
    # scheduler's.
    resumed = optimizer()
    resumed_scheduler = make_lr_scheduler(resumed, config)
    resumed.load_state_dict(saved[0])
    resumed_scheduler.load_state_dict(saved[1])
    lrs = []
    for value in elbos[3:]:
        lrs.append(resumed.param_groups[0]["lr"])
        resumed.step()
        step_lr_scheduler(resumed_scheduler, {"valid_elbo": value})
    assert lrs == expected[3:]
    if name != "constant":
        assert len(set(expected)) > 1, expected  # the case does change the rate


def test_early_stopping_counts_epochs_without_a_new_best():
    stopping = EarlyStopping(patience=2)
    improved = [stopping.update(e, v) for e, v in enumerate([-5.0, -4.0, -4.0, -3.0, -3.5], 1)]
    assert improved == [True, True, False, True, False]
    assert (stopping.best, stopping.best_epoch, stopping.bad_epochs) == (-3.0, 4, 1)
    assert not stopping.stopped
    stopping.update(6, -3.1)
    assert stopping.stopped
    restored = EarlyStopping(patience=2)
    restored.load_state_dict(stopping.state_dict())
    assert restored == stopping
    never = EarlyStopping()
    for epoch in range(1, 20):
        never.update(epoch, -float(epoch))
    assert not never.stopped and never.best_epoch == 1 and never.best == -1.0
    assert EarlyStopping().best == -math.inf


def test_unknown_schedule_error():
    with pytest.raises(ValueError, match=r"unknown lr_schedule 'cosine'; choose one of \["):
        Config(lr_schedule="cosine")
