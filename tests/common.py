"""Helpers shared by the test files: tiny settings, metrics without timings, CLI error checks,
and models with exact answers (a linear-Gaussian model, a 1-D latent integrated on a grid)."""

from __future__ import annotations

import functools
import math
import subprocess
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
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


# ---------------------------------------------------------------------------------------------
# Models with exact answers, for the estimators of log p(x).

DTYPES = [torch.float32, torch.float64]


def tolerance(dtype):
    return {"rtol": 1e-5, "atol": 1e-3} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-9}


def assert_within_stderr(estimate, exact, stderr, num_stderr=4.5, atol=0.0):
    """Every datapoint's estimate is within ``num_stderr`` standard errors of the exact value."""
    bound = num_stderr * stderr + atol
    assert torch.isfinite(stderr).all() and (stderr > 0).all()
    assert ((estimate - exact).abs() <= bound).all(), (estimate - exact) / stderr


class LinearGaussian:
    """z ~ N(0, I_d), x | z ~ N(W z + b, sigma^2 I_D): every quantity has a closed form."""

    def __init__(
        self, latent_dim=2, data_dim=5, sigma=0.7, dtype=torch.float64, nested=False, shift=0.5
    ):
        generator = torch.Generator().manual_seed(1)
        self.W = torch.randn(data_dim, latent_dim, generator=generator, dtype=dtype)
        self.b = torch.randn(data_dim, generator=generator, dtype=dtype)
        self.sigma = sigma
        self.latent_dim, self.data_dim = latent_dim, data_dim
        self.nested = nested
        self.shift = shift
        eye = torch.eye(latent_dim, dtype=dtype)
        self.post_cov = torch.linalg.inv(eye + self.W.T @ self.W / sigma**2)

    def sample(self, num_data):
        z = torch.randn(num_data, self.latent_dim, dtype=self.W.dtype)
        return z @ self.W.T + self.b + self.sigma * torch.randn(num_data, self.data_dim).to(z)

    def model(self, x):
        eye = torch.eye(self.latent_dim, dtype=x.dtype)
        prior = dist.MultivariateNormal(x.new_zeros(self.latent_dim), eye)
        with pyro.plate("data", x.shape[0], dim=-2 if self.nested else -1):
            z = pyro.sample("z", prior)
            loc = z @ self.W.T + self.b
            if self.nested:  # pixels as a plate inside the data plate: z has batch shape (N, 1)
                with pyro.plate("pixels", self.data_dim, dim=-1):
                    pyro.sample("x", dist.Normal(loc.squeeze(-2), self.sigma), obs=x)
            else:
                pyro.sample("x", dist.Normal(loc, self.sigma).to_event(1), obs=x)
        return z

    def post_loc(self, x):
        return (x - self.b) @ self.W @ self.post_cov / self.sigma**2

    def exact_guide(self, x):
        loc = self.post_loc(x).unsqueeze(-2) if self.nested else self.post_loc(x)
        with pyro.plate("data", x.shape[0], dim=-2 if self.nested else -1):
            pyro.sample("z", dist.MultivariateNormal(loc, covariance_matrix=self.post_cov))

    def poor_guide_params(self, x):
        """A diagonal guide, shifted and too wide: far enough from the posterior to matter."""
        scale = 1.5 * self.post_cov.diagonal().sqrt().expand(x.shape[0], -1)
        return self.post_loc(x) + self.shift, scale

    def poor_guide(self, x):
        loc, scale = self.poor_guide_params(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def log_joint(self, x, z):
        """log p(x, z) in closed form, z of shape (..., N, d)."""
        prior = dist.Normal(torch.zeros_like(z), 1.0).to_event(1).log_prob(z)
        return dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1).log_prob(x) + prior

    def log_likelihood(self, x):
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(self.data_dim, dtype=x.dtype)
        return dist.MultivariateNormal(self.b, cov).log_prob(x)

    def elbo(self, x, loc, cov):
        """Closed-form reconstruction and KL for q = N(loc, cov), cov of shape (N, d, d)."""
        residual = x - loc @ self.W.T - self.b
        trace_wsw = torch.einsum("ij,njk,ik->n", self.W, cov, self.W)
        reconstruction = -0.5 * self.data_dim * math.log(2 * math.pi * self.sigma**2) - (
            residual.pow(2).sum(-1) + trace_wsw
        ) / (2 * self.sigma**2)
        kl = 0.5 * (
            cov.diagonal(dim1=-2, dim2=-1).sum(-1)
            + loc.pow(2).sum(-1)
            - self.latent_dim
            - torch.logdet(cov)
        )
        return reconstruction, kl


class BernoulliTanh:
    """A 1-D latent and 30 binary pixels with logits a * tanh(w z + c), integrated on a grid."""

    def __init__(self, num_pixels=30, mixture_prior=False):
        generator = torch.Generator().manual_seed(2)
        self.a = 3 * torch.rand(num_pixels, generator=generator, dtype=torch.float64) + 1
        self.w = 2 * torch.randn(num_pixels, generator=generator, dtype=torch.float64)
        self.c = torch.randn(num_pixels, generator=generator, dtype=torch.float64)
        self.mixture_prior = mixture_prior
        self.grid = torch.linspace(-12, 12, 20001, dtype=torch.float64)
        self.guide_table = None

    def prior(self):
        if self.mixture_prior:
            components = dist.Normal(
                torch.tensor([[-1.5], [1.0]], dtype=torch.float64),
                torch.tensor([[0.5], [0.8]], dtype=torch.float64),
            ).to_event(1)
            weights = dist.Categorical(torch.tensor([0.3, 0.7], dtype=torch.float64))
            return dist.MixtureSameFamily(weights, components)
        return dist.Normal(torch.zeros(1, dtype=torch.float64), 1.0).to_event(1)

    def likelihood(self, z):
        return dist.Bernoulli(logits=self.a * torch.tanh(self.w * z + self.c)).to_event(1)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior())
            pyro.sample("x", self.likelihood(z), obs=x)

    def sample(self, num_data):
        return self.likelihood(self.prior().sample((num_data,))).sample()

    def log_joint_on_grid(self, x):
        """log p(x_n, z_g) of shape (grid, N)."""
        z = self.grid[:, None, None]
        return self.likelihood(z).log_prob(x) + self.prior().log_prob(z)

    def log_likelihood(self, x):
        step = self.grid[1] - self.grid[0]
        return self.log_joint_on_grid(x).logsumexp(0) + step.log()

    def fit_guide(self, x):
        """A Normal guide near, not at, each posterior: moments from the grid, then perturbed."""
        log_joint = self.log_joint_on_grid(x)
        post = (log_joint - log_joint.logsumexp(0)).exp()
        mean = (post * self.grid[:, None]).sum(0)
        std = (post * (self.grid[:, None] - mean) ** 2).sum(0).sqrt()
        self.guide_table = (x, mean + 0.3 * std, 1.2 * std)

    def guide(self, x):
        table, loc, scale = self.guide_table
        rows = torch.cdist(x, table).argmin(1)  # the guide must work on any slice of x
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc[rows, None], scale[rows, None]).to_event(1))

    def elbo(self, x):
        """Grid integral of E_q[log p(x, z) - log q(z|x)] for the fitted guide."""
        _, loc, scale = self.guide_table
        step = self.grid[1] - self.grid[0]
        log_q = dist.Normal(loc, scale).log_prob(self.grid[:, None])
        return (log_q.exp() * (self.log_joint_on_grid(x) - log_q)).sum(0) * step


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
