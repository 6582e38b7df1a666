"""Stochastic variational inference: the training loop.

It knows nothing about which prior, likelihood or guide is inside the VAE: it asks the ELBO
registry for a loss, takes minibatches from :mod:`pyro_vae.data` and steps a torch optimizer
over the module's parameters. This is SVI written with the ELBO's ``differentiable_loss``, the
form that :func:`torch.compile` and DistributedDataParallel work with.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from torch.distributions import constraints

from pyro_vae.config import Config
from pyro_vae.data import Dataset, check_finite, iterate_batches
from pyro_vae.estimators import estimate_elbo_terms
from pyro_vae.objectives import get_elbo
from pyro_vae.runs import (
    build_vae,
    is_buildable,
    record_model,
    save_checkpoint,
    save_config,
    write_metrics,
)
from pyro_vae.vae import VAE

logger = logging.getLogger(__name__)

#: Datapoints per forward pass when evaluating; bounds memory, not results.
EVAL_BATCH_SIZE = 2000


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; asking for absent CUDA is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda or cuda:N") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; choose auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and torch.cuda.is_available():
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} was requested but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s); use cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1}"
            )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} was requested but CUDA is not available on this machine; "
            "use --device cpu (or auto)"
        )
    return device


def resolve_binarize(binarize: str | None, likelihood) -> str:
    """``None`` means dynamic binarization for likelihoods of binary data, none otherwise.

    :param likelihood: a :class:`~pyro_vae.likelihoods.Likelihood` or its class.
    """
    if binarize is not None:
        return binarize
    return "dynamic" if likelihood.support is constraints.boolean else "none"


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
        check_finite(x, f"dataset.{split}_x")
        if split == "train" and binarize == "dynamic":
            # Grey levels are Bernoulli probabilities here, binarized batch by batch.
            if not ((x >= 0).all() and (x <= 1).all()):
                raise ValueError(
                    "dynamic binarization needs training data in [0, 1], but dataset.train_x "
                    f"lies in [{x.min().item():.4g}, {x.max().item():.4g}]; rescale it or set "
                    "binarize='none' (--binarize none)"
                )
        else:
            vae.likelihood.check_data(x)


def prepare_fit(vae: VAE, dataset: Dataset, config: Config) -> None:
    """Fill in the data-dependent fields of ``config`` and check every input of :func:`fit`.

    Runs before a run folder is written, so bad input never leaves a half-made run behind.

    :raises TypeError: if ``dataset`` or ``config`` is of the wrong type, or the data are not
        floating point.
    :raises ValueError: naming the first bad setting or data problem.
    """
    if not isinstance(config, Config):
        raise TypeError(f"config must be a pyro_vae Config, got {type(config).__name__}")
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"dataset must be a pyro_vae Dataset (see load_dataset), got {type(dataset).__name__}"
        )
    # The data were binarized when loaded: config.json must say how, or a resumed run would
    # reload them differently.
    if config.binarize is None:
        config.binarize = dataset.binarize
    elif config.binarize != dataset.binarize:
        raise ValueError(
            f"config.binarize is {config.binarize!r} but the dataset was loaded with "
            f"binarize={dataset.binarize!r}; load it with load_dataset(..., "
            f"binarize={config.binarize!r}) or leave config.binarize unset"
        )
    record_model(config, vae)
    config.image_shape = list(dataset.image_shape)
    config.validate()
    check_dataset(vae, dataset, config.binarize)
    num_train = dataset.train_x.shape[0]
    if config.batch_size > num_train:
        raise ValueError(
            f"batch_size {config.batch_size} is larger than the {num_train} training datapoints "
            f"of {dataset.name!r}; use a batch_size (--batch-size) of at most {num_train}"
        )


def warn_if_kl_is_sampled(vae: VAE, x: torch.Tensor) -> tuple[str, ...]:
    """Warn, naming the sites, if ``TraceMeanField_ELBO`` would sample KL terms of ``vae``.

    Pyro's mean-field ELBO falls back to the Monte Carlo KL, silently, for every latent site
    whose KL has no closed form (mixture, VampPrior and Student-t priors, flow guides); this
    says so instead. Leaves the global random state alone.

    :returns: the latent sites whose KL is sampled.
    """
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            terms = estimate_elbo_terms(vae.model, vae.guide, x, analytic_kl=True)
    if terms.sampled_sites:
        warnings.warn(
            f"--elbo meanfield: KL(q || p) has no closed form for latent site(s) "
            f"{list(terms.sampled_sites)} of this model (prior {type(vae.prior).__name__}, "
            f"guide {type(vae.guide_family).__name__}), so TraceMeanField_ELBO samples it: "
            "training there is the Monte Carlo ELBO (--elbo trace)",
            UserWarning,
            stacklevel=2,
        )
    return terms.sampled_sites


def check_config_describes(vae: VAE, config: Config) -> None:
    """Raise :class:`ValueError` unless ``config`` rebuilds a model that ``vae``'s weights fit.

    A run folder is only useful if :func:`~pyro_vae.runs.load_run` can rebuild its model from
    the saved config, so this is checked before training rather than discovered when loading.
    """
    with torch.random.fork_rng(devices=[]):  # building the model must not move the RNG
        expected = {k: tuple(v.shape) for k, v in build_vae(config).state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    if expected != actual:
        diff = sorted(set(expected.items()) ^ set(actual.items()))[0][0]
        raise ValueError(
            f"the config describes another model than the VAE being trained (they differ at "
            f"{diff!r}); set latent_dim, hidden_dims, prior, likelihood, guide and their "
            "options in the Config to those of the VAE, so that load_run can rebuild it"
        )


def load_model_state(vae: VAE, checkpoint: dict) -> None:
    """Load a checkpoint's weights into ``vae``, with a one-line error if they do not fit."""
    try:
        vae.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise ValueError(
            f"the checkpoint does not fit the model its config describes ({first}); "
            "was config.json edited? Restore it, or train a new run"
        ) from e


@torch.no_grad()
def evaluate_elbo(vae: VAE, x: torch.Tensor, elbo: str = "trace", num_particles: int = 1) -> float:
    """Mean ELBO per datapoint (nats) at KL weight 1, without touching the parameters.

    :param VAE vae: the model.
    :param torch.Tensor x: data, ``(N, data_dim)``.
    :param str elbo: a key of :data:`~pyro_vae.objectives.ELBOS`.
    :param int num_particles: samples of z per datapoint.
    """
    vae.check_input(x)
    loss_fn = get_elbo(elbo, num_particles)
    kl_scale, vae.kl_scale = vae.kl_scale, 1.0
    try:
        total = sum(loss_fn.loss(vae.model, vae.guide, chunk) for chunk in x.split(EVAL_BATCH_SIZE))
    finally:
        vae.kl_scale = kl_scale
    return -total / x.shape[0]


def diverged(
    loss: float | str, epoch: int, step: int, what: str = "the loss"
) -> FloatingPointError:
    return FloatingPointError(
        f"{what} became {loss} at epoch {epoch}, step {step + 1}; "
        "try a lower --lr or set --clip-norm"
    )


def train_epoch(
    vae: VAE,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    config: Config,
    epoch: int,
    step: int,
) -> tuple[float, int]:
    """One pass over ``x`` in random minibatches.

    :returns: the mean training objective per datapoint (the ELBO at the current KL weight)
        and the updated global step counter.
    :raises FloatingPointError: if the loss is NaN or infinite; the parameters are not updated.
    """
    loss_fn = get_elbo(config.elbo, config.num_particles)
    steps_per_epoch = math.ceil(x.shape[0] / config.batch_size)
    total = torch.zeros((), device=x.device)
    batches = iterate_batches(
        x, config.batch_size, shuffle=True, binarize=config.binarize == "dynamic"
    )
    for batch in batches:
        vae.kl_scale = kl_weight(config, step, steps_per_epoch)
        try:
            loss = loss_fn.differentiable_loss(vae.model, vae.guide, batch)
        except ValueError as e:
            # With validation on, distributions refuse NaN parameters before the loss exists.
            if all(torch.isfinite(p).all() for p in vae.parameters()):
                raise
            raise diverged("nan", epoch, step) from e
        if not torch.isfinite(loss):
            raise diverged(loss.item(), epoch, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), config.clip_norm)
        optimizer.step()
        total += loss.detach()
        step += 1
    # The last step's update is not seen by a next loss: check it before anything is saved.
    if not all(torch.isfinite(p).all() for p in vae.parameters()):
        raise diverged("non-finite", epoch, step - 1, what="the parameters")
    return -total.item() / x.shape[0], step


def make_optimizer(vae: VAE, config: Config) -> torch.optim.Optimizer:
    return torch.optim.Adam(vae.parameters(), lr=config.lr)


def restore_checkpoint(
    vae: VAE,
    optimizer: torch.optim.Optimizer,
    checkpoint: dict,
    config: Config,
    device: torch.device,
) -> tuple[int, int]:
    """Put weights, optimizer state and RNG state back; returns the epoch and step reached.

    The RNG is restored last, so nothing between here and the next training step draws from it.
    """
    if checkpoint["epoch"] > config.epochs:
        raise ValueError(
            f"the checkpoint is at epoch {checkpoint['epoch']} but config.epochs is "
            f"{config.epochs}; ask for at least {checkpoint['epoch']} epochs (--epochs)"
        )
    load_model_state(vae, checkpoint)
    optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"]["torch"].cpu())
    if device.type == "cuda" and checkpoint["rng"]["cuda"]:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"][0].cpu(), device)
    return checkpoint["epoch"], checkpoint["step"]


def fit(
    vae: VAE,
    dataset: Dataset,
    config: Config | None = None,
    run_dir: str | Path | None = None,
    checkpoint: dict | None = None,
    metrics: list[dict] | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train ``vae`` on ``dataset`` by SVI; optionally keep a run folder up to date.

    The data and the model live on the same device, that of ``dataset.train_x``. With
    ``run_dir``, ``config.json`` is written first, then after every epoch ``metrics.csv`` and
    ``checkpoint.pt`` (each atomically), so an interrupted run resumes from its last epoch.

    :param VAE vae: the model; trained in place.
    :param Dataset dataset: from :func:`~pyro_vae.data.load_dataset`.
    :param Config config: training settings (defaults if ``None``). Its model fields
        (``data_dim``, ``latent_dim``, ``hidden_dims``, ``activation``, ``prior``,
        ``likelihood``, ``guide``, their ``*_kwargs`` and ``vae_class``) are set from ``vae``
        (see :func:`~pyro_vae.runs.describe_model`), so ``config.json`` records the parts the
        VAE really has, also when they were passed as objects; ``image_shape`` comes from the
        data set.
    :param run_dir: folder for config, metrics and checkpoints, or ``None``.
    :param dict checkpoint: a state from :func:`~pyro_vae.runs.load_checkpoint` to resume:
        weights, optimizer state, epoch and step counters and the RNG state are restored, so
        the resumed run gives the same numbers as one that was never interrupted.
    :param list metrics: rows already written for the epochs before ``checkpoint``.
    :param on_epoch_end: called with each new metrics row.
    :returns: one row per epoch: ``epoch``, ``step``, ``kl_scale``, ``train_elbo``,
        ``test_elbo`` (nats per datapoint, higher is better) and ``seconds``.
    :raises FloatingPointError: if the loss or the parameters become NaN or infinite; the run
        folder keeps the last good epoch.

    >>> from pyro_vae import VAE, Config, fit, load_dataset
    >>> data = load_dataset("digits", binarize="dynamic")
    >>> vae = VAE(data.data_dim, latent_dim=2)
    >>> rows = fit(vae, data, Config(epochs=2))
    >>> rows[-1]["test_elbo"] < 0
    True
    """
    config = Config() if config is None else config
    prepare_fit(vae, dataset, config)
    device = dataset.train_x.device
    vae.to(device)
    if config.elbo == "meanfield":
        warn_if_kl_is_sampled(vae, dataset.test_x[:2])
    # A model that config.json cannot rebuild (a custom VAE class, an unregistered part) is
    # reloaded with load_run(run_dir, vae=...) instead.
    if run_dir is not None and is_buildable(config):
        check_config_describes(vae, config)
    optimizer = make_optimizer(vae, config)
    rows = list(metrics or [])
    if checkpoint is None:
        pyro.set_rng_seed(config.seed)
        start_epoch, step = 0, 0
    else:
        start_epoch, step = restore_checkpoint(vae, optimizer, checkpoint, config, device)
        rows = [row for row in rows if row["epoch"] <= start_epoch]
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        save_config(run_dir, config)
        if checkpoint is None:
            save_checkpoint(run_dir, vae, optimizer, config, start_epoch, step)
    for epoch in range(start_epoch + 1, config.epochs + 1):
        start = time.perf_counter()
        vae.train()
        try:
            train_elbo, step = train_epoch(vae, optimizer, dataset.train_x, config, epoch, step)
        except FloatingPointError as e:
            if run_dir is None:
                raise
            raise FloatingPointError(f"{e}; {run_dir} keeps epoch {epoch - 1}") from e
        vae.eval()
        test_elbo = evaluate_elbo(vae, dataset.test_x, config.elbo, config.num_particles)
        if not math.isfinite(test_elbo):
            raise FloatingPointError(
                f"the test ELBO became {test_elbo} after epoch {epoch}; "
                "try a lower --lr or set --clip-norm"
            )
        row = {
            "epoch": epoch,
            "step": step,
            "kl_scale": vae.kl_scale,
            "train_elbo": train_elbo,
            "test_elbo": test_elbo,
            "seconds": time.perf_counter() - start,
        }
        rows.append(row)
        logger.info("epoch %d: train ELBO %.3f, test ELBO %.3f", epoch, train_elbo, test_elbo)
        if run_dir is not None:
            write_metrics(run_dir, rows)
            save_checkpoint(run_dir, vae, optimizer, config, epoch, step)
        if on_epoch_end is not None:
            on_epoch_end(row)
    vae.kl_scale = 1.0
    return rows
