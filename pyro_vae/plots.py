"""Figures. Each ``plot_*`` function takes data (and ``ax=None``) and returns the Figure.

Figures are built with :class:`matplotlib.figure.Figure` directly, never through pyplot, so the
library leaves matplotlib's global state and backend alone. :func:`save_figures` is the one
place that writes figures to files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


#: Grey level of the gaps between the images of a grid (and of its empty cells).
GRID_GAP = 0.2


def image_grid(images: torch.Tensor, image_shape: Sequence[int], num_cols: int) -> np.ndarray:
    """Tile flat images ``(N, H*W)`` into one array, ``num_cols`` to a row, with 1-pixel gaps
    of grey :data:`GRID_GAP` between them (none around the border), as
    :func:`torchvision.utils.make_grid` lays them out."""
    from torchvision.utils import make_grid  # slow import, only needed here

    h, w = image_shape
    images = images.detach().float().cpu().clamp(0, 1).reshape(-1, 1, h, w)
    if len(images) < num_cols:  # make_grid would narrow the grid to the images there are
        blank = images.new_full((num_cols - len(images), 1, h, w), GRID_GAP)
        images = torch.cat([images, blank])
    grid = make_grid(images, nrow=num_cols, padding=1, pad_value=GRID_GAP)[0]
    # make_grid frames the grid too, except around a single image.
    return (grid if len(images) == 1 else grid[1:-1, 1:-1]).numpy()


def plot_images(
    images: torch.Tensor,
    image_shape: Sequence[int],
    num_cols: int = 8,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Show flat images in [0, 1] as a grid, black on white."""
    grid = image_grid(images, image_shape, num_cols)
    fig, ax = _axes(ax, (num_cols * 0.6, grid.shape[0] / grid.shape[1] * num_cols * 0.6 + 0.4))
    ax.imshow(1 - grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return fig


def plot_reconstructions(
    originals: torch.Tensor,
    reconstructions: torch.Tensor,
    image_shape: Sequence[int],
    num_cols: int = 8,
    ax: Axes | None = None,
) -> Figure:
    """Originals and their reconstructions in alternating rows."""
    rows = []
    for start in range(0, len(originals), num_cols):
        rows += [originals[start : start + num_cols], reconstructions[start : start + num_cols]]
    images = torch.cat(rows)
    return plot_images(
        images, image_shape, num_cols, "test images (odd rows) and reconstructions", ax
    )


def plot_elbo_curves(
    curves: dict[str, list[dict]],
    x: str = "epoch",
    ax: Axes | None = None,
) -> Figure:
    """Train and test ELBO curves of one or more runs.

    :param dict curves: label -> metrics rows (``epoch``, ``train_elbo``, ``test_elbo``, ...).
    :param str x: the column for the horizontal axis (``epoch``, ``step`` or ``seconds``).
    """
    fig, ax = _axes(ax, (6, 4))
    for i, (label, rows) in enumerate(curves.items()):
        xs = [row[x] for row in rows]
        color, prefix = f"C{i}", f"{label} " if label else ""
        ax.plot(xs, [row["train_elbo"] for row in rows], "--", color=color, label=f"{prefix}train")
        ax.plot(xs, [row["test_elbo"] for row in rows], "-", color=color, label=f"{prefix}test")
    ax.set_xlabel(x)
    ax.set_ylabel("ELBO (nats per datapoint)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_latent_space(
    codes: torch.Tensor,
    labels: torch.Tensor | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Scatter latent codes coloured by label: 2-D codes directly, 1-D codes against the label
    (or the row), others after PCA to 2-D."""
    codes = codes.detach().float().cpu().numpy()
    fig, ax = _axes(ax, (5.5, 5))
    if codes.shape[1] == 1:
        other = np.arange(len(codes)) if labels is None else labels.cpu().numpy()
        xy = np.stack([codes[:, 0], other], axis=1)
        names = ("z[0]", "row" if labels is None else "label")
    elif codes.shape[1] == 2:
        xy, names = codes, ("z[0]", "z[1]")
    else:
        from sklearn.decomposition import PCA

        xy, names = PCA(n_components=2).fit_transform(codes), ("PC 1", "PC 2")
    colors = None if labels is None else labels.cpu().numpy()
    points = ax.scatter(xy[:, 0], xy[:, 1], c=colors, cmap="tab10", s=4, alpha=0.7)
    if labels is not None:
        fig.colorbar(points, ax=ax, label="label")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    return fig


#: The figures :func:`run_figures` makes for a run folder.
FIGURES = ("elbo.png", "reconstructions.png", "samples.png", "latent_space.png")


@torch.no_grad()
def run_figures(vae, dataset, metrics: list[dict]) -> dict[str, Figure]:
    """The standard figures of a trained run, by file name (see :data:`FIGURES`).

    :param vae: the trained :class:`~pyro_vae.vae.VAE`; put in eval mode.
    :param dataset: its :class:`~pyro_vae.data.Dataset` (test split is shown).
    :param list metrics: the rows returned by :func:`~pyro_vae.train.fit`.
    """
    vae.eval()
    x = dataset.test_x[:32]
    return {
        "elbo.png": plot_elbo_curves({"": metrics}),
        "reconstructions.png": plot_reconstructions(x, vae.reconstruct(x), dataset.image_shape),
        "samples.png": plot_images(vae.sample(64), dataset.image_shape, title="prior samples"),
        "latent_space.png": plot_latent_space(
            torch.cat([vae.latent_code(c) for c in dataset.test_x.split(2000)]), dataset.test_y
        ),
    }


def save_figures(figures: dict[str, Figure], folder: str | Path) -> list[Path]:
    """Write each figure to ``folder / name`` as a PNG; returns the paths, in order.

    :param dict figures: file name -> figure, as :func:`run_figures` returns them.
    :param folder: an existing folder, such as a run folder.
    """
    paths = []
    for name, fig in figures.items():
        fig.savefig(Path(folder) / name, dpi=120)
        paths.append(Path(folder) / name)
    return paths


def plot_training_comparison(
    curves: dict[str, list[dict]],
    y: str = "test_elbo",
    ylabel: str = "test ELBO (nats per datapoint)",
    axes: Sequence[Axes] | None = None,
) -> Figure:
    """One score of several training runs against steps (left) and seconds (right).

    :param dict curves: label -> rows with ``step``, ``seconds`` and the column ``y``.
    :param str y: the column for the vertical axis.
    :param str ylabel: its label.
    :param axes: two axes to draw into, or ``None`` for a new figure.
    """
    if axes is None:
        fig = Figure(figsize=(10, 4), layout="constrained")
        axes = fig.subplots(1, 2, sharey=True)
    fig = axes[0].figure
    for ax, x in zip(axes, ("step", "seconds")):
        for i, (label, rows) in enumerate(curves.items()):
            ax.plot([r[x] for r in rows], [r[y] for r in rows], "o-", color=f"C{i}", label=label)
        ax.set_xlabel("training steps" if x == "step" else "training seconds")
        ax.grid(alpha=0.3)
    # Zoom on the last two thirds of training, where the estimators differ by a nat or so;
    # the first epochs (hundreds of nats lower) would flatten every curve.
    tails = [r[y] for rows in curves.values() for r in rows[len(rows) // 3 :] if r[y] is not None]
    if tails:
        low, high = min(tails), max(tails)
        pad = 0.1 * (high - low) or 1.0
        axes[0].set_ylim(low - pad, high + pad)
    axes[0].set_ylabel(ylabel)
    axes[0].legend()
    return fig


def plot_gradient_snr(rows: Sequence[dict], axes: Sequence[Axes] | None = None) -> Figure:
    """Gradient SNR against the number of particles K, one line per objective and one panel
    per parameter group (log-log).

    :param rows: the ``rows`` of :func:`~pyro_vae.compare.compare_objective_gradients`.
    :param axes: one axis per group to draw into, or ``None`` for a new figure.
    """
    groups = sorted({key for row in rows for key, v in row.items() if isinstance(v, dict)})
    if axes is None:
        fig = Figure(figsize=(5 * len(groups), 4), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(groups), sharey=True))
    fig = axes[0].figure
    objectives = list(dict.fromkeys(row["objective"] for row in rows))
    for ax, group in zip(axes, groups):
        for i, name in enumerate(objectives):
            mine = [r for r in rows if r["objective"] == name and r[group]["snr"] is not None]
            ks = [r["num_particles"] for r in mine]
            # Objectives that share a gradient (the decoder's, within a family) overlap: their
            # markers shrink from one to the next so that every one stays visible.
            style = {"marker": "os^vD"[i % 5], "markersize": 10 - 1.5 * (i % 5)}
            ax.plot(ks, [r[group]["snr"] for r in mine], "-", color=f"C{i}", label=name, **style)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("particles K")
        ax.set_title(f"{group} parameters")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("gradient SNR, ||mean|| / sqrt(total variance)")
    axes[0].legend()
    return fig


def plot_histogram(
    values: Sequence[float],
    xlabel: str,
    reference: float | None = None,
    bins: int = 40,
    log_x: bool = False,
    ax: Axes | None = None,
) -> Figure:
    """Histogram of ``values``, with an optional dashed vertical line at ``reference``.

    ``log_x`` uses a logarithmic axis with geometric bins (for ratios; values must be > 0).
    """
    fig, ax = _axes(ax, (6, 4))
    values = np.asarray(values, dtype=float)
    if log_x:
        bins = np.geomspace(values.min(), values.max(), bins + 1) if np.ptp(values) else bins
        ax.set_xscale("log")
    ax.hist(values, bins=bins, color="C0", alpha=0.8)
    if reference is not None:
        ax.axvline(reference, color="k", linestyle="--", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.grid(alpha=0.3)
    return fig
