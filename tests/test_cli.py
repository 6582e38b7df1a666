import json
import logging
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torchvision
from common import TINY_TRAIN as TINY
from common import with_hooks

from pyro_vae import DATASETS, ELBOS, GUIDES, LIKELIHOODS, PRIORS, Config, load_run, train_run
from pyro_vae import cli as cli_module
from pyro_vae.cli import build_parser, main
from pyro_vae.config import VALIDATIONS
from pyro_vae.data import BINARIZATIONS
from pyro_vae.estimators import AnalyticKLWarning
from pyro_vae.flags import name_flags
from pyro_vae.hierarchical import HIERARCHIES
from pyro_vae.networks import ACTIVATION_CHOICES
from pyro_vae.schedules import LR_SCHEDULES

#: The subcommands README documents.
DOCUMENTED_COMMANDS = {"train", "sample", "evaluate", "compare"}


def one_line_error(capsys, prefix: str = "pyro-vae: error: ") -> str:
    """The stderr of a failed call: one line, starting with ``prefix``, no traceback."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(prefix), err
    return err


def usage_error(capsys, argv: list[str]) -> str:
    """A usage error: exit code 2 and one line ``pyro-vae <command>: error: ...``."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return one_line_error(capsys, f"pyro-vae {argv[0]}: error: ")


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
    assert lines[0].split(",")[:6] == ["epoch", "step", "kl_scale", "lr", "train_elbo", "test_elbo"]
    assert len(lines) == 3
    config = json.loads((run_dir / "config.json").read_text())
    assert config["latent_dim"] == 2 and config["hidden_dims"] == [16]
    assert load_run(run_dir).vae.latent_dim == 2


def test_train_with_an_importance_weighted_objective_records_the_test_iwae_bound(tmp_path):
    out = tmp_path / "iw"
    assert main(["train", *TINY, "--elbo", "dreg", "--num-particles", "5", "--out", str(out)]) == 0
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",")[4:7] == ["train_elbo", "test_elbo", "test_iwae"]
    assert json.loads((out / "config.json").read_text())["elbo"] == "dreg"


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
    assert "model of checkpoint.pt (epoch 2)" in capsys.readouterr().out


def test_sample_and_evaluate_use_best_pt_unless_asked_for_the_last(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--validation-size", "100", "--patience", "1", "--lr-schedule", "plateau"]
    assert main(["train", *TINY, "--epochs", "3", *flags, "--out", str(out)]) == 0
    best = torch.load(out / "best.pt", weights_only=True)["epoch"]
    capsys.readouterr()
    assert main(["sample", str(out), "--num", "4"]) == 0
    assert f"model of best.pt (epoch {best})" in capsys.readouterr().out
    assert main(["sample", str(out), "--num", "4", "--checkpoint", "last"]) == 0
    assert "model of checkpoint.pt (epoch" in capsys.readouterr().out
    argv = ["evaluate", str(out), "--num-samples", "2", "--limit", "5", "--checkpoint", "last"]
    assert main(argv) == 0
    assert "model of checkpoint.pt (epoch" in capsys.readouterr().out
    assert main(argv[:-2]) == 0
    assert f"model of best.pt (epoch {best})" in capsys.readouterr().out


def test_patience_without_a_validation_split_is_a_one_line_error(tmp_path, capsys):
    assert main(["train", *TINY, "--patience", "3", "--out", str(tmp_path / "run")]) == 1
    err = one_line_error(capsys)
    assert "patience 3 stops on valid_elbo, which needs a validation split; set " in err
    assert "--validation-size to a positive number" in err and not (tmp_path / "run").exists()


#: The train flags that set a Config field (their default is the Config's), and the others.
CONFIG_FLAGS = [
    "--dataset",
    "--latent-dim",
    "--hidden-dims",
    "--activation",
    "--lower-latent-dim",
    "--inner-hidden-dims",
    "--hierarchy",
    "--prior",
    "--likelihood",
    "--guide",
    "--elbo",
    "--num-particles",
    "--lr",
    "--adam-betas",
    "--adam-eps",
    "--lr-schedule",
    "--lr-decay",
    "--plateau-factor",
    "--plateau-patience",
    "--clip-norm",
    "--epochs",
    "--batch-size",
    "--beta",
    "--warmup-epochs",
    "--seed",
    "--validation-size",
    "--validation-seed",
    "--patience",
    "--device",
    "--validation",
]
#: How the help words a Config default of None (never "None").
NONE_DEFAULTS = {"--clip-norm": "no clipping", "--patience": "no early stopping"}
NONE_DEFAULTS["--lower-latent-dim"] = "one layer"
#: The other flags, and the default their help shows (None: none, as "not given" is no value).
OTHER_FLAGS = {
    "--out": "a new folder under runs/",
    "--resume": None,
    "--binarize": "dynamic for Bernoulli likelihoods, else none",
    "--data-dir": "$PYRO_VAE_DATA or the user cache",
    "--prior-option": None,
    "--prior-components": None,
    "--likelihood-option": None,
    "--guide-option": None,
    "--debug": None,
    "--recipe": None,
    "--tensorboard": None,
}


def help_entries(text: str) -> dict[str, str]:
    """Each option of an argparse help text, with its help joined into one line."""
    entries, flag = {}, None
    for line in text.splitlines():
        match = re.match(r"  (?:-\w, )?(--[\w-]+)", line)
        if match:
            flag = match.group(1)
            entries[flag] = line
        elif flag and line.startswith("   "):
            entries[flag] += " " + line.strip()
        else:
            flag = None
    return {flag: " ".join(entry.split()) for flag, entry in entries.items()}


def test_help_lists_every_flag_with_default_and_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    text = " ".join(out.split())
    entries = help_entries(out)
    assert set(CONFIG_FLAGS) | set(OTHER_FLAGS) | {"--help"} == set(entries)
    defaults = Config()
    for flag in CONFIG_FLAGS:
        # One default per flag, that of Config (the flag itself defaults to None, "not given"),
        # shown as it is typed: a list default as its items (--hidden-dims 400 400), a None
        # default in the words of NONE_DEFAULTS.
        default = getattr(defaults, flag[2:].replace("-", "_"))
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        shown = NONE_DEFAULTS[flag] if default is None else shown
        assert re.findall(r"\(default: (.*?)\)", entries[flag]) == [shown], entries[flag]
    for flag, default in OTHER_FLAGS.items():
        shown = re.findall(r"\(default: (.*?)\)", entries[flag])
        assert shown == ([] if default is None else [default]), entries[flag]
    registries = (DATASETS, ELBOS, GUIDES, LIKELIHOODS, PRIORS, ACTIVATION_CHOICES, VALIDATIONS)
    registries += (LR_SCHEDULES, HIERARCHIES)
    for registry in registries:
        assert "{" + ",".join(sorted(registry)) + "}" in text
    assert "{" + ",".join(sorted(BINARIZATIONS)) + "}" in text  # choices are listed sorted
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
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    listed = set(re.findall(r"^    (\w+) ", text, flags=re.MULTILINE))
    assert listed == DOCUMENTED_COMMANDS
    assert set(build_parser()._subparsers._group_actions[0].choices) == DOCUMENTED_COMMANDS
    for command in sorted(DOCUMENTED_COMMANDS):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: pyro-vae {command} ")
        for entry in help_entries(out).values():
            assert len(re.findall(r"\(default:", entry)) <= 1, entry


def test_cuda_without_cuda_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", *TINY, "--device", "cuda"]) == 1
    err = one_line_error(capsys)
    assert "CUDA is not available" in err and "use device 'cpu'" in err


@pytest.mark.parametrize("command", [["train", *TINY], ["sample", "RUN"]])
@pytest.mark.parametrize("count, device", [(1, "cuda:1"), (2, "cuda:3")])
def test_a_cuda_device_out_of_range_is_a_one_line_error(
    command, count, device, monkeypatch, capsys
):
    # CPU-runnable: CUDA is made to look present with `count` devices.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert main([*command, "--device", device]) == 1
    err = one_line_error(capsys)
    assert f"device {device!r} was requested but this machine has {count} CUDA device(s)" in err
    assert f"use cuda:0 to cuda:{count - 1}" in err


def test_unknown_dataset_is_a_one_line_usage_error(capsys):
    err = usage_error(capsys, ["train", "--dataset", "cifar"])
    assert "invalid choice: 'cifar'" in err and "mnist" in err


@pytest.mark.parametrize(
    "argv, match",
    [
        (
            ["train", "--latent-dim", "0"],
            "argument --latent-dim: expected a positive integer, got '0'",
        ),
        (["train", "--lr", "nan"], "argument --lr: expected a positive finite number, got 'nan'"),
        (
            ["train", "--batch-size", "-3"],
            "argument --batch-size: expected a positive integer, got '-3'",
        ),
        (
            ["train", "--batch-size", "0"],
            "argument --batch-size: expected a positive integer, got '0'",
        ),
        (["train", "--beta", "0"], "argument --beta: expected a positive finite number, got '0'"),
        (
            ["train", "--beta", "-0.5"],
            "argument --beta: expected a positive finite number, got '-0.5'",
        ),
        (["train", "--prior", "nope"], "argument --prior: invalid choice: 'nope'"),
        (
            ["evaluate", "RUN", "--num-samples", "0"],
            "argument --num-samples: expected a positive integer, got '0'",
        ),
        (
            ["compare", "RUN", "--draws", "1"],
            "--draws must be at least 2 to measure a spread, got 1",
        ),
    ],
)
def test_bad_values_are_one_line_usage_errors(argv, match, capsys):
    if argv[0] == "compare":  # checked after parsing, before the run folder is read
        assert main(argv) == 2
        err = one_line_error(capsys, "pyro-vae compare: error: ")
    else:
        err = usage_error(capsys, argv)
    assert match in err, err


def test_missing_mnist_without_network_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [f"file://{tmp_path}/none/"])
    code = main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "empty")])
    assert code == 1
    err = one_line_error(capsys)
    assert str(tmp_path / "empty") in err and "train-images-idx3-ubyte" in err


def test_unknown_part_option_names_the_accepted_ones(capsys):
    assert main(["train", *TINY, "--likelihood-option", "colour=1"]) == 1
    assert "takes no option 'colour'" in one_line_error(capsys)


def test_out_pointing_to_a_file_is_a_usage_error_and_the_file_is_kept(tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    assert main(["train", *TINY, "--out", str(out)]) == 2
    err = one_line_error(capsys, "pyro-vae train: error: ")
    assert f"--out {out} is a file, not a folder" in err
    assert out.read_text() == "keep me" and list(tmp_path.iterdir()) == [out]


def test_python_dash_m_and_console_script_work():
    for command in ([sys.executable, "-m", "pyro_vae", "--help"], ["pyro-vae", "train", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "usage: pyro-vae" in result.stdout


def test_a_model_too_large_for_memory_is_a_one_line_error(capsys):
    # 1e11 latent dimensions: the very first buffer (400 GB) cannot be allocated.
    assert main(["train", "--latent-dim", "100000000000", "--epochs", "1"]) == 1
    err = one_line_error(capsys)
    assert "out of memory" in err and "--latent-dim" in err


def test_malloc_threshold_is_fixed_on_glibc():
    import platform

    from pyro_vae.evaluate import fix_malloc_threshold

    assert fix_malloc_threshold() == (platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize("argv", [["sample", "MISSING"], ["train", "--resume", "MISSING"]])
def test_main_fixes_the_malloc_threshold_before_running_the_command(
    argv, tmp_path, monkeypatch, capsys
):
    events = []
    real_fix = cli_module.fix_malloc_threshold

    def spy():
        events.append("fix_malloc_threshold")
        return real_fix()

    def load_run_spy(*args, **kwargs):
        events.append("command")
        raise FileNotFoundError("run folder MISSING does not exist")

    monkeypatch.setattr(cli_module, "fix_malloc_threshold", spy)
    monkeypatch.setattr(cli_module, "load_run", load_run_spy)
    monkeypatch.setattr(cli_module, "resume_run", load_run_spy)
    argv = [str(tmp_path) if a == "MISSING" else a for a in argv]
    assert main(argv) == 1
    one_line_error(capsys)
    assert events[0] == "fix_malloc_threshold" and events.count("fix_malloc_threshold") == 1


def test_one_dimensional_latent_trains_and_plots(tmp_path):
    out = tmp_path / "r"
    args = ["train", "--epochs", "1", "--latent-dim", "1", "--hidden-dims", "8", "--out", str(out)]
    assert main(args) == 0
    assert (out / "latent_space.png").is_file()


def test_verbose_logs_each_epoch_and_quiet_does_not(tmp_path, monkeypatch, capsys):
    # pytest gives the root logger handlers, which would turn logging.basicConfig into a no-op.
    monkeypatch.setattr(logging.root, "handlers", [])
    monkeypatch.setattr("pyro_vae.runs.run_figures", lambda *args: {})  # not under test; slow
    level = logging.root.level
    try:
        for verbose, out in (["-v"], "loud"), ([], "quiet"):
            argv = [*verbose, "train", *TINY, "--epochs", "1", "--out", str(tmp_path / out)]
            assert main(argv) == 0
            logging.root.handlers.clear()
            logging.root.setLevel(level)
            err = capsys.readouterr().err
            logged = re.findall(r"^pyro_vae\.train: epoch 1: train ELBO -?\d", err, re.MULTILINE)
            assert len(logged) == (1 if verbose else 0), err
    finally:
        logging.root.setLevel(level)


def test_sample_seed_fixes_the_images_whatever_the_global_rng(run_dir, tmp_path, monkeypatch):
    drawn = []
    real_plot = cli_module.plot_images

    def plot_spy(images, *args, **kwargs):
        drawn.append(images.clone())
        return real_plot(images, *args, **kwargs)

    monkeypatch.setattr(cli_module, "plot_images", plot_spy)
    for global_seed, seed in [(1, "3"), (2, "3"), (1, "4")]:
        torch.manual_seed(global_seed)
        out = tmp_path / f"{global_seed}-{seed}.png"
        assert main(["sample", str(run_dir), "--num", "6", "--seed", seed, "--out", str(out)]) == 0
    assert torch.equal(drawn[0], drawn[1])
    assert not torch.allclose(drawn[0], drawn[2])
    # The images are the run's prior samples under that seed, computed here independently.
    import pyro

    vae = load_run(run_dir).vae
    pyro.set_rng_seed(3)
    assert torch.equal(drawn[0], vae.sample(6))


@pytest.mark.parametrize("activation", sorted(set(ACTIVATION_CHOICES) - {Config().activation}))
def test_a_non_default_activation_is_trained_and_rebuilt_from_config_json(
    activation, tmp_path, monkeypatch
):
    trained = []

    def remember(vae, config, start_epoch):
        trained.append(vae)

    monkeypatch.setattr(cli_module, "train_run", with_hooks(train_run, on_train_start=remember))
    monkeypatch.setattr("pyro_vae.runs.run_figures", lambda *args: {})  # not under test; slow
    out = tmp_path / "run"
    assert (
        main(["train", *TINY, "--epochs", "1", "--activation", activation, "--out", str(out)]) == 0
    )
    assert json.loads((out / "config.json").read_text())["activation"] == activation
    (vae,) = trained
    loaded = load_run(out).vae
    for model in (vae, loaded):
        used = {type(m) for m in model.modules() if type(m) in ACTIVATION_CHOICES.values()}
        assert used == {ACTIVATION_CHOICES[activation]}
    x = torch.rand(5, 64).bernoulli()
    assert torch.equal(loaded.reconstruct(x), vae.eval().reconstruct(x))
