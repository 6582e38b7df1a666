"""Write the model yourself: a VAE whose prior is a hand-written Laplace, not a registered part.

``LaplaceVAE`` subclasses :class:`pyro_vae.VAE` and overrides ``model`` with plain Pyro: the
latent ``z`` gets independent Laplace(0, b) coordinates (b = 1/sqrt(2), so unit variance like
N(0, I)) through ``pyro.sample``. Because the model keeps the sites ``"z"`` and ``"x"`` under
one ``pyro.plate("data", N)``, everything else works unchanged: ``fit`` trains it (with the
Monte Carlo ELBO, as there is no closed-form KL from a Gaussian to a Laplace),
``estimate_log_likelihood`` scores it, it is compared with the standard VAE and plotted, and
``load_run(run_dir, vae=LaplaceVAE(...))`` reloads its run folder.

Run::

    python examples/custom_model.py
    python examples/custom_model.py --epochs 60 --out custom_figures
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from matplotlib.figure import Figure
from pyro import poutine

from pyro_vae import VAE, Config, fit, load_dataset, load_run
from pyro_vae.estimators import estimate_log_likelihood
from pyro_vae.plots import plot_elbo_curves, plot_images


class LaplaceVAE(VAE):
    """A VAE with the prior p(z) = prod_d Laplace(z_d | 0, 1/sqrt(2)), written in the model."""

    def laplace_prior(self, like: torch.Tensor) -> dist.TorchDistribution:
        loc = like.new_zeros(self.latent_dim)
        return dist.Laplace(loc, torch.full_like(loc, 1 / math.sqrt(2))).to_event(1)

    def model(self, x: torch.Tensor) -> None:
        self.check_input(x)
        pyro.module("decoder", self.decoder)
        pyro.module("likelihood", self.likelihood)
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=self.kl_scale):  # keeps beta and KL warm-up working
                z = pyro.sample("z", self.laplace_prior(x))
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        # The base class samples self.prior, which this model no longer uses.
        weight = next(self.decoder.parameters())
        z = self.laplace_prior(weight).sample((num_samples,))
        return self.likelihood.mean(self.decoder(z))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--latent-dim", type=int, default=8)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--num-samples", type=int, default=200, help="K for log p(x)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for figures and runs (default: temp)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="pyro_vae_custom_model_"))
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset("digits", binarize="dynamic")
    models = {
        "Laplace prior (custom model)": LaplaceVAE(64, args.latent_dim, (args.hidden_dim,)),
        "N(0, I) prior (VAE)": VAE(64, args.latent_dim, (args.hidden_dim,)),
    }
    curves, scores = {}, {}
    for (label, vae), folder in zip(models.items(), ("run_laplace", "run_normal")):
        config = Config(epochs=args.epochs, batch_size=100, lr=3e-3, seed=args.seed)
        curves[label] = fit(vae, data, config, run_dir=out / folder)
        pyro.set_rng_seed(args.seed)
        log_px, stderr = estimate_log_likelihood(
            vae.model, vae.guide, data.test_x, args.num_samples, return_stderr=True
        )
        scores[label] = log_px
        print(
            f"{label:<30} test ELBO {curves[label][-1]['test_elbo']:8.2f}   "
            f"log p(x) {log_px.mean().item():8.2f} (K={args.num_samples}, "
            f"mean stderr {stderr.mean().item():.2f})"
        )
    laplace, normal = scores.values()
    diff = laplace - normal  # paired over the test digits
    stderr = diff.std().item() / math.sqrt(len(diff))
    print(f"log p(x), Laplace - Normal: {diff.mean().item():.2f} +- {stderr:.2f} nats per digit")

    # The run folder records the custom class; rebuild it yourself to reload the weights.
    run = load_run(out / "run_laplace", vae=LaplaceVAE(64, args.latent_dim, (args.hidden_dim,)))
    print(f"reloaded {run.config.vae_class} from {run.path}")

    plot_elbo_curves(curves).savefig(out / "elbo_curves.png", dpi=100)
    fig = Figure(figsize=(6, 3.2), layout="constrained")
    for ax, (label, vae) in zip(fig.subplots(1, 2), models.items()):
        pyro.set_rng_seed(args.seed)
        plot_images(vae.sample(25), data.image_shape, num_cols=5, title=label, ax=ax)
    fig.savefig(out / "samples.png", dpi=100)
    print(f"figures: {out / 'elbo_curves.png'}, {out / 'samples.png'}")


if __name__ == "__main__":
    main()
