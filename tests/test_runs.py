import json
import pickle

import pyro
import pytest
import torch

from pyro_vae import VAE, Config, fit, load_run
from pyro_vae.runs import (
    atomic_write_text,
    build_vae,
    load_checkpoint,
    load_config,
    read_metrics,
    save_checkpoint,
    write_metrics,
)


@pytest.fixture
def trained_run(digits, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    config = Config(latent_dim=3, hidden_dims=[24], epochs=2, batch_size=100)
    vae = VAE(64, latent_dim=3, hidden_dims=(24,))
    fit(vae, digits, config, run_dir=run_dir)
    return run_dir, vae


def test_checkpoint_round_trip_reproduces_reconstructions_and_samples(trained_run, digits):
    run_dir, vae = trained_run
    run = load_run(run_dir)
    x = digits.test_x[:10]
    assert torch.equal(run.vae.reconstruct(x), vae.eval().reconstruct(x))
    pyro.set_rng_seed(3)
    expected = vae.sample(5)
    pyro.set_rng_seed(3)
    assert torch.equal(run.vae.sample(5), expected)
    assert run.checkpoint["epoch"] == 2
    assert [row["epoch"] for row in run.metrics] == [1, 2]


def test_checkpoint_loads_with_weights_only(trained_run):
    run_dir, _ = trained_run
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "config", "epoch", "step", "rng"} <= set(state)


def test_a_cpu_checkpoint_holds_the_torch_rng_and_no_cuda_rng(tmp_path):
    vae = VAE(64, latent_dim=2, hidden_dims=(8,))
    config = Config(latent_dim=2, hidden_dims=[8], data_dim=64)
    torch.manual_seed(11)
    expected = torch.get_rng_state()
    save_checkpoint(tmp_path, vae, torch.optim.Adam(vae.parameters()), config, 4, 40)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    # A CPU run records (and so never initialises) no CUDA generator.
    assert state["rng"]["cuda"] == []
    assert torch.equal(state["rng"]["torch"], expected)
    assert (state["epoch"], state["step"]) == (4, 40)


def test_fit_refuses_a_model_its_config_cannot_rebuild_before_writing(digits, tmp_path):
    vae = VAE(64, latent_dim=2, hidden_dims=(8,))
    # A parameter no config field describes: load_run could not rebuild this model.
    vae.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    run_dir = tmp_path / "run"
    match = r"the config describes another model than the VAE being trained .*differ at 'extra'"
    with pytest.raises(ValueError, match=match):
        fit(vae, digits, Config(latent_dim=2, hidden_dims=[8], epochs=1), run_dir=run_dir)
    assert list(tmp_path.iterdir()) == []


def test_config_json_rebuilds_the_same_model(trained_run, digits):
    run_dir, vae = trained_run
    config = load_config(run_dir)
    assert config.data_dim == 64 and config.image_shape == [8, 8]
    assert config.binarize == "dynamic"
    rebuilt = build_vae(config)
    shapes = {k: v.shape for k, v in rebuilt.state_dict().items()}
    assert shapes == {k: v.shape for k, v in vae.state_dict().items()}
    rebuilt.load_state_dict(vae.state_dict())
    x = digits.test_x[:4]
    assert torch.equal(rebuilt.reconstruct(x), vae.reconstruct(x))
    data = json.loads((run_dir / "config.json").read_text())
    assert data == config.to_dict()


def test_metrics_csv_round_trip(tmp_path):
    rows = [{"epoch": 1, "step": 5, "train_elbo": -3.5, "test_elbo": -4.25, "seconds": 0.5}]
    write_metrics(tmp_path, rows)
    assert read_metrics(tmp_path) == rows
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == (
        "epoch,step,train_elbo,test_elbo,seconds"
    )


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    atomic_write_text(path, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("pyro_vae.runs.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_load_run_missing_folder_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run folder .*nope does not exist"):
        load_run(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_run(tmp_path)


def test_truncated_checkpoint_error(trained_run, tmp_path):
    run_dir, _ = trained_run
    data = (run_dir / "checkpoint.pt").read_bytes()
    broken = tmp_path / "checkpoint.pt"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(broken)


def test_not_a_checkpoint_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="is not a pyro_vae checkpoint"):
        load_checkpoint(path)
    path.write_text("hello")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(path)


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch EXPLOITED",))


def test_malicious_checkpoint_is_refused_and_its_code_does_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "checkpoint.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Exploit(), "config": {}}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to load .* may run code"):
        load_checkpoint(path)
    assert not (tmp_path / "EXPLOITED").exists()


def test_checkpoint_from_another_version_error(trained_run, tmp_path):
    run_dir, _ = trained_run
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state["format_version"] = 99
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="format 99; this pyro_vae reads format 1"):
        load_checkpoint(tmp_path / "checkpoint.pt")


def test_checkpoint_of_another_model_shape_error(trained_run, tmp_path):
    run_dir, vae = trained_run
    config = load_config(run_dir)
    config.latent_dim = 5
    other = build_vae(config)
    save_checkpoint(tmp_path, other, torch.optim.Adam(other.parameters()), config, 1, 1)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    state["config"]["latent_dim"] = 3
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="does not fit the model its config describes"):
        load_run(tmp_path)


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match=r"unknown config keys \['colour'\]"):
        Config.from_dict({"colour": "red"})
    with pytest.raises(ValueError, match="format version 2"):
        Config.from_dict({"format_version": 2})
    for key, value, match in [
        ("latent_dim", 0, "latent_dim must be a positive integer, got 0"),
        ("epochs", 1.5, "epochs must be a positive integer, got 1.5"),
        ("hidden_dims", [10, 0], r"hidden_dims must be positive integers, got \[10, 0\]"),
        ("lr", float("nan"), "lr must be a positive finite number, got nan"),
        ("beta", -1.0, "beta must be a positive finite number"),
        ("warmup_epochs", -1, "warmup_epochs must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            Config(**{key: value})


def test_broken_config_json_error(tmp_path):
    (tmp_path / "config.json").write_text('{"latent_dim": ')
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        load_config(tmp_path / "missing")
