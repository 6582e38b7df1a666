"""Swap the likelihood p(x|z): the same VAE trained on digits with different likelihoods.

The digits are grey levels k/16. ``bernoulli`` needs binary data, so that model is trained on
binarized digits; ``continuous_bernoulli``, ``normal``, ``laplace`` and ``learned_normal`` are
densities on the grey levels themselves, and ``discretized_logistic`` is a probability mass on
the 17 levels (it needs ``num_levels=17``; the script shows the error it gives without it).
ELBOs of different kinds of likelihood (mass or density, binary or grey data) are not on one
scale, so the comparison that holds across all of them is the reconstruction error on the grey
test digits, and the figure.

Run::

    python examples/swap_likelihood.py
    python examples/swap_likelihood.py --epochs 50 --out likelihood_figures
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pyro
from matplotlib.figure import Figure

from pyro_vae import VAE, Config, fit, load_dataset
from pyro_vae.likelihoods import Normal
from pyro_vae.plots import plot_images

#: likelihood -> (options, binarize the data?)
LIKELIHOODS = {
    "bernoulli": ({}, True),
    "continuous_bernoulli": ({}, False),
    "normal": ({"scale": 0.1}, False),
    "laplace": ({"scale": 0.05}, False),
    "learned_normal": ({}, False),
    "discretized_logistic": ({"num_levels": 17}, False),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--likelihoods", nargs="+", default=list(LIKELIHOODS), choices=list(LIKELIHOODS)
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--latent-dim", type=int, default=8)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for figures (default: temp)")
    return parser.parse_args()


def show_missing_num_levels_error(grey) -> None:
    vae = VAE(64, 2, (8,), likelihood="discretized_logistic")  # num_levels defaults to 256
    try:
        fit(vae, grey, Config(epochs=1))
    except ValueError as e:
        print(f"discretized_logistic without num_levels=17 on digits:\n  ValueError: {e}\n")


def main() -> None:
    args = parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="pyro_vae_swap_likelihood_"))
    out.mkdir(parents=True, exist_ok=True)
    grey = load_dataset("digits")
    binary = load_dataset("digits", binarize="dynamic")
    show_missing_num_levels_error(grey)

    x = grey.test_x
    rows = [x[:10]]  # originals, then one row of reconstructions per likelihood
    print(f"{'likelihood':<22} {'test ELBO':>10} {'recon. MAE':>11}")
    for name in args.likelihoods:
        options, binarize = LIKELIHOODS[name]
        pyro.set_rng_seed(args.seed)
        # By name with options, or by object: both build the same part.
        likelihood = Normal(64, **options) if name == "normal" else name
        vae = VAE(
            64,
            args.latent_dim,
            (args.hidden_dim,),
            likelihood=likelihood,
            likelihood_kwargs=None if name == "normal" else options,
        )
        config = Config(epochs=args.epochs, batch_size=100, lr=3e-3, seed=args.seed)
        history = fit(vae, binary if binarize else grey, config)
        recon = vae.reconstruct(x)
        mae = (recon - x).abs().mean().item()
        note = "  (binarized data)" if binarize else ""
        print(f"{name:<22} {history[-1]['test_elbo']:>10.2f} {mae:>11.4f}{note}")
        rows.append(recon[:10])
    print("(ELBO in nats per digit; MAE = mean |reconstruction - x| on the grey test digits)")

    fig = Figure(figsize=(5, 0.85 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 1)
    for ax, images, title in zip(axes, rows, ["test digits", *args.likelihoods]):
        plot_images(images, grey.image_shape, num_cols=10, title=title, ax=ax)
    fig.savefig(out / "reconstructions.png", dpi=100)
    print(f"figure: {out / 'reconstructions.png'}")


if __name__ == "__main__":
    main()
