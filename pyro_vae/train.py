"""Stochastic variational inference: the training loop.

It knows nothing about which prior, likelihood or guide is inside the VAE: it asks the ELBO
registry for a loss, takes minibatches from :mod:`pyro_vae.data` and steps a torch optimizer
over the module's parameters. This is SVI written with the ELBO's ``differentiable_loss``, the
form that :func:`torch.compile` and DistributedDataParallel work with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pyro
import torch

from pyro_vae.config import Config
from pyro_vae.data import Dataset, check_finite, iterate_batches, split_validation
from pyro_vae.describe import build_vae, is_buildable, record_model
from pyro_vae.devices import fork_rng, set_rng_state
from pyro_vae.distributed import (
    DataParallel,
    check_resumed_world,
    data_parallel,
    is_main_process,
    record_world,
)
from pyro_vae.estimators import AnalyticKLWarning, sampled_kl_sites
from pyro_vae.objectives import get_elbo, is_importance_weighted
from pyro_vae.runs import (
    BEST_FILE,
    load_model_state,
    save_checkpoint,
    save_config,
    write_metrics,
)
from pyro_vae.schedules import EarlyStopping, make_lr_scheduler, step_lr_scheduler
from pyro_vae.vae import VAE

logger = logging.getLogger(__name__)

#: Datapoints per forward pass when evaluating; bounds memory, not results.
EVAL_BATCH_SIZE = 2000

#: The checkpoint keys of the learning-rate scheduler and of early stopping.
SCHEDULES = ("lr_scheduler", "early_stopping")

#: The evaluation columns of the metrics rows, and how errors call them.
TEST_METRICS = {
    "valid_elbo": "validation ELBO",
    "test_elbo": "test ELBO",
    "test_iwae": "test IWAE bound",
}


def kl_weight(config: Config, step: int, steps_per_epoch: int) -> float:
    """beta times a linear warm-up from 0 to 1 over ``config.warmup_epochs`` epochs.

    References:

    [1] `Ladder Variational Autoencoders`, Casper Kaae Sonderby et al. (2016).
    [2] `beta-VAE: Learning Basic Visual Concepts with a Constrained Variational Framework`,
        Irina Higgins et al. (2017).
    """
    if config.warmup_epochs == 0:
        return config.beta
    return config.beta * min(1.0, (step + 1) / (config.warmup_epochs * steps_per_epoch))


def check_dataset(vae: VAE, dataset: Dataset, binarize: str) -> None:
    """Raise :class:`ValueError` if the data do not fit the model's input size or likelihood."""
    for split, x in (("train", dataset.train_x), ("test", dataset.test_x)):
        vae.check_input(x)
        # One pass over the data: NaN propagates into the bounds, so finite bounds mean
        # finite data (check_finite then names the bad rows).
        low, high = torch.aminmax(x) if x.numel() else (x.new_zeros(()), x.new_zeros(()))
        if not (torch.isfinite(low) and torch.isfinite(high)):
            check_finite(x, f"dataset.{split}_x")
        if split == "train" and binarize == "dynamic":
            # Grey levels are Bernoulli probabilities here, binarized batch by batch.
            if low < 0 or high > 1:
                raise ValueError(
                    "dynamic binarization needs training data in [0, 1], but dataset.train_x "
                    f"lies in [{low.item():.4g}, {high.item():.4g}]; rescale it or set "
                    "config.binarize 'none'"
                )
        else:
            vae.likelihood.check_data(x)


def prepare_fit(vae: VAE, dataset: Dataset, config: Config) -> Config:
    """Check every input of :func:`fit` and return ``config`` completed from them.

    The completed config records how the data were binarized and the model that is trained
    (see :func:`~pyro_vae.describe.record_model`), with ``image_shape`` from the data set. This
    runs before a run folder is written, so bad input never leaves a half-made run behind.

    :returns: the completed config (``config`` itself is never changed).
    :raises TypeError: if ``dataset`` or ``config`` is of the wrong type, or the data are not
        floating point.
    :raises ValueError: naming the first bad setting or data problem.
    :raises ~pyro_vae.distributed.WorldSizeError: if the processes of a data-parallel run do not
        divide ``config.batch_size`` (see :func:`~pyro_vae.distributed.record_world`).
    """
    if not isinstance(config, Config):
        raise TypeError(f"config must be a pyro_vae Config, got {type(config).__name__}")
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"dataset must be a pyro_vae Dataset (see load_dataset), got {type(dataset).__name__}"
        )
    # The data were binarized when loaded: config.json must say how, or a resumed run would
    # reload them differently.
    if config.binarize is not None and config.binarize != dataset.binarize:
        raise ValueError(
            f"config.binarize is {config.binarize!r} but the dataset was loaded with "
            f"binarize={dataset.binarize!r}; load it with load_dataset(..., "
            f"binarize={config.binarize!r}) or leave config.binarize unset"
        )
    config = record_world(record_model(config, vae))
    config = dataclasses.replace(
        config, binarize=dataset.binarize, image_shape=list(dataset.image_shape)
    )
    check_dataset(vae, dataset, config.binarize)
    num_train = dataset.train_x.shape[0]
    if config.validation_size >= num_train:
        raise ValueError(
            f"validation_size {config.validation_size} holds out all {num_train} training "
            f"datapoints of {dataset.name!r}; set config.validation_size below {num_train}"
        )
    num_train -= config.validation_size
    if config.batch_size > num_train:
        held_out = " left after the validation split" if config.validation_size else ""
        raise ValueError(
            f"batch_size {config.batch_size} is larger than the {num_train} training datapoints "
            f"of {dataset.name!r}{held_out}; set config.batch_size to at most {num_train}"
        )
    return config


def warn_if_kl_is_sampled(vae: VAE, x: torch.Tensor) -> tuple[str, ...]:
    """Warn, naming the sites, if ``TraceMeanField_ELBO`` would sample KL terms of ``vae``.

    Pyro's mean-field ELBO falls back to the Monte Carlo KL, silently, for every latent site
    whose KL has no closed form (mixture, VampPrior and Student-t priors, flow guides); this
    says so instead, with an :class:`~pyro_vae.estimators.AnalyticKLWarning`. Leaves the global
    random state alone.

    :returns: the latent sites whose KL is sampled.
    """
    sites = sampled_kl_sites(vae.model, vae.guide, x)
    if sites:
        warnings.warn(
            f"config.elbo meanfield: KL(q || p) has no closed form for latent site(s) "
            f"{list(sites)} of this model (prior {type(vae.prior).__name__}, "
            f"guide {type(vae.guide_family).__name__}), so TraceMeanField_ELBO samples it: "
            "training there is the Monte Carlo ELBO (config.elbo trace)",
            AnalyticKLWarning,
            stacklevel=3,
        )
    return sites


def check_config_describes(vae: VAE, config: Config) -> None:
    """Raise :class:`ValueError` unless ``config`` rebuilds a model that ``vae``'s weights fit.

    A run folder is only useful if :func:`~pyro_vae.runs.load_run` can rebuild its model from
    the saved config, so this is checked before training rather than discovered when loading.
    """
    with fork_rng():  # building the model must not move the RNG
        expected = {k: tuple(v.shape) for k, v in build_vae(config).state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    if expected != actual:
        diff = sorted(set(expected.items()) ^ set(actual.items()))[0][0]
        raise ValueError(
            f"the config describes another model than the VAE being trained (they differ at "
            f"{diff!r}); set config.latent_dim, config.hidden_dims, config.prior, "
            "config.likelihood, config.guide and their options to those of the VAE, so that "
            "load_run can rebuild it"
        )


@torch.no_grad()
def evaluate_elbo(
    vae: VAE,
    x: torch.Tensor,
    elbo: str = "trace",
    num_particles: int = 1,
    parallel: DataParallel | None = None,
) -> float:
    """Mean per datapoint (nats) of the bound that the objective ``elbo`` estimates, at KL
    weight 1, without touching the parameters: the ELBO, or for an importance-weighted
    objective (:func:`~pyro_vae.objectives.is_importance_weighted`: ``iwae``, ``dreg``) the
    IWAE bound with K = ``num_particles``.

    :param VAE vae: the model.
    :param torch.Tensor x: data, ``(N, data_dim)``.
    :param str elbo: a key of :data:`~pyro_vae.objectives.ELBOS`.
    :param int num_particles: samples of z per datapoint.
    :param parallel: in data-parallel training, each rank evaluates its
        :meth:`~pyro_vae.distributed.DataParallel.shard` of ``x``, and every rank returns the
        mean over all of ``x``.
    """
    vae.check_input(x)
    loss_fn = get_elbo(elbo, num_particles)
    if parallel is not None:
        x = parallel.shard(x)
    total, count = torch.zeros((), device=x.device), x.shape[0]
    with vae.kl_weight(1.0):
        for chunk in x.split(EVAL_BATCH_SIZE):
            total += loss_fn.differentiable_loss(vae.model, vae.guide, chunk)
    if parallel is not None:
        total, count = parallel.sum(total, count)
    return -total.item() / count


def default_optimizer(vae: VAE, config: Config) -> torch.optim.Optimizer:
    """Adam at ``config.lr`` (with ``config.adam_betas`` and ``config.adam_eps``) over the VAE's
    parameters, in torch's fused implementation (one kernel for all parameters) where the
    parameters' device has one, else torch's default."""
    device = next(vae.parameters()).device
    fused = device.type in ("cpu", "cuda") or None
    betas, eps = tuple(config.adam_betas), config.adam_eps
    return torch.optim.Adam(vae.parameters(), lr=config.lr, betas=betas, eps=eps, fused=fused)


def pyro_checks(config: Config, first: bool) -> contextlib.AbstractContextManager:
    """Where Pyro's validation runs in training (``config.validation``): as the user set it on
    the first step of each epoch, or on every step; off for the other steps and the test ELBO
    (the data were checked whole before training)."""
    if first or config.validation == "every_step":
        return contextlib.nullcontext()
    return pyro.validation_enabled(False)


def diverged(
    loss: float | str, epoch: int, step: int, what: str = "the loss"
) -> FloatingPointError:
    """The error for a loss (or parameters) that stopped being finite at ``step`` of ``epoch``."""
    return FloatingPointError(
        f"{what} became {loss} at epoch {epoch}, step {step + 1}; "
        "try a lower config.lr or set config.clip_norm"
    )


def train_epoch(
    vae: VAE,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    config: Config,
    epoch: int,
    step: int,
    stop: Callable[[int], bool] | None = None,
    parallel: DataParallel | None = None,
) -> tuple[float, int]:
    """One pass over ``x`` in random minibatches.

    :param stop: called with the global step counter after every step; the pass ends early
        when it returns ``True`` (a budget of time or steps; in data-parallel training it must
        answer the same on every rank).
    :param parallel: for data-parallel training: this rank's share of each global batch of
        ``config.batch_size`` rows, its loss through DDP, and the mean over all ranks.
    :returns: the mean training objective per datapoint seen (the ELBO at the current KL
        weight, or the IWAE bound for an importance-weighted objective) and the updated global
        step counter.
    :raises FloatingPointError: if the loss is NaN or infinite; the parameters are not updated.
    """
    loss_fn = get_elbo(config.elbo, config.num_particles)
    binarize = config.binarize == "dynamic"
    if parallel is None:
        steps_per_epoch = math.ceil(x.shape[0] / config.batch_size)
        batches = iterate_batches(x, config.batch_size, shuffle=True, binarize=binarize)
    else:
        steps_per_epoch, batches = parallel.batches(x, config.batch_size, epoch, step, binarize)
    total, seen = torch.zeros((), device=x.device), 0
    for i, batch in enumerate(batches):
        vae.kl_scale = kl_weight(config, step, steps_per_epoch)
        try:
            with pyro_checks(config, first=i == 0):
                if parallel is None:
                    loss = loss_fn.differentiable_loss(vae.model, vae.guide, batch)
                else:
                    loss = parallel.loss(batch)
        except ValueError as e:
            # With validation on, distributions refuse NaN parameters before the loss exists.
            if all(torch.isfinite(p).all() for p in vae.parameters()):
                raise
            raise diverged("nan", epoch, step) from e
        if not torch.isfinite(loss):
            raise diverged(loss.item(), epoch, step)
        optimizer.zero_grad(set_to_none=True)
        if parallel is None:
            loss.backward()
        else:
            parallel.backward(loss)
        if config.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), config.clip_norm)
        optimizer.step()
        total += loss.detach()
        seen += batch.shape[0]
        step += 1
        if stop is not None and stop(step):
            break
    if parallel is not None:
        total, seen = parallel.sum(total, seen)
    # The last step's update is not seen by a next loss: check it before anything is saved.
    if not all(torch.isfinite(p).all() for p in vae.parameters()):
        raise diverged("non-finite", epoch, step - 1, what="the parameters")
    return -total.item() / seen, step


def restore_checkpoint(
    vae: VAE,
    optimizer: torch.optim.Optimizer,
    checkpoint: dict,
    config: Config,
    device: torch.device,
    schedules: tuple[torch.optim.lr_scheduler.LRScheduler, EarlyStopping] | None = None,
) -> tuple[int, int]:
    """Put weights, optimizer state, the learning-rate scheduler and early stopping
    (``schedules``, made for this run before the optimizer state is loaded) and RNG state back;
    returns the epoch and step reached.

    The RNG is restored last, so nothing between here and the next training step draws from it.
    """
    if checkpoint["epoch"] > config.epochs:
        raise ValueError(
            f"the checkpoint is at epoch {checkpoint['epoch']} but config.epochs is "
            f"{config.epochs}; ask for at least {checkpoint['epoch']} epochs (config.epochs)"
        )
    check_resumed_world(checkpoint["config"])
    load_model_state(vae, checkpoint["model"], hint="; was config.json edited? Restore it")
    optimizer.load_state_dict(checkpoint["optimizer"])
    if schedules is not None and "lr_scheduler" in checkpoint:
        for key, schedule in zip(SCHEDULES, schedules):
            schedule.load_state_dict(checkpoint[key])
    set_rng_state(checkpoint["rng"], device)
    return checkpoint["epoch"], checkpoint["step"]


def fit(
    vae: VAE,
    dataset: Dataset,
    config: Config | None = None,
    run_dir: str | Path | None = None,
    checkpoint: dict | None = None,
    metrics: list[dict] | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[dict]:
    """Train ``vae`` on ``dataset`` by SVI; optionally keep a run folder up to date.

    The data and the model live on the same device, that of ``dataset.train_x``. With
    ``run_dir``, ``config.json`` is written first, then after every epoch ``metrics.csv`` and
    ``checkpoint.pt`` (each atomically), so an interrupted run resumes from its last epoch.
    With ``config.validation_size`` images held out (:func:`~pyro_vae.data.split_validation`),
    each epoch also measures ``valid_elbo`` on them, writes ``best.pt`` (like
    ``checkpoint.pt``) whenever it is the highest so far, and with ``config.patience`` stops
    after that many epochs without a new best. The learning rate follows
    ``config.lr_schedule`` (:mod:`pyro_vae.schedules`), stepped after every epoch.
    :func:`~pyro_vae.runs.train_run` and :func:`~pyro_vae.runs.resume_run` do all of that from
    a :class:`~pyro_vae.config.Config` alone, data set and figures included.

    :param VAE vae: the model; trained in place. Its :attr:`~pyro_vae.vae.VAE.kl_scale` is
        set by the warm-up during training and put back afterwards.
    :param Dataset dataset: from :func:`~pyro_vae.data.load_dataset`.
    :param Config config: training settings (defaults if ``None``). The config that
        ``config.json`` records is this one completed by :func:`prepare_fit`: its model fields
        describe the parts the VAE really has, also when they were passed as objects, and
        ``binarize`` and ``image_shape`` come from the data set.
    :param run_dir: folder for config, metrics and checkpoints, or ``None``.
    :param dict checkpoint: a state from :func:`~pyro_vae.runs.load_checkpoint` to resume:
        weights, optimizer state, learning-rate scheduler, early stopping, epoch and step
        counters and the RNG state are restored, so the resumed run gives the same numbers as
        one that was never interrupted (and a run that stopped early stays stopped).
    :param list metrics: rows already written for the epochs before ``checkpoint``.
    :param on_epoch_end: called with each new metrics row, after the run folder is updated.
    :param optimizer: the optimizer over ``vae.parameters()``; default
        :func:`default_optimizer`, Adam at ``config.lr``.
    :returns: one row per epoch: ``epoch``, ``step``, ``kl_scale``, ``lr`` (the learning rate
        of the epoch), ``train_elbo`` (the training objective), with a validation split
        ``valid_elbo`` (the ELBO at KL weight 1 on the held-out images, as ``test_elbo``),
        ``test_elbo`` (the ELBO at KL weight 1, whatever the objective;
        nats per datapoint, higher is better) and ``seconds``; for an importance-weighted
        ``config.elbo`` (``iwae``, ``dreg``) also ``test_iwae``, the test IWAE bound with
        K = ``config.num_particles`` at KL weight 1, after ``test_elbo``.
    :raises FloatingPointError: if the loss or the parameters become NaN or infinite; the run
        folder keeps the last good epoch.

    >>> from pyro_vae import VAE, Config, fit, load_dataset
    >>> data = load_dataset("digits", binarize="dynamic")
    >>> vae = VAE(data.data_dim, latent_dim=2)
    >>> rows = fit(vae, data, Config(epochs=2))
    >>> rows[-1]["test_elbo"] < 0
    True
    """
    config = prepare_fit(vae, dataset, Config() if config is None else config)
    vae.to(dataset.train_x.device)
    if optimizer is None:
        optimizer = default_optimizer(vae, config)
    dataset, valid_x = split_validation(dataset, config.validation_size, config.validation_seed)
    schedules = make_lr_scheduler(optimizer, config), EarlyStopping(config.patience)
    start_epoch, step = _start_run(vae, dataset, config, optimizer, schedules, run_dir, checkpoint)
    parallel = data_parallel(vae, config, dataset.train_x)  # None for one process
    rows = [row for row in metrics or [] if checkpoint is None or row["epoch"] <= start_epoch]
    with vae.kl_weight(1.0):  # the warm-up sets it per step; afterwards it is as it was
        for epoch in range(start_epoch + 1, config.epochs + 1):
            if schedules[1].stopped:
                break
            row, step = _train_and_test(
                vae, optimizer, (dataset, valid_x, parallel), config, epoch, step, run_dir
            )
            rows.append(row)
            improved = _end_epoch(row, *schedules)
            if run_dir is not None and is_main_process():
                write_metrics(run_dir, rows)
                state = _schedule_state(schedules)
                if improved:  # best.pt first: a run killed between the two redoes the epoch
                    save_checkpoint(run_dir, vae, optimizer, config, epoch, step, state, BEST_FILE)
                save_checkpoint(run_dir, vae, optimizer, config, epoch, step, state)
            if on_epoch_end is not None:
                on_epoch_end(row)
    return rows


def _schedule_state(
    schedules: tuple[torch.optim.lr_scheduler.LRScheduler, EarlyStopping],
) -> dict:
    """The checkpoint entries of the learning-rate scheduler and of early stopping."""
    return {key: schedule.state_dict() for key, schedule in zip(SCHEDULES, schedules)}


def _end_epoch(
    row: dict, scheduler: torch.optim.lr_scheduler.LRScheduler, stopping: EarlyStopping
) -> bool:
    """Log the epoch's row, step the schedule and early stopping; returns whether the row's
    ``valid_elbo`` is the best so far."""
    logger.info(
        "epoch %d: train ELBO %.3f, test ELBO %.3f",
        row["epoch"],
        row["train_elbo"],
        row["test_elbo"],
    )
    improved = "valid_elbo" in row and stopping.update(row["epoch"], row["valid_elbo"])
    step_lr_scheduler(scheduler, row)
    if stopping.stopped:
        logger.info(
            "early stopping after epoch %d: the validation ELBO has not risen since epoch %d",
            row["epoch"],
            stopping.best_epoch,
        )
    return improved


def _start_run(
    vae: VAE,
    dataset: Dataset,
    config: Config,
    optimizer: torch.optim.Optimizer,
    schedules: tuple[torch.optim.lr_scheduler.LRScheduler, EarlyStopping],
    run_dir: str | Path | None,
    checkpoint: dict | None,
) -> tuple[int, int]:
    """Check the model against its config, seed or restore the run, start the run folder;
    returns the epoch and step that training starts from."""
    if config.elbo == "meanfield":
        warn_if_kl_is_sampled(vae, dataset.test_x[:2])
    # A model that config.json cannot rebuild (a custom VAE class, an unregistered part) is
    # reloaded with load_run(run_dir, vae=...) instead.
    if run_dir is not None and is_buildable(config):
        check_config_describes(vae, config)
    if checkpoint is None:
        pyro.set_rng_seed(config.seed)
        start_epoch, step = 0, 0
    else:
        start_epoch, step = restore_checkpoint(
            vae, optimizer, checkpoint, config, dataset.train_x.device, schedules
        )
    if run_dir is not None and is_main_process():
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        save_config(run_dir, config)
        if checkpoint is None:
            (Path(run_dir) / BEST_FILE).unlink(missing_ok=True)  # of an earlier run in the folder
            state = _schedule_state(schedules)
            save_checkpoint(run_dir, vae, optimizer, config, start_epoch, step, state)
    return start_epoch, step


def _train_and_test(
    vae: VAE,
    optimizer: torch.optim.Optimizer,
    data: tuple[Dataset, torch.Tensor | None, DataParallel | None],
    config: Config,
    epoch: int,
    step: int,
    run_dir: str | Path | None,
) -> tuple[dict, int]:
    """One epoch of training and the validation and test ELBOs after it: the epoch's metrics
    row and the step. ``data`` is the training data set, the validation images, if any, and
    the :class:`~pyro_vae.distributed.DataParallel` of data-parallel training, if any."""
    dataset, valid_x, parallel = data
    start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
    vae.train()
    try:
        train_elbo, step = train_epoch(
            vae, optimizer, dataset.train_x, config, epoch, step, parallel=parallel
        )
    except FloatingPointError as e:
        if run_dir is None:
            raise
        raise FloatingPointError(f"{e}; {run_dir} keeps epoch {epoch - 1}") from e
    vae.eval()
    # The test set was checked whole before training, and the model on this epoch's first step.
    with pyro_checks(config, first=False):
        tests = {}
        if valid_x is not None:
            tests["valid_elbo"] = evaluate_elbo(
                vae, valid_x, _elbo_name(config), config.num_particles, parallel
            )
        tests |= _test_metrics(vae, dataset.test_x, config, parallel)
    for column, value in tests.items():
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the {TEST_METRICS[column]} became {value} after epoch {epoch}; "
                "try a lower config.lr or set config.clip_norm"
            )
    row = {
        "epoch": epoch,
        "step": step,
        "kl_scale": vae.kl_scale,
        "lr": lr,
        "train_elbo": train_elbo,
        **tests,
        "seconds": time.perf_counter() - start,
    }
    return row, step


def _test_metrics(
    vae: VAE, x: torch.Tensor, config: Config, parallel: DataParallel | None = None
) -> dict[str, float]:
    """``test_elbo``, the ELBO at KL weight 1 whatever the objective, and for an
    importance-weighted objective ``test_iwae``, its IWAE bound with K = num_particles."""
    name, k = _elbo_name(config), config.num_particles
    tests = {"test_elbo": evaluate_elbo(vae, x, name, k, parallel)}
    if is_importance_weighted(config.elbo):
        tests["test_iwae"] = evaluate_elbo(vae, x, config.elbo, k, parallel)
    return tests


def _elbo_name(config: Config) -> str:
    """The objective whose bound is ``test_elbo`` and ``valid_elbo``: the ELBO (the trace ELBO
    for an importance-weighted objective)."""
    return "trace" if is_importance_weighted(config.elbo) else config.elbo
