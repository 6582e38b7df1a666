"""Look at the latent space of VAEs trained on digits.

With a 2-D latent space the decoder's manifold can be drawn directly: a grid of codes at
quantiles of the N(0, I) prior (so equal areas of the grid hold equal prior mass, as in Kingma
and Welling's figure 4), each decoded to its mean image, beside the test digits' codes. A
larger latent space is shown through its codes (posterior means) projected to 2-D, by PCA
(linear) and by t-SNE (scikit-learn; nonlinear, keeps neighbourhoods, not distances).

Run::

    python examples/latent_space.py
    python examples/latent_space.py --latent-dims 2 --grid-size 20 --epochs 100
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from pyro_vae import VAE, Config, fit, load_dataset
from pyro_vae.plots import plot_images, plot_latent_space


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent-dims", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--grid-size", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for figures (default: temp)")
    return parser.parse_args()


@torch.no_grad()
def decode_quantile_grid(vae: VAE, grid_size: int) -> torch.Tensor:
    """Mean images at z = (Phi^-1(u), Phi^-1(v)) on a grid of u, v in (0, 1), top row first."""
    normal = torch.distributions.Normal(0.0, 1.0)
    q = normal.icdf(torch.linspace(0.5 / grid_size, 1 - 0.5 / grid_size, grid_size))
    z1, z2 = torch.meshgrid(q, q.flip(0), indexing="xy")
    z = torch.stack([z1.flatten(), z2.flatten()], dim=-1)
    return vae.likelihood.mean(vae.decoder(z))


def plot_projections(codes: torch.Tensor, labels: torch.Tensor, seed: int) -> Figure:
    codes, labels = codes.numpy(), labels.numpy()
    fig = Figure(figsize=(9, 4.2), layout="constrained")
    ax_pca, ax_tsne = fig.subplots(1, 2)
    projections = {
        f"PCA of {codes.shape[1]}-D codes": PCA(n_components=2).fit_transform(codes),
        f"t-SNE of {codes.shape[1]}-D codes": TSNE(
            perplexity=min(30.0, len(codes) - 1.0), init="pca", random_state=seed
        ).fit_transform(codes),
    }
    for ax, (title, xy) in zip((ax_pca, ax_tsne), projections.items()):
        points = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=5)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(points, ax=ax_tsne, label="digit")
    return fig


def main() -> None:
    args = parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="pyro_vae_latent_space_"))
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset("digits", binarize="dynamic")
    for latent_dim in args.latent_dims:
        vae = VAE(64, latent_dim, (args.hidden_dim,))
        config = Config(epochs=args.epochs, batch_size=100, lr=3e-3, seed=args.seed)
        rows = fit(vae, data, config)
        vae.eval()
        codes = vae.latent_code(data.test_x)
        print(f"latent_dim={latent_dim}: test ELBO {rows[-1]['test_elbo']:.2f} nats")
        if latent_dim == 2:
            images = decode_quantile_grid(vae, args.grid_size)
            title = "decoded N(0, I) quantile grid"
            fig = plot_images(images, data.image_shape, num_cols=args.grid_size, title=title)
            fig.savefig(out / "manifold.png", dpi=100)
            plot_latent_space(codes, data.test_y).savefig(out / "codes_2d.png", dpi=100)
            print(f"  figures: {out / 'manifold.png'}, {out / 'codes_2d.png'}")
        else:
            path = out / f"codes_{latent_dim}d_pca_tsne.png"
            plot_projections(codes, data.test_y, args.seed).savefig(path, dpi=100)
            print(f"  figure: {path}")


if __name__ == "__main__":
    main()
