from pathlib import Path

import pyro
import pytest
import torch

#: Real MNIST in torchvision's layout, beside the repository (CI clones with ../shared beside it).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def pyro_state():
    """Every test starts from an empty param store, a fixed seed and Pyro validation on."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True):
        yield
    pyro.clear_param_store()


@pytest.fixture
def mnist_dir() -> Path:
    """The shared MNIST folder; a missing folder fails the test rather than skipping it."""
    if not (SHARED_DATA / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file():
        pytest.fail(f"real MNIST expected in {SHARED_DATA}/MNIST/raw (see README, 'Data')")
    return SHARED_DATA


@pytest.fixture(scope="session")
def digits():
    from pyro_vae.data import load_dataset

    return load_dataset("digits", binarize="dynamic")


@pytest.fixture(scope="session")
def train_tiny_run(digits):
    """A function training a 2-epoch, 2-D-latent VAE on digits into a run folder."""
    from pyro_vae import VAE, Config, fit

    tiny = {"epochs": 2, "latent_dim": 2, "hidden_dims": [16], "lr": 3e-3, "batch_size": 64}

    def train(run_dir, prior="normal"):
        torch.manual_seed(0)
        vae = VAE(digits.data_dim, latent_dim=2, hidden_dims=[16], prior=prior)
        fit(vae, digits, Config(**tiny, prior=prior), run_dir=run_dir)
        return run_dir

    return train


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
