"""The run folder: ``config.json``, ``metrics.csv``, ``checkpoint.pt`` and figures.

Every file is written atomically (a temporary file in the same folder, then a rename), so a run
killed at any moment keeps its last good copy of each. Checkpoints hold only tensors and plain
containers and are read with ``torch.load(..., weights_only=True)``: loading one never runs code.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pyro_vae.config import FORMAT_VERSION, Config
from pyro_vae.data import Dataset, load_dataset
from pyro_vae.guides import GUIDES
from pyro_vae.likelihoods import LIKELIHOODS
from pyro_vae.priors import PRIORS
from pyro_vae.vae import VAE

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
CHECKPOINT_FILE = "checkpoint.pt"

# Read once at import: os.umask can only be read by setting it.
_UMASK = os.umask(0)
os.umask(_UMASK)

#: Each swappable part: the config field naming it, its registry and the registry's path.
PART_REGISTRIES = {
    "prior": (PRIORS, "pyro_vae.priors.PRIORS"),
    "likelihood": (LIKELIHOODS, "pyro_vae.likelihoods.LIKELIHOODS"),
    "guide": (GUIDES, "pyro_vae.guides.GUIDES"),
}


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
    """Write all metric rows (one per epoch) to ``metrics.csv``."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
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


def build_vae(config: Config) -> VAE:
    """Build the (untrained) VAE a config describes.

    :raises ValueError: if a part is not registered under the name the config gives, or the
        run trained a custom model class; the message says how to load such a run.
    """
    if config.data_dim is None:
        raise ValueError("config.data_dim is not set; it is filled in when training starts")
    check_buildable(config.to_dict())
    return VAE(
        data_dim=config.data_dim,
        latent_dim=config.latent_dim,
        hidden_dims=config.hidden_dims,
        activation=config.activation,
        prior=config.prior,
        likelihood=config.likelihood,
        guide=config.guide,
        prior_kwargs=config.prior_kwargs,
        likelihood_kwargs=config.likelihood_kwargs,
        guide_kwargs=config.guide_kwargs,
    )


def check_buildable(config: dict) -> None:
    """Raise :class:`ValueError`, saying how to load the run instead, if :func:`build_vae`
    cannot rebuild the model that ``config`` (a config as a dict) describes.

    That is the case when the run trained a VAE subclass (a custom model) or used a part whose
    name is not registered in this process: a part passed as an object of an unregistered
    class (recorded by its import path), or a user-registered part not registered again.
    """
    how = "or build the model as in training and pass it: load_run(run_dir, vae=...)"
    vae_class = config.get("vae_class")
    if vae_class is not None:
        raise ValueError(
            f"this run trained a custom model class {vae_class!r}, which config.json cannot "
            f"rebuild; build it as in training and pass it: load_run(run_dir, vae=...)"
        )
    for kind, (registry, registry_path) in PART_REGISTRIES.items():
        name = config.get(kind, getattr(Config, kind))
        if not isinstance(name, str) or name in registry:
            continue
        if "." in name:  # a class path: the part was an object of an unregistered class
            raise ValueError(
                f"this run's {kind} was a {name} object, whose class is not registered in "
                f"{registry_path} or whose options are not JSON, so config.json cannot rebuild "
                f"it; build the model as in training and pass it: load_run(run_dir, vae=...)"
            )
        raise ValueError(
            f"this run's {kind} {name!r} is not in {registry_path} (which has "
            f"{sorted(registry)}); register its class before loading "
            f"({registry_path}[{name!r}] = YourClass) {how}"
        )


def is_buildable(config: Config) -> bool:
    """Whether :func:`build_vae` can rebuild the model ``config`` describes (see
    :func:`check_buildable`); if not, :func:`load_run` needs the model passed as ``vae``."""
    try:
        check_buildable(config.to_dict())
    except ValueError:
        return False
    return True


def class_path(cls: type) -> str:
    """``module.QualifiedName`` of a class, as config.json records unregistered parts."""
    return f"{cls.__module__}.{cls.__qualname__}"


def describe_part(part, registry: dict[str, type]) -> tuple[str, dict]:
    """How config.json records a part: its registry name and constructor options, or, when it
    cannot be rebuilt by name, the import path of its class (and its options for reference).

    A part cannot be rebuilt by name when its class is not in ``registry`` or its options are
    unknown (see :attr:`~pyro_vae.parts.Part.init_kwargs`) or not JSON.

    :param part: a prior, likelihood or guide family.
    :param dict registry: :data:`~pyro_vae.priors.PRIORS`, ... for that kind of part.
    :returns: ``(name, kwargs)`` for the config fields ``prior`` and ``prior_kwargs``, ....
    """
    kwargs = getattr(part, "init_kwargs", None)
    name = next((k for k in sorted(registry) if registry[k] is type(part)), None)
    try:
        json.dumps(kwargs)
    except (TypeError, ValueError):
        return class_path(type(part)), json.loads(json.dumps(kwargs, default=repr))
    if name is None or kwargs is None:
        return class_path(type(part)), dict(kwargs or {})
    return name, dict(kwargs)


def describe_model(vae: VAE) -> dict:
    """The model fields of a :class:`~pyro_vae.config.Config` for ``vae``: the inverse of
    :func:`build_vae`, also for parts passed to the VAE as objects.

    :param VAE vae: the model.
    :returns: ``data_dim``, ``latent_dim``, ``hidden_dims``, ``activation``, ``prior``,
        ``prior_kwargs``, ``likelihood``, ..., ``guide_kwargs`` and ``vae_class`` (the import
        path of a VAE subclass, ``None`` for :class:`~pyro_vae.vae.VAE` itself).
    """
    fields = {
        "data_dim": vae.data_dim,
        "latent_dim": vae.latent_dim,
        "hidden_dims": list(vae.hidden_dims),
        "activation": vae.activation,
        "vae_class": None if type(vae) is VAE else class_path(type(vae)),
    }
    parts = {"prior": vae.prior, "likelihood": vae.likelihood, "guide": vae.guide_family}
    for kind, part in parts.items():
        fields[kind], fields[f"{kind}_kwargs"] = describe_part(part, PART_REGISTRIES[kind][0])
    return fields


def record_model(config: Config, vae: VAE) -> None:
    """Set the model fields of ``config`` to describe ``vae`` (see :func:`describe_model`)."""
    for name, value in describe_model(vae).items():
        setattr(config, name, value)


def save_checkpoint(
    run_dir: str | Path,
    vae: VAE,
    optimizer: torch.optim.Optimizer,
    config: Config,
    epoch: int,
    step: int,
) -> None:
    """Save model, optimizer, config, epoch counter and RNG state to ``checkpoint.pt``."""
    device = next(vae.parameters()).device
    state = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "epoch": epoch,
        "step": step,
        "model": vae.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            # Only the training device's generator: a CPU run never initialises CUDA.
            "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
        },
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(run_dir) / CHECKPOINT_FILE, buf.getvalue())


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
    """A trained run read back from its folder."""

    path: Path
    config: Config
    vae: VAE
    checkpoint: dict
    metrics: list[dict] = field(default_factory=list)


def load_run(
    run_dir: str | Path, device: str | torch.device = "cpu", vae: VAE | None = None
) -> Run:
    """Rebuild the VAE of a run folder from its checkpoint.

    The model is built from ``config.json``'s settings, which needs every part to be registered
    under the name recorded there. A run that trained a VAE subclass (a custom model), or used
    a part of an unregistered class, is loaded by building the model as in training and passing
    it as ``vae``: its weights are then loaded into that module, and the model fields of
    :attr:`Run.config` describe it.

    :param run_dir: the folder written by :func:`pyro_vae.train.fit` or ``pyro-vae train``.
    :param device: where to put the model.
    :param VAE vae: the untrained model to load the weights into, instead of building one.
    :returns: a :class:`Run` with the model in eval mode.

    >>> run = load_run("runs/mnist")  # doctest: +SKIP
    >>> images = run.vae.sample(16)  # doctest: +SKIP
    >>> run = load_run("runs/custom", vae=MyVAE(64, latent_dim=2))  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    state = load_checkpoint(run_dir / CHECKPOINT_FILE, map_location=device)
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
    try:
        vae.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise ValueError(f"checkpoint in {run_dir} does not fit {described}: {first}") from e
    vae.eval()
    return Run(run_dir, config, vae, state, read_metrics(run_dir))


def load_run_dataset(
    config: Config,
    data_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> Dataset:
    """Load the data set a run's config names, binarized as in training.

    A data folder read from ``config.json`` is only read, never written: downloading happens
    only into a folder the caller names, or into the default cache when the config names none.

    :param Config config: the run's config (``binarize`` already resolved by training).
    :param data_dir: overrides ``config.data_dir``.
    :param device: where to put the tensors.
    """
    download = data_dir is not None or config.data_dir is None
    return load_dataset(
        config.dataset,
        data_dir if data_dir is not None else config.data_dir,
        binarize=config.binarize or "none",
        device=device,
        download=download,
    )
