import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torchvision.utils import make_grid

from pyro_vae import VAE
from pyro_vae.plots import (
    FIGURES,
    GRID_GAP,
    image_grid,
    plot_elbo_curves,
    plot_histogram,
    plot_images,
    plot_latent_space,
    plot_reconstructions,
    plot_training_comparison,
    run_figures,
    save_figures,
)

ROWS = [
    {"epoch": 1, "step": 8, "seconds": 0.5, "train_elbo": -40.0, "test_elbo": -38.0},
    {"epoch": 2, "step": 16, "seconds": 1.0, "train_elbo": -35.0, "test_elbo": -34.0},
]


@pytest.mark.parametrize("num, num_cols", [(1, 1), (1, 4), (3, 4), (4, 4), (5, 4), (12, 5)])
def test_image_grid_tiles_images_with_one_pixel_grey_gaps(num, num_cols):
    h, w = 3, 2
    images = torch.rand(num, h * w)
    grid = image_grid(images, (h, w), num_cols)
    num_rows = -(-num // num_cols)
    assert grid.shape == (num_rows * (h + 1) - 1, num_cols * (w + 1) - 1)
    for i, image in enumerate(images.reshape(-1, h, w)):
        r, c = divmod(i, num_cols)
        cell = grid[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w]
        assert np.array_equal(cell, image.numpy())
    # Every pixel not in an image (gaps and empty cells) is the gap grey.
    mask = np.ones(grid.shape, dtype=bool)
    for i in range(num):
        r, c = divmod(i, num_cols)
        mask[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = False
    assert np.all(grid[mask] == np.float32(GRID_GAP))


def test_image_grid_is_make_grid_without_its_frame():
    images = torch.rand(10, 12)
    expected = make_grid(images.reshape(-1, 1, 3, 4), nrow=4, padding=1, pad_value=GRID_GAP)
    assert np.array_equal(image_grid(images, (3, 4), 4), expected[0, 1:-1, 1:-1].numpy())


def test_image_grid_clamps_to_the_unit_interval():
    grid = image_grid(torch.tensor([[-1.0, 0.5, 2.0, 0.0]]), (2, 2), 1)
    assert grid.tolist() == [[0.0, 0.5], [1.0, 0.0]]


def test_plot_images_shows_black_on_white():
    fig = plot_images(torch.zeros(4, 4), (2, 2), num_cols=2, title="blank")
    (ax,) = fig.axes
    shown = ax.images[0].get_array()
    assert shown.shape == (5, 5) and shown[0, 0] == 1.0  # an image pixel of 0 shows white
    assert shown[2, 0] == pytest.approx(1 - GRID_GAP) and ax.get_title() == "blank"


def test_plot_functions_return_a_figure_and_draw_into_a_given_axes():
    fig = Figure()
    ax = fig.add_subplot()
    assert plot_elbo_curves({"a": ROWS, "b": ROWS}, x="step", ax=ax) is fig
    assert len(ax.lines) == 4 and ax.get_xlabel() == "step"
    assert isinstance(plot_histogram([0.5, 1.0, 2.0], "ratio", reference=1.0, log_x=True), Figure)
    for dim in (1, 2, 3):
        fig = plot_latent_space(torch.randn(20, dim), torch.arange(20) % 10)
        assert fig.axes[0].get_xlabel() == ("PC 1" if dim == 3 else "z[0]")
    x = torch.rand(6, 4)
    assert isinstance(plot_reconstructions(x, x, (2, 2), num_cols=3), Figure)
    curves = {"a": [{**row, "score": row["test_elbo"]} for row in ROWS]}
    fig = plot_training_comparison(curves, "score", "score (nats)")
    assert [a.get_xlabel() for a in fig.axes] == ["training steps", "training seconds"]


def test_run_figures_and_save_figures_write_the_pngs_of_a_run(digits, tmp_path):
    vae = VAE(64, latent_dim=2, hidden_dims=(8,)).train()
    figures = run_figures(vae, digits, ROWS)
    assert list(figures) == list(FIGURES) and not vae.training
    paths = save_figures(figures, tmp_path)
    assert paths == [tmp_path / name for name in FIGURES]
    for path in paths:
        assert path.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FIGURES)
