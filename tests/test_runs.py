import dataclasses
import json
import math
import pickle

import pyro
import pytest
import torch
from common import craft_valid_elbos, tiny_config, tiny_vae, without_seconds

from pyro_vae import VAE, Config, fit, load_run, resume_run, train_run
from pyro_vae.describe import build_vae
from pyro_vae.plots import FIGURES
from pyro_vae.runs import (
    RunFolderError,
    RunInterrupted,
    atomic_write_text,
    holds_run,
    load_checkpoint,
    load_config,
    load_run_dataset,
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


def test_metrics_of_an_older_run_gain_the_new_columns_as_nan(tmp_path):
    # A run written before the lr column existed, resumed by this version.
    old = {"epoch": 1, "step": 5, "train_elbo": -3.5, "test_elbo": -4.25, "seconds": 0.5}
    new = {"epoch": 2, "step": 10, "lr": 1e-3, "train_elbo": -3.0, "test_elbo": -4.0, "seconds": 1}
    write_metrics(tmp_path, [old, new])
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert header == "epoch,step,train_elbo,test_elbo,seconds,lr"
    first, second = read_metrics(tmp_path)
    assert math.isnan(first.pop("lr")) and first == old and second == new


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
    config = dataclasses.replace(load_config(run_dir), latent_dim=5)
    other = build_vae(config)
    save_checkpoint(tmp_path, other, torch.optim.Adam(other.parameters()), config, 1, 1)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    state["config"]["latent_dim"] = 3
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="does not fit the model its config describes"):
        load_run(tmp_path)


def test_broken_config_json_error(tmp_path):
    (tmp_path / "config.json").write_text('{"latent_dim": ')
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        load_config(tmp_path / "missing")


# -- train_run and resume_run: what `pyro-vae train` does, from Python ----------------------------


def test_train_run_writes_a_whole_run_folder_and_returns_the_run(tmp_path):
    run = train_run(tiny_config(epochs=2, seed=4), tmp_path / "run")
    assert run.path == tmp_path / "run" and run.checkpoint["epoch"] == 2
    assert {"config.json", "metrics.csv", "checkpoint.pt", *FIGURES} <= {
        p.name for p in run.path.iterdir()
    }
    assert run.config == load_config(run.path)
    assert (run.config.binarize, run.config.data_dim, run.config.image_shape) == (
        "dynamic",
        64,
        [8, 8],
    )
    assert without_seconds(run.metrics) == without_seconds(read_metrics(run.path))
    loaded = load_run(run.path)
    x = torch.rand(5, 64)
    assert torch.equal(loaded.vae.reconstruct(x), run.vae.reconstruct(x))


def test_train_run_repeats_fit_with_the_same_seed(tmp_path, digits):
    config = tiny_config(epochs=2, seed=3)
    run = train_run(config, tmp_path / "run")
    pyro.set_rng_seed(config.seed)  # train_run builds the model after seeding, as the CLI did
    expected = fit(tiny_vae(), digits, config)
    assert without_seconds(run.metrics) == without_seconds(expected)


def test_train_run_calls_its_hooks(tmp_path):
    calls = []
    run = train_run(
        tiny_config(epochs=2),
        tmp_path / "run",
        on_train_start=lambda vae, config, epoch: calls.append((type(vae), config.epochs, epoch)),
        on_epoch_end=lambda row: calls.append(row["epoch"]),
    )
    assert calls == [(VAE, 2, 0), 1, 2]
    assert run.metrics[-1]["epoch"] == 2


def test_train_run_leaves_the_callers_config_alone(tmp_path):
    config = tiny_config(epochs=1)
    run = train_run(config, tmp_path / "run")
    assert config == tiny_config(epochs=1) and config.data_dim is None
    assert run.config.data_dim == 64 and run.config.binarize == "dynamic"


def stop_after_epoch(epoch):
    def stop(row):
        if row["epoch"] == epoch:
            raise KeyboardInterrupt

    return stop


def test_interrupted_train_run_says_which_epoch_is_kept_and_resume_repeats_the_numbers(tmp_path):
    config = tiny_config(epochs=3, seed=5, num_particles=2)
    whole = train_run(config, tmp_path / "whole")
    run_dir = tmp_path / "cut"
    with pytest.raises(RunInterrupted) as info:
        train_run(config, run_dir, on_epoch_end=stop_after_epoch(2))
    assert isinstance(info.value, KeyboardInterrupt)
    assert (info.value.run_dir, info.value.epoch) == (run_dir, 2)
    assert f"{run_dir / 'checkpoint.pt'} holds epoch 2" in str(info.value)
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 2
    resumed = resume_run(run_dir)
    assert without_seconds(resumed.metrics) == without_seconds(whole.metrics)
    assert without_seconds(read_metrics(run_dir)) == without_seconds(whole.metrics)
    assert resumed.checkpoint["epoch"] == 3 and (run_dir / "samples.png").is_file()


def test_resume_run_with_more_epochs_continues_the_same_run(tmp_path):
    config = tiny_config(epochs=3, seed=1)
    whole = train_run(config, tmp_path / "whole")
    short = train_run(dataclasses.replace(config, epochs=2), tmp_path / "short")
    assert short.checkpoint["epoch"] == 2
    longer = resume_run(short.path, epochs=3)
    assert longer.config.epochs == 3 and load_config(short.path).epochs == 3
    assert without_seconds(longer.metrics) == without_seconds(whole.metrics)
    # Asking for the epochs it already has trains nothing and keeps the numbers.
    again = resume_run(short.path)
    assert without_seconds(again.metrics) == without_seconds(whole.metrics)


def test_resume_run_refuses_fewer_epochs_than_trained(tmp_path):
    run = train_run(tiny_config(epochs=2), tmp_path / "run")
    with pytest.raises(RunFolderError, match="config.epochs 1 is fewer than the 2 epochs already"):
        resume_run(run.path, epochs=1)
    with pytest.raises(ValueError, match="epochs must be a positive integer, got '3'"):
        resume_run(run.path, epochs="3")


def test_train_run_refuses_a_folder_holding_a_run(tmp_path):
    run = train_run(tiny_config(epochs=1), tmp_path / "run")
    assert holds_run(run.path)
    before = {p.name: p.stat().st_mtime_ns for p in run.path.iterdir()}
    with pytest.raises(RunFolderError, match="already holds a run; continue it with resume_run"):
        train_run(tiny_config(epochs=1), run.path)
    assert {p.name: p.stat().st_mtime_ns for p in run.path.iterdir()} == before
    (tmp_path / "file").write_text("")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        train_run(tiny_config(epochs=1), tmp_path / "file")


def test_train_run_checks_its_input_before_making_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="batch_size 5000 is larger than the 1497 training"):
        train_run(tiny_config(batch_size=5000))
    with pytest.raises(TypeError, match="config must be a pyro_vae Config, got dict"):
        train_run({"epochs": 1})
    assert list(tmp_path.iterdir()) == []


def test_interrupt_before_the_run_folder_exists_is_a_plain_keyboard_interrupt(
    tmp_path, monkeypatch
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pyro_vae.runs.load_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt) as info:
        train_run(tiny_config(epochs=1), tmp_path / "run")
    assert not isinstance(info.value, RunInterrupted)
    assert not (tmp_path / "run").exists()


def test_train_run_without_a_folder_makes_a_new_one_under_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = train_run(tiny_config(epochs=1))
    assert run.path.resolve().parent == tmp_path.resolve() / "runs" and holds_run(run.path)


def test_resume_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run folder .*missing does not exist"):
        resume_run(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    with pytest.raises(FileNotFoundError, match="has no checkpoint.pt: the run stopped before"):
        resume_run(tmp_path)


def test_a_data_folder_from_config_json_must_exist_and_is_never_downloaded_into(tmp_path):
    missing = tmp_path / "missing"
    config = tiny_config(data_dir=str(missing), dataset="mnist", binarize="dynamic")
    with pytest.raises(FileNotFoundError, match="the data folder .*missing.* does not exist"):
        load_run_dataset(config)
    empty = tmp_path / "empty"
    empty.mkdir()
    config = dataclasses.replace(config, data_dir=str(empty))
    with pytest.raises(FileNotFoundError, match="downloading is off"):
        load_run_dataset(config)
    assert list(empty.iterdir()) == [] and not missing.exists()
    # A folder the caller names is used as given (digits needs no files at all).
    digits = dataclasses.replace(config, dataset="digits")
    assert load_run_dataset(digits, data_dir=tmp_path / "new").binarize == "dynamic"


def test_load_run_dataset_binarizes_as_the_likelihood_needs_when_unset():
    assert load_run_dataset(tiny_config()).binarize == "dynamic"
    assert load_run_dataset(tiny_config(likelihood="normal")).binarize == "none"
    assert load_run_dataset(tiny_config(binarize="static")).binarize == "static"


# -- best.pt, and resuming mid-schedule and mid-patience ------------------------------------------

#: Held-out images of these tests: no other input of evaluate_elbo has this many rows.
NUM_VALID = 97


def test_a_run_without_a_validation_split_writes_no_best_pt_and_loads_the_last(trained_run):
    run_dir, _ = trained_run
    assert not (run_dir / "best.pt").exists()
    assert load_run(run_dir).checkpoint_file == "checkpoint.pt"
    with pytest.raises(FileNotFoundError, match="has no best.pt: it was trained without a valid"):
        load_run(run_dir, checkpoint="best")
    with pytest.raises(ValueError, match=r"unknown checkpoint 'first'; choose one of \['best'"):
        load_run(run_dir, checkpoint="first")


def test_load_run_reads_best_pt_by_default_and_the_last_on_request(tmp_path, monkeypatch):
    craft_valid_elbos(monkeypatch, [-50.0, -40.0, -45.0], NUM_VALID)
    run = train_run(tiny_config(epochs=3, validation_size=NUM_VALID), tmp_path / "run")
    best, last = load_run(run.path), load_run(run.path, checkpoint="last")
    assert (best.checkpoint_file, best.checkpoint["epoch"]) == ("best.pt", 2)
    assert (last.checkpoint_file, last.checkpoint["epoch"]) == ("checkpoint.pt", 3)
    assert load_run(run.path, checkpoint="best").checkpoint["epoch"] == 2
    x = torch.rand(4, 64)
    assert torch.equal(last.vae.reconstruct(x), run.vae.reconstruct(x))
    assert not torch.equal(best.vae.reconstruct(x), run.vae.reconstruct(x))


def interrupted_and_resumed(config, tmp_path, epoch, monkeypatch=None, valid_elbos=None):
    """The run of ``config`` straight through, and interrupted after ``epoch`` then resumed."""
    runs = []
    for name, stop in (("whole", None), ("cut", stop_after_epoch(epoch))):
        if valid_elbos is not None:
            craft_valid_elbos(monkeypatch, valid_elbos, NUM_VALID)
        if stop is None:
            runs.append(train_run(config, tmp_path / name))
            continue
        with pytest.raises(RunInterrupted):
            train_run(config, tmp_path / name, on_epoch_end=stop)
        runs.append(resume_run(tmp_path / name))
    return runs


def same_weights(first, second):
    return (
        all(torch.equal(v, second[k]) for k, v in first.items()) and first.keys() == second.keys()
    )


@pytest.mark.parametrize(
    "options",
    [{"lr_schedule": "iwae", "lr": 1e-2}, {"lr_schedule": "exponential", "lr_decay": 0.5}],
)
def test_a_run_resumed_mid_schedule_repeats_the_uninterrupted_one(tmp_path, options):
    config = tiny_config(epochs=6, seed=2, **options)
    whole, resumed = interrupted_and_resumed(config, tmp_path, epoch=3)
    assert without_seconds(resumed.metrics) == without_seconds(whole.metrics)
    assert len({row["lr"] for row in whole.metrics}) >= 3  # the rate changes after the cut
    assert same_weights(resumed.vae.state_dict(), whole.vae.state_dict())
    assert resumed.checkpoint["lr_scheduler"] == whole.checkpoint["lr_scheduler"]


def test_a_run_resumed_mid_plateau_and_mid_patience_repeats_the_uninterrupted_one(
    tmp_path, monkeypatch
):
    config = tiny_config(
        epochs=8,
        seed=2,
        validation_size=NUM_VALID,
        patience=3,
        lr_schedule="plateau",
        plateau_patience=0,
        plateau_factor=0.5,
    )
    # Best at epoch 2; the cut after epoch 4 is two epochs into the patience of 3.
    elbos = [-50.0, -40.0, -45.0, -41.0, -42.0, -30.0, -20.0, -10.0]
    whole, resumed = interrupted_and_resumed(config, tmp_path, 4, monkeypatch, elbos)
    assert [row["epoch"] for row in whole.metrics] == [1, 2, 3, 4, 5]
    assert [row["lr"] for row in whole.metrics] == [1e-3, 1e-3, 1e-3, 5e-4, 2.5e-4]
    assert without_seconds(resumed.metrics) == without_seconds(whole.metrics)
    assert same_weights(resumed.vae.state_dict(), whole.vae.state_dict())
    for name in ("best.pt", "checkpoint.pt"):
        cut, straight = (load_checkpoint(run.path / name) for run in (resumed, whole))
        assert cut["epoch"] == straight["epoch"] and same_weights(cut["model"], straight["model"])
    assert resumed.checkpoint["early_stopping"] == {"best": -40.0, "best_epoch": 2, "bad_epochs": 3}
    # A run that stopped early stays stopped, even when asked for more epochs.
    assert len(resume_run(resumed.path, epochs=10).metrics) == 5
