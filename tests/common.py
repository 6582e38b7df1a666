"""Helpers shared by the test files: tiny settings, metrics without timings, CLI error checks."""

from __future__ import annotations

import functools
import subprocess
import time
from pathlib import Path

import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_vae import VAE, Config
from pyro_vae.cli import main
from pyro_vae.runs import load_run, read_metrics

#: ``pyro-vae train`` flags of a tiny model on digits: 2 epochs, 8 steps each (1497 / 200).
TINY_TRAIN = ["--epochs", "2", "--latent-dim", "2", "--hidden-dims", "16", "--batch-size", "200"]
#: The same model without the epochs, for tests that choose them.
TINY_MODEL = ["--hidden-dims", "16", "--latent-dim", "2", "--batch-size", "200"]
#: One epoch of an even smaller model (2 steps of 300), for tests that train many models.
TINY_PARTS = ["--epochs", "1", "--latent-dim", "2", "--hidden-dims", "8", "--batch-size", "300"]
#: Steps per epoch of TINY_MODEL on digits.
STEPS_PER_EPOCH = 8


def tiny_config(**kwargs) -> Config:
    """The Config of TINY_MODEL, with ``kwargs`` on top."""
    return Config(**{"latent_dim": 2, "hidden_dims": [16], "batch_size": 200, **kwargs})


def tiny_vae(seed: int | None = None) -> VAE:
    """The VAE of TINY_MODEL on digits; with ``seed``, its initial weights are fixed (fit seeds
    only training)."""
    if seed is not None:
        torch.manual_seed(seed)
    return VAE(64, latent_dim=2, hidden_dims=(16,))


def without_seconds(rows: list[dict]) -> list[dict]:
    """Metrics rows without their wall-clock ``seconds``, which never repeat."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


#: How the one line starts, by exit code (README, Guarantees): usage errors name the command.
ERROR_PREFIXES = {
    1: "pyro-vae: error: ",
    2: "pyro-vae {command}: error: ",
    130: "pyro-vae: interrupted",
}


def one_line_error(capsys, code: int, expected_code: int = 1, command: str = "train") -> str:
    """Check that a CLI call failed with one line on stderr, with the documented prefix and no
    traceback; return it. ``command`` is the subcommand a usage error (exit code 2) names."""
    err = capsys.readouterr().err
    assert code == expected_code, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(ERROR_PREFIXES[expected_code].format(command=command)), err
    return err


def usage_error(capsys, argv: list[str]) -> str:
    """Run the CLI with ``argv``, check it stops with a one-line argparse error (exit 2) that
    names the subcommand ``argv[0]``."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return one_line_error(capsys, exit_info.value.code, expected_code=2, command=argv[0])


def with_hooks(train, on_train_start=None, on_epoch_end=None):
    """``train`` (:func:`~pyro_vae.runs.train_run` or ``resume_run``) that also calls these
    hooks, after the caller's own: how a test reaches into a run the CLI starts."""

    @functools.wraps(train)
    def wrapped(*args, on_train_start=None, on_epoch_end=None, **kwargs):
        return train(
            *args,
            on_train_start=_both(on_train_start, start_hook),
            on_epoch_end=_both(on_epoch_end, epoch_hook),
            **kwargs,
        )

    start_hook, epoch_hook = on_train_start, on_epoch_end
    return wrapped


def _both(first, second):
    if first is None or second is None:
        return first or second

    def both(*args):
        first(*args)
        second(*args)

    return both


def check_parameters_learn(vae: VAE, params: dict, x: torch.Tensor) -> None:
    """Every parameter in ``params`` (name -> parameter of ``vae``) gets a finite, non-zero
    gradient from the ELBO on ``x``, and every one of them changes in 3 SVI steps."""
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    elbo.differentiable_loss(vae.model, vae.guide, x).backward()
    for param_name, param in params.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0, param_name
    vae.zero_grad()
    before = {n: p.detach().clone() for n, p in params.items()}
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-2}), elbo)
    for _ in range(3):
        svi.step(x)
    assert {n for n, p in params.items() if not torch.equal(p.detach(), before[n])} == set(params)


def craft_valid_elbos(monkeypatch, values: list[float], num_valid: int) -> None:
    """Make ``valid_elbo`` of the coming epochs ``values`` in turn, through fit's
    ``evaluate_elbo``: the held-out images are its only input with ``num_valid`` rows (the
    test ELBO is measured as before)."""
    from pyro_vae import train

    original, values = train.evaluate_elbo, iter(values)

    def crafted(vae, x, *args):
        return next(values) if x.shape[0] == num_valid else original(vae, x, *args)

    monkeypatch.setattr(train, "evaluate_elbo", crafted)


def wait_for_epoch(process: subprocess.Popen, run_dir: Path, epoch: int) -> None:
    """Poll metrics.csv until it shows ``epoch``; it is replaced atomically, so always parses."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rows = read_metrics(run_dir) if (run_dir / "metrics.csv").exists() else []
        if rows and rows[-1]["epoch"] >= epoch:
            return
        if process.poll() is not None:
            pytest.fail(f"training ended early ({process.returncode}): {process.stderr.read()}")
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"no epoch {epoch} in {run_dir} after 120 s")


def check_run_folder_is_whole(run_dir: Path) -> int:
    """The run folder a killed process left: loadable, metrics parse, nothing lost or skipped."""
    run = load_run(run_dir)
    epochs = [row["epoch"] for row in read_metrics(run_dir)]
    assert epochs == list(range(1, len(epochs) + 1))
    # metrics.csv is written just before checkpoint.pt, so it is never behind it.
    assert run.checkpoint["epoch"] in (len(epochs), len(epochs) - 1)
    return len(epochs)
