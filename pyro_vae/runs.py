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
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pyro_vae.config import FORMAT_VERSION, Config
from pyro_vae.vae import VAE

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
CHECKPOINT_FILE = "checkpoint.pt"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
    return Config.from_dict(data)


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
    return [{k: int(v) if k in ints else float(v) for k, v in row.items()} for row in rows]


def build_vae(config: Config) -> VAE:
    """Build the (untrained) VAE a config describes."""
    if config.data_dim is None:
        raise ValueError("config.data_dim is not set; it is filled in when training starts")
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


def save_checkpoint(
    run_dir: str | Path,
    vae: VAE,
    optimizer: torch.optim.Optimizer,
    config: Config,
    epoch: int,
    step: int,
) -> None:
    """Save model, optimizer, config, epoch counter and RNG state to ``checkpoint.pt``."""
    state = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "epoch": epoch,
        "step": step,
        "model": vae.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
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
        raise ValueError(
            f"refusing to load {path}: it holds objects other than tensors and plain "
            f"containers, so it was not written by pyro_vae and may run code ({e})"
        ) from e
    except Exception as e:  # torch.load fails in many ways on damaged files (KeyError too)
        raise ValueError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): {type(e).__name__}: {e}"
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


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> Run:
    """Rebuild the VAE of a run folder from its checkpoint.

    :param run_dir: the folder written by :func:`pyro_vae.train.fit` or ``pyro-vae train``.
    :param device: where to put the model.
    :returns: a :class:`Run` with the model in eval mode.

    >>> run = load_run("runs/mnist")  # doctest: +SKIP
    >>> images = run.vae.sample(16)  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    state = load_checkpoint(run_dir / CHECKPOINT_FILE, map_location=device)
    config = Config.from_dict(state["config"])
    vae = build_vae(config).to(device)
    try:
        vae.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise ValueError(
            f"checkpoint in {run_dir} does not fit the model its config describes: {first}"
        ) from e
    vae.eval()
    return Run(run_dir, config, vae, state, read_metrics(run_dir))
