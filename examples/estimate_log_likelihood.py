"""Importance-weighted log p(x): the bound tightens as the number of samples K grows.

A VAE is trained on binarized digits; then ``estimate_log_likelihood`` scores the test digits
with K = 1, 10, 100, 1000 draws from the guide q(z|x). K = 1 is a one-sample ELBO; the
expected estimate rises with K towards log p(x) (Burda et al., 2016), and its Monte Carlo
standard error shrinks. The figure plots the mean over the test set against K.

Run::

    python examples/estimate_log_likelihood.py
    python examples/estimate_log_likelihood.py --ks 1 10 100 1000 5000 --epochs 100
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pyro
from matplotlib.figure import Figure

from pyro_vae import VAE, Config, fit, load_dataset
from pyro_vae.estimators import estimate_elbo, estimate_log_likelihood


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--latent-dim", type=int, default=8)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--num-test", type=int, default=300, help="test digits to score")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for the figure (default: temp)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="pyro_vae_log_likelihood_"))
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset("digits", binarize="dynamic")
    vae = VAE(64, args.latent_dim, (args.hidden_dim,))
    fit(vae, data, Config(epochs=args.epochs, batch_size=100, lr=3e-3, seed=args.seed))
    x = data.test_x[: args.num_test]

    pyro.set_rng_seed(args.seed)
    elbo = estimate_elbo(vae.model, vae.guide, x, analytic_kl=True, num_particles=100)
    print(f"ELBO (analytic KL, 100 draws): {elbo.mean().item():8.3f} nats per digit")
    means = []
    for k in sorted(args.ks):
        log_px, stderr = estimate_log_likelihood(
            vae.model, vae.guide, x, num_samples=k, return_stderr=True
        )
        means.append(log_px.mean().item())
        mc = f"{stderr.mean().item():.3f}" if k > 1 else "  n/a"
        print(f"log p(x), K={k:<5}: {means[-1]:8.3f} nats per digit (mean MC stderr {mc})")
    print(f"gain from K={min(args.ks)} to K={max(args.ks)}: {means[-1] - means[0]:.3f} nats")

    fig = Figure(figsize=(5, 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(sorted(args.ks), means, marker="o", label="importance-weighted log p(x)")
    ax.axhline(elbo.mean().item(), color="C1", ls="--", label="ELBO")
    ax.set_xscale("log")
    ax.set_xlabel("importance samples K")
    ax.set_ylabel("mean log p(x) estimate (nats)")
    ax.legend()
    fig.savefig(out / "log_likelihood_vs_k.png", dpi=100)
    print(f"figure: {out / 'log_likelihood_vs_k.png'}")


if __name__ == "__main__":
    main()
