import json
import subprocess
import sys
import warnings

import pytest
import torch
import torchvision
from common import TINY_TRAIN as TINY
from common import one_line_error

from pyro_vae import DATASETS, ELBOS, GUIDES, LIKELIHOODS, PRIORS, load_run
from pyro_vae.cli import build_parser, main, name_flags
from pyro_vae.estimators import AnalyticKLWarning


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


def test_train_writes_every_file_of_the_run_folder(run_dir, capsys):
    names = {p.name for p in run_dir.iterdir()}
    expected = {"config.json", "metrics.csv", "checkpoint.pt"}
    expected |= {"elbo.png", "reconstructions.png", "samples.png", "latent_space.png"}
    assert expected <= names
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",")[:5] == ["epoch", "step", "kl_scale", "train_elbo", "test_elbo"]
    assert len(lines) == 3
    config = json.loads((run_dir / "config.json").read_text())
    assert config["latent_dim"] == 2 and config["hidden_dims"] == [16]
    assert load_run(run_dir).vae.latent_dim == 2


def test_train_prints_where_the_run_went(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    assert f"run saved to {out}" in capsys.readouterr().out


def test_sample_writes_a_png(run_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", str(run_dir), "--num", "12", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert str(out) in capsys.readouterr().out
    assert main(["sample", str(run_dir), "--num", "4"]) == 0
    assert (run_dir / "sample_grid.png").is_file()


def test_help_lists_every_flag_with_default_and_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in [
        "--dataset",
        "--latent-dim",
        "--hidden-dims",
        "--prior",
        "--likelihood",
        "--guide",
        "--elbo",
        "--num-particles",
        "--lr",
        "--clip-norm",
        "--epochs",
        "--batch-size",
        "--beta",
        "--warmup-epochs",
        "--seed",
        "--device",
        "--out",
        "--resume",
        "--binarize",
        "--data-dir",
    ]:
        assert flag in text
    for registry in (DATASETS, ELBOS, GUIDES, LIKELIHOODS, PRIORS):
        assert "{" + ",".join(sorted(registry)) + "}" in text
    assert "(default: 0.001)" in text and "(default: digits)" in text


def test_help_shows_each_default_once_and_no_measurements(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "hidden layer sizes of encoder and decoder (default: 400 400) --" in text
    assert text.count("(default:") == text.count("(default: ") and "(default: None)" not in text
    for command in ("train", "sample", "evaluate", "compare"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for unit in ("minutes", "seconds on", "CPU cores", " GB", " MB", "faster"):
            assert unit not in text, (command, unit)


def test_config_fields_in_library_messages_become_flags():
    assert name_flags("set config.batch_size to 5") == "set --batch-size to 5"
    assert name_flags("(config.likelihood_kwargs={'num_levels': 17})") == (
        "(--likelihood-option num_levels=17)"
    )
    assert name_flags("config.prior_kwargs={'a': 2, 'b': 'x'}") == (
        "--prior-option a=2 --prior-option b='x'"
    )
    assert name_flags("config.prior_kwargs, config.guide_kwargs") == (
        "--prior-option, --guide-option"
    )
    # Not a Config field: a file name, a path, another object's attribute.
    for text in ("no config.json in runs/x", "runs/x/config.json", "config.colour"):
        assert name_flags(text) == text


def test_library_warnings_are_one_line_naming_flags(tmp_path):
    args = [*TINY, "--epochs", "1", "--prior", "mixture", "--elbo", "meanfield"]
    with pytest.warns(AnalyticKLWarning) as record:
        assert main(["train", *args, "--prior-components", "2", "--out", str(tmp_path)]) == 0
    (w,) = record
    line = warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
    assert line.startswith("pyro-vae: warning: --elbo meanfield: KL(q || p) has no closed form")
    assert line.endswith("(--elbo trace)\n") and line.count("\n") == 1


def test_top_level_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in build_parser()._subparsers._group_actions[0].choices:
        assert command in text


def test_cuda_without_cuda_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", *TINY, "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "CUDA is not available" in err and "use device 'cpu'" in err


def test_unknown_dataset_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--dataset", "cifar"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'cifar'" in err and "mnist" in err


@pytest.mark.parametrize(
    "args, match",
    [
        (["--latent-dim", "0"], "expected a positive integer, got '0'"),
        (["--lr", "nan"], "expected a positive finite number, got 'nan'"),
        (["--batch-size", "-3"], "expected a positive integer, got '-3'"),
        (["--prior", "nope"], "invalid choice: 'nope'"),
    ],
)
def test_bad_values_are_one_line_usage_errors(args, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err


def test_missing_mnist_without_network_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [f"file://{tmp_path}/none/"])
    code = main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "empty")])
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(tmp_path / "empty") in err and "train-images-idx3-ubyte" in err


def test_unknown_part_option_names_the_accepted_ones(capsys):
    err = one_line_error(capsys, main(["train", *TINY, "--likelihood-option", "colour=1"]))
    assert "takes no option 'colour'" in err


def test_python_dash_m_and_console_script_work():
    for command in ([sys.executable, "-m", "pyro_vae", "--help"], ["pyro-vae", "train", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "usage: pyro-vae" in result.stdout


def test_a_model_too_large_for_memory_is_a_one_line_error(capsys):
    # 1e11 latent dimensions: the very first buffer (400 GB) cannot be allocated.
    assert main(["train", "--latent-dim", "100000000000", "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of memory" in err and "--latent-dim" in err


def test_one_dimensional_latent_trains_and_plots(tmp_path):
    out = tmp_path / "r"
    args = ["train", "--epochs", "1", "--latent-dim", "1", "--hidden-dims", "8", "--out", str(out)]
    assert main(args) == 0
    assert (out / "latent_space.png").is_file()
