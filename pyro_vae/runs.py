"""Run folders: training into one, resuming it, and reading it back.

:func:`train_run` and :func:`resume_run` are what ``pyro-vae train`` and
``pyro-vae train --resume`` do, callable from Python; :func:`load_run` reads a run back.
A run folder holds ``config.json``, ``metrics.csv``, ``checkpoint.pt`` (the last epoch, for
resuming), ``best.pt`` (the epoch with the highest ``valid_elbo``, in a run with a validation
split) and figures. Every file
is written atomically (a temporary file in the same folder, then a rename), so a run killed at
any moment keeps its last good copy of each. Checkpoints hold only tensors and plain
containers and are read with ``torch.load(..., weights_only=True)``: loading one never runs
code.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import pickle
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch

from pyro_vae import distributed
from pyro_vae.checks import check_choice
from pyro_vae.config import FORMAT_VERSION, Config
from pyro_vae.data import Dataset, load_dataset, resolve_binarize
from pyro_vae.describe import build_vae, check_buildable, describe_model
from pyro_vae.devices import get_rng_state
from pyro_vae.likelihoods import LIKELIHOODS
from pyro_vae.plots import run_figures, save_figures
from pyro_vae.vae import VAE

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
CHECKPOINT_FILE = "checkpoint.pt"
#: The checkpoint of the epoch with the highest ``valid_elbo`` (runs with a validation split).
BEST_FILE = "best.pt"
#: The checkpoints :func:`load_run` reads, by name.
CHECKPOINTS = {"best": BEST_FILE, "last": CHECKPOINT_FILE}

#: ``on_train_start(vae, config, start_epoch)``: called once the model is built and checked.
TrainStartHook = Callable[[VAE, Config, int], None]
#: ``on_epoch_end(row)``: called with each new metrics row.
EpochEndHook = Callable[[dict], None]


# Read once at import: os.umask can only be read by setting it.
_UMASK = os.umask(0)
os.umask(_UMASK)


class RunInterrupted(KeyboardInterrupt):
    """Training was interrupted (Ctrl-C) after its run folder was made; the message says what
    the folder keeps.

    :ivar Path run_dir: the run folder, resumable with :func:`resume_run` when ``epoch`` is
        not ``None``.
    :ivar epoch: the epoch its ``checkpoint.pt`` holds, or ``None`` if there is none yet.
    """

    def __init__(self, run_dir: Path, epoch: int | None):
        if epoch is None:
            message = f"interrupted before the first checkpoint; start {run_dir} again"
        else:
            message = f"interrupted; {run_dir / CHECKPOINT_FILE} holds epoch {epoch}."
        super().__init__(message)
        self.run_dir = run_dir
        self.epoch = epoch


class RunFolderError(ValueError):
    """A run folder that does not fit the request: :func:`train_run` into a folder that holds
    a run already, or :func:`resume_run` with fewer epochs than the run has trained."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode())


def new_run_dir(root: str | Path = "runs") -> Path:
    """Create and return a fresh timestamped folder under ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        path = root / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a new run folder under {root}")


def save_config(run_dir: str | Path, config: Config) -> None:
    atomic_write_text(Path(run_dir) / CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")


def load_config(run_dir: str | Path) -> Config:
    """Read ``config.json`` of a run folder, with a clear error if it is missing or broken."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {run_dir}; is it a pyro-vae run folder?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); it may be truncated") from e
    try:
        return Config.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


def write_metrics(run_dir: str | Path, rows: list[dict]) -> None:
    """Write all metric rows (one per epoch) to ``metrics.csv``.

    The columns are those of every row, in the order they first appear; a row without one of
    them (an epoch written by an older version, before the column existed) has ``nan`` there.
    """
    buf = io.StringIO()
    if rows:
        columns = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(buf, fieldnames=columns, restval="nan")
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(Path(run_dir) / METRICS_FILE, buf.getvalue())


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Read ``metrics.csv`` back as a list of dicts of floats (``epoch`` and ``step`` as ints)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    ints = {"epoch", "step"}
    try:
        return [{k: int(v) if k in ints else float(v) for k, v in row.items()} for row in rows]
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{path} is not a metrics table written by pyro_vae ({e}); "
            "move it away to go on without the history of earlier epochs"
        ) from e


def save_checkpoint(
    run_dir: str | Path,
    vae: VAE,
    optimizer: torch.optim.Optimizer,
    config: Config,
    epoch: int,
    step: int,
    schedules: dict | None = None,
    name: str = CHECKPOINT_FILE,
) -> None:
    """Save model, optimizer, config, epoch counter and RNG state to ``checkpoint.pt``.

    :param dict schedules: more state to save (plain containers): the learning-rate scheduler
        and early stopping, under their own keys.
    :param str name: the file in ``run_dir``, :data:`CHECKPOINT_FILE` or :data:`BEST_FILE`.
    """
    state = {
        **(schedules or {}),
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "epoch": epoch,
        "step": step,
        "model": vae.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": get_rng_state(next(vae.parameters()).device),
        "torchrun_job": distributed.job_id(),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(run_dir) / name, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (tensors and plain containers only; no code runs).

    :raises FileNotFoundError: if there is no such file.
    :raises ValueError: if the file is truncated, not a checkpoint, unsafe or of another version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names the first forbidden import; anything else is a damaged or foreign file.
        unsafe = re.search(r"GLOBAL (\S+)", str(e))
        if unsafe:
            raise ValueError(
                f"refusing to load {path}: it would import {unsafe.group(1)}, so it was not "
                "written by pyro_vae and may run code; load only checkpoints you trust"
            ) from e
        raise ValueError(
            f"{path} is not a readable checkpoint (not a torch file?); "
            "pass a run folder written by pyro-vae"
        ) from e
    except Exception as e:  # torch.load fails in many ways on damaged files (KeyError too)
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise ValueError(
            f"{path} is not a readable checkpoint (truncated or corrupt? {reason}); "
            "restore it from a copy or train the run again"
        ) from e
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path} is not a pyro_vae checkpoint")
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} was saved in checkpoint format {version!r}; this pyro_vae reads format "
            f"{FORMAT_VERSION}: use the pyro_vae version that wrote it"
        )
    return state


@dataclass
class Run:
    """A trained run: its folder, completed config, model, checkpoint and metrics rows, and
    which checkpoint file the model was read from."""

    path: Path
    config: Config
    vae: VAE
    checkpoint: dict
    metrics: list[dict] = field(default_factory=list)
    #: The file in ``path`` that ``checkpoint`` was read from.
    checkpoint_file: str = CHECKPOINT_FILE


def load_model_state(
    vae: VAE, state_dict: dict, described: str = "the model its config describes", hint: str = ""
) -> None:
    """Load a checkpoint's weights into ``vae``, with a one-line :class:`ValueError` naming
    the first mismatch (and ending with ``hint``) if they do not fit it."""
    try:
        vae.load_state_dict(state_dict)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise ValueError(f"the checkpoint does not fit {described}: {first}{hint}") from e


def checkpoint_file(run_dir: str | Path, checkpoint: str | None = None) -> str:
    """The checkpoint file of a run folder that ``checkpoint`` names: ``"best"``
    (:data:`BEST_FILE`), ``"last"`` (:data:`CHECKPOINT_FILE`), or ``None`` for the best one
    when the run has one, else the last.

    :raises ValueError: if ``checkpoint`` is another name.
    :raises FileNotFoundError: for ``"best"`` in a run without a validation split.
    """
    if checkpoint is None:
        return BEST_FILE if (Path(run_dir) / BEST_FILE).is_file() else CHECKPOINT_FILE
    check_choice("checkpoint", checkpoint, CHECKPOINTS)
    if checkpoint == "best" and not (Path(run_dir) / BEST_FILE).is_file():
        raise FileNotFoundError(
            f"{run_dir} has no {BEST_FILE}: it was trained without a validation split "
            "(config.validation_size 0); load checkpoint 'last'"
        )
    return CHECKPOINTS[checkpoint]


def load_run(
    run_dir: str | Path,
    device: str | torch.device = "cpu",
    vae: VAE | None = None,
    checkpoint: str | None = None,
) -> Run:
    """Rebuild the VAE of a run folder from its checkpoint.

    The model is built from ``config.json``'s settings, which needs every part to be registered
    under the name recorded there. A run that trained a VAE subclass (a custom model), or used
    a part of an unregistered class, is loaded by building the model as in training and passing
    it as ``vae``: its weights are then loaded into that module, and the model fields of
    :attr:`Run.config` describe it.

    :param run_dir: the folder written by :func:`train_run`, :func:`pyro_vae.train.fit` or
        ``pyro-vae train``.
    :param device: where to put the model.
    :param VAE vae: the untrained model to load the weights into, instead of building one.
    :param str checkpoint: ``"best"`` (``best.pt``, the epoch with the highest ``valid_elbo``),
        ``"last"`` (``checkpoint.pt``) or ``None``: the best when the run has one, else the
        last (see :func:`checkpoint_file`); :attr:`Run.checkpoint_file` says which was read.
    :returns: a :class:`Run` with the model in eval mode.

    >>> run = load_run("runs/mnist")  # doctest: +SKIP
    >>> images = run.vae.sample(16)  # doctest: +SKIP
    >>> run = load_run("runs/custom", vae=MyVAE(64, latent_dim=2))  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    name = checkpoint_file(run_dir, checkpoint)
    state = load_checkpoint(run_dir / name, map_location=device)
    data = state["config"]
    if vae is None:
        if isinstance(data, dict):
            check_buildable(data)
        config = Config.from_dict(data)
        vae = build_vae(config).to(device)
        described = "the model its config describes"
    else:
        config = Config.from_dict(
            {**data, **describe_model(vae)} if isinstance(data, dict) else data
        )
        vae = vae.to(device)
        described = f"the {type(vae).__name__} passed as vae"
    load_model_state(vae, state["model"], described, f" (in {run_dir})")
    vae.eval()
    return Run(run_dir, config, vae, state, read_metrics(run_dir), name)


def load_run_dataset(
    config: Config,
    data_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    *,
    likelihood=None,
) -> Dataset:
    """Load the data set a run's config names, binarized as in training.

    This is the one home of the download policy for a run read back from its folder: a data
    folder read from ``config.json`` is only read, never downloaded into, and it must exist.
    Downloading happens only into a folder the caller names (``data_dir``), or into the
    default cache when the config names none.

    :param Config config: the run's config.
    :param data_dir: overrides ``config.data_dir``.
    :param device: where to put the tensors.
    :param likelihood: the run's likelihood, for a config whose ``binarize`` is unset (see
        :func:`~pyro_vae.data.resolve_binarize`); default the one ``config`` names.
    :raises FileNotFoundError: if the data folder of the config does not exist.
    """
    if data_dir is None and config.data_dir is not None:
        if not Path(config.data_dir).expanduser().is_dir():
            raise FileNotFoundError(
                f"the data folder {config.data_dir!r} named in the run's {CONFIG_FILE} does not "
                "exist here; say where the data set is with data_dir (config.data_dir)"
            )
    return load_dataset(
        config.dataset,
        config.data_dir if data_dir is None else data_dir,
        binarize=_binarize(config, likelihood),
        device=device,
        download=data_dir is not None or config.data_dir is None,
    )


def holds_run(path: str | Path) -> bool:
    """Whether ``path`` holds a run (a checkpoint), which training into it would overwrite.

    A folder with a ``config.json`` but no checkpoint was stopped before training began; it
    may be trained into again.
    """
    return (Path(path) / CHECKPOINT_FILE).exists()


def restarted_run(run_dir: str | Path | None) -> bool:
    """Whether torchrun restarted this process after a failure (``--max-restarts``) and
    ``run_dir`` holds the run that this torchrun job was training: the run to resume.

    The checkpoint records the job it was written by (its rendezvous id, see
    :func:`~pyro_vae.distributed.job_id`), so a folder holding some other run is never taken
    for this job's.
    """
    if run_dir is None or not distributed.restarted() or not holds_run(run_dir):
        return False
    try:
        checkpoint = load_checkpoint(Path(run_dir) / CHECKPOINT_FILE)
    except ValueError:
        return False
    return checkpoint.get("torchrun_job") == distributed.job_id()


def train_run(
    config: Config,
    run_dir: str | Path | None = None,
    *,
    on_train_start: TrainStartHook | None = None,
    on_epoch_end: EpochEndHook | None = None,
) -> Run:
    """Train the model that ``config`` describes into a run folder: ``pyro-vae train``.

    Loads the data set (downloading it if needed), seeds with ``config.seed``, builds the
    model, checks every input (before any folder is made), trains with
    :func:`~pyro_vae.train.fit`, which keeps ``config.json``, ``metrics.csv`` and
    ``checkpoint.pt`` up to date, and writes the figures of :func:`~pyro_vae.plots.run_figures`.

    :param Config config: the run's settings.
    :param run_dir: the run folder, which must not hold a run yet; default a new timestamped
        folder under ``runs/``.
    :param on_train_start: called as ``on_train_start(vae, config, start_epoch)`` with the
        model and the completed config just before the first epoch.
    :param on_epoch_end: called with each new metrics row (see :func:`~pyro_vae.train.fit`).
    :returns: the trained :class:`Run`.
    :raises RunFolderError: if ``run_dir`` holds a run already.
    :raises RunInterrupted: on Ctrl-C once the run folder exists; resume it with
        :func:`resume_run`. Before that, the :class:`KeyboardInterrupt` leaves no folder.

    >>> run = train_run(Config(epochs=3), "runs/small")  # doctest: +SKIP
    >>> run.metrics[-1]["test_elbo"]  # doctest: +SKIP
    """
    if not isinstance(config, Config):
        raise TypeError(f"config must be a pyro_vae Config, got {type(config).__name__}")
    run_dir = None if run_dir is None else _check_new_run_dir(Path(run_dir))
    check_buildable(config.to_dict())
    config = dataclasses.replace(config, binarize=_binarize(config))
    with distributed.process_group(config.device) as device:
        dataset = distributed.main_process_first(
            load_dataset, config.dataset, config.data_dir, config.binarize, device=device
        )
        return _train(config, dataset, run_dir, None, [], on_train_start, on_epoch_end)


def resume_run(
    run_dir: str | Path,
    *,
    epochs: int | None = None,
    device: str | torch.device | None = None,
    data_dir: str | Path | None = None,
    on_train_start: TrainStartHook | None = None,
    on_epoch_end: EpochEndHook | None = None,
) -> Run:
    """Continue a run from its last checkpoint: ``pyro-vae train --resume``.

    The run keeps its own settings, so the resumed epochs give the same numbers as a run that
    was never interrupted. Only where and how long it runs may change.

    :param run_dir: a folder written by :func:`train_run` (or ``pyro-vae train``).
    :param int epochs: the new total number of epochs (``config.epochs``), at least the
        number already trained; default the run's own.
    :param device: where to train (``config.device``); default the run's own.
    :param data_dir: the folder holding the data set, if not the run's own (see
        :func:`load_run_dataset`).
    :param on_train_start: as for :func:`train_run`.
    :param on_epoch_end: as for :func:`train_run`.
    :returns: the trained :class:`Run`.
    :raises FileNotFoundError: if there is no run folder or no checkpoint in it.
    :raises RunFolderError: if ``epochs`` is fewer than the epochs already trained.
    :raises RunInterrupted: on Ctrl-C.
    """
    run_dir = Path(run_dir)
    config, checkpoint = _resume_settings(run_dir, epochs, device)
    metrics = read_metrics(run_dir)
    config = dataclasses.replace(config, binarize=_binarize(config))
    with distributed.process_group(config.device) as device:
        dataset = distributed.main_process_first(load_run_dataset, config, data_dir, device)
        if data_dir is not None:
            config = dataclasses.replace(config, data_dir=str(data_dir))
        return _train(config, dataset, run_dir, checkpoint, metrics, on_train_start, on_epoch_end)


def _check_new_run_dir(run_dir: Path) -> Path:
    if holds_run(run_dir):
        raise RunFolderError(
            f"{run_dir} already holds a run; continue it with resume_run or train into "
            "another folder"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"{run_dir} is a file, not a folder; train into a folder")
    return run_dir


def _resume_settings(
    run_dir: Path, epochs: int | None, device: str | torch.device | None
) -> tuple[Config, dict]:
    """The config a resumed run trains with, and the checkpoint it starts from."""
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"run folder {run_dir} does not exist; pass a folder written by train_run or "
            "'pyro-vae train'"
        )
    config = load_config(run_dir)
    if not holds_run(run_dir):
        raise FileNotFoundError(
            f"{run_dir} has no {CHECKPOINT_FILE}: the run stopped before its first checkpoint; "
            "train it again from the start"
        )
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_FILE)
    if epochs is not None:
        config = dataclasses.replace(config, epochs=epochs)
        if config.epochs < checkpoint["epoch"]:
            raise RunFolderError(
                f"config.epochs {epochs} is fewer than the {checkpoint['epoch']} epochs already "
                f"trained in {run_dir}; pass config.epochs {checkpoint['epoch']} or more"
            )
    if device is not None:
        config = dataclasses.replace(config, device=str(device))
    return config, checkpoint


def _train(
    config: Config,
    dataset: Dataset,
    run_dir: Path | None,
    checkpoint: dict | None,
    metrics: list[dict],
    on_train_start: TrainStartHook | None,
    on_epoch_end: EpochEndHook | None,
) -> Run:
    """Build the model, check it, then train it into ``run_dir`` and draw the figures."""
    from pyro_vae.train import fit, prepare_fit  # train.py writes its run folder through here

    device = dataset.train_x.device
    config = dataclasses.replace(
        config, data_dim=dataset.data_dim, image_shape=list(dataset.image_shape)
    )
    pyro.set_rng_seed(config.seed)
    vae = build_vae(config).to(device)
    config = prepare_fit(vae, dataset, config)  # bad input stops here, before a run folder
    # In data-parallel training rank 0 makes the folder, once every rank has checked it.
    run_dir = distributed.on_main_process(new_run_dir) if run_dir is None else run_dir
    distributed.barrier()
    try:
        if on_train_start is not None:
            on_train_start(vae, config, checkpoint["epoch"] if checkpoint else 0)
        # fit restores weights, optimizer and RNG from the checkpoint just before training.
        rows = fit(vae, dataset, config, run_dir, checkpoint, metrics, on_epoch_end)
        if distributed.is_main_process():
            save_figures(run_figures(vae, dataset, rows), run_dir)
    except KeyboardInterrupt as interrupt:
        if not run_dir.is_dir():
            raise
        raise RunInterrupted(run_dir, _checkpoint_epoch(run_dir)) from interrupt
    distributed.barrier()  # rank 0 has written the last checkpoint
    return Run(run_dir, config, vae, load_checkpoint(run_dir / CHECKPOINT_FILE, device), rows)


def _checkpoint_epoch(run_dir: Path) -> int | None:
    """The epoch the run's checkpoint holds, or ``None`` if it has no readable one.

    Checkpoints are written at epoch 0 and at every epoch end; the part of an epoch under way
    when training stops is dropped, because only an epoch boundary resumes to the same numbers.
    """
    try:
        return load_checkpoint(run_dir / CHECKPOINT_FILE)["epoch"]
    except (OSError, ValueError):
        return None


def _binarize(config: Config, likelihood=None) -> str:
    """``config.binarize``, or the binarization its likelihood gets when it is unset."""
    if config.binarize is not None:
        return config.binarize
    return resolve_binarize(
        None, LIKELIHOODS[config.likelihood] if likelihood is None else likelihood
    )
