"""Reliability and security: bad input, training faults, interruption, resume, atomic writes,
and what a run folder written by someone else can and cannot make the tool do.

The tests marked ``slow`` run the real ``python -m pyro_vae train`` in a subprocess and send it
SIGINT or SIGKILL; they share one run folder so that few processes (each ~3-5 s of imports)
are started.
"""

import functools
import gzip
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from common import (
    STEPS_PER_EPOCH,
    check_run_folder_is_whole,
    one_line_error,
    tiny_config,
    tiny_vae,
    usage_error,
    wait_for_epoch,
    with_hooks,
    without_seconds,
)
from common import TINY_MODEL as TINY

from pyro_vae import Dataset, evaluate_elbo, fit, load_dataset, load_run, train_run
from pyro_vae import cli as cli_module
from pyro_vae.cli import main
from pyro_vae.runs import load_checkpoint, read_metrics

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    """A 2-epoch run folder, to be copied by the tests that damage one."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    fit(tiny_vae(), digits, tiny_config(epochs=2), run_dir=run_dir)
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path):
    return Path(shutil.copytree(trained, tmp_path / "run"))


def edit_config(run_dir: Path, changes: dict) -> None:
    path = run_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def read_run_argv(command: str, run_dir: Path) -> list[str]:
    """The two commands that read a run folder: ``sample`` and ``train --resume``."""
    return ["sample", str(run_dir)] if command == "sample" else ["train", "--resume", str(run_dir)]


def files_under(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


# -- 1. bad input: one clear line --------------------------------------------------------------


@pytest.mark.parametrize(
    "flag", ["--prior", "--likelihood", "--guide", "--elbo", "--dataset", "--activation"]
)
def test_unknown_part_name_is_a_usage_error_listing_the_choices(flag, capsys):
    err = usage_error(capsys, ["train", flag, "nope"])
    assert "invalid choice: 'nope'" in err and "choose from" in err


@pytest.mark.parametrize(
    "command", [["train"], ["sample", "RUN"], ["evaluate", "RUN"], ["compare", "RUN"]]
)
def test_unknown_device_is_a_usage_error(command, capsys):
    err = usage_error(capsys, [*command, "--device", "gpu"])
    assert "unknown device 'gpu'; choose auto, cpu, cuda or cuda:N" in err


@pytest.mark.parametrize(
    "args, flag, value",
    [
        (["train", "--latent-dim", "-1"], "--latent-dim", "-1"),
        (["train", "--hidden-dims", "16", "0"], "--hidden-dims", "0"),
        (["train", "--epochs", "0"], "--epochs", "0"),
        (["train", "--batch-size", "1.5"], "--batch-size", "1.5"),
        (["train", "--batch-size", "0"], "--batch-size", "0"),
        (["train", "--num-particles", "0"], "--num-particles", "0"),
        (["train", "--num-particles", "nan"], "--num-particles", "nan"),
        (["train", "--prior-components", "0"], "--prior-components", "0"),
        (["train", "--lr", "inf"], "--lr", "inf"),
        (["train", "--lr", "-0.1"], "--lr", "-0.1"),
        (["train", "--clip-norm", "0"], "--clip-norm", "0"),
        (["train", "--clip-norm=-inf"], "--clip-norm", "-inf"),
        (["train", "--beta", "nan"], "--beta", "nan"),
        (["train", "--beta", "0"], "--beta", "0"),
        (["train", "--beta", "-1"], "--beta", "-1"),
        (["train", "--warmup-epochs", "-1"], "--warmup-epochs", "-1"),
        (["train", "--seed", "-1"], "--seed", "-1"),
        (["train", "--seed", "4294967296"], "--seed", "4294967296"),
        (["sample", "RUN", "--seed", "-1"], "--seed", "-1"),
        (["sample", "RUN", "--num", "0"], "--num", "0"),
        (["sample", "RUN", "--cols", "-2"], "--cols", "-2"),
        (["evaluate", "RUN", "--num-samples", "0"], "--num-samples", "0"),
        (["evaluate", "RUN", "--num-samples", "-5"], "--num-samples", "-5"),
        (["evaluate", "RUN", "--limit", "0"], "--limit", "0"),
        (["evaluate", "RUN", "--seed", "-1"], "--seed", "-1"),
        (["compare", "RUN", "--draws", "0"], "--draws", "0"),
        (["compare", "RUN", "--num-points", "-1"], "--num-points", "-1"),
        (["compare", "RUN", "--batch-size", "0"], "--batch-size", "0"),
        (["compare", "RUN", "--train-seconds", "-1"], "--train-seconds", "-1"),
        (["compare", "RUN", "--seed", "nan"], "--seed", "nan"),
    ],
)
def test_non_positive_or_non_finite_numbers_are_usage_errors(args, flag, value, capsys):
    err = usage_error(capsys, args)
    expected = (
        r"expected (a (positive|non-negative) (integer|finite number)|an integer in "
        r"\[0, 2\*\*32 - 1\]|0 or a positive finite number), got "
    )
    assert re.search(f"argument {flag}: {expected}'{re.escape(value)}'", err), err


#: Per command: a call failing on a missing run folder, and one failing with a usage error.
FAILING_CALLS = {
    "train": (["train", "--resume", "MISSING"], ["train", "--resume", "RUN", "--lr", "0.1"]),
    "sample": (["sample", "MISSING"], None),
    "evaluate": (["evaluate", "MISSING", "--num-samples", "2"], None),
    "compare": (["compare", "MISSING", "--draws", "2"], ["compare", "MISSING", "--draws", "1"]),
}
USAGE_MATCHES = {
    "train": "only --epochs, --device, --data-dir and --tensorboard",
    "compare": "--draws must be",
}


@pytest.mark.parametrize("command", sorted(FAILING_CALLS))
def test_debug_shows_the_traceback_instead_of_the_one_line_error(command, tmp_path, capsys):
    names = {"MISSING": str(tmp_path / "missing"), "RUN": str(tmp_path)}
    missing_run, usage = (
        [names.get(a, a) for a in argv] if argv else None for argv in FAILING_CALLS[command]
    )
    err = one_line_error(capsys, main(missing_run))
    assert re.search("run folder .* does not exist", err), err
    # --debug before or after the subcommand (the subparser must not reset one given before).
    for argv in (["--debug", *missing_run], [*missing_run, "--debug"]):
        with pytest.raises(FileNotFoundError, match="run folder .* does not exist"):
            main(argv)
    if usage is not None:
        one_line_error(capsys, main(usage), expected_code=2, command=command)
        for argv in (["--debug", *usage], [*usage, "--debug"]):
            with pytest.raises(cli_module.UsageError, match=USAGE_MATCHES[command]):
                main(argv)


def test_batch_size_larger_than_the_data_is_refused_before_a_run_folder_is_made(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    for out in (["--out", "run"], []):  # without --out, a new folder would go under runs/
        err = one_line_error(capsys, main(["train", *TINY, "--batch-size", "5000", *out]))
        assert "batch_size 5000 is larger than the 1497 training datapoints of 'digits'" in err
        assert "at most 1497" in err
    assert list(tmp_path.iterdir()) == []


def with_data(digits, **changes) -> Dataset:
    fields = {k: getattr(digits, k) for k in ("train_x", "train_y", "test_x", "test_y")}
    return Dataset("digits", **{**fields, **changes}, image_shape=(8, 8), binarize="dynamic")


@pytest.mark.parametrize("split", ["train_x", "test_x"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_data_with_nan_or_inf_is_refused(digits, bad, split, tmp_path):
    x = getattr(digits, split).clone()
    x[5, 3] = bad
    x[7, 0] = bad
    run_dir = tmp_path / "run"
    match = rf"dataset.{split} has 2 non-finite values .*in 2 rows, first rows \[5, 7\]"
    with pytest.raises(ValueError, match=match):
        fit(tiny_vae(), with_data(digits, **{split: x}), tiny_config(epochs=1), run_dir=run_dir)
    assert list(tmp_path.iterdir()) == []  # "before anything is written": not even the folder


def test_data_outside_the_likelihood_support_is_refused(digits, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"training data in \[0, 1\].*lies in \[0, 16\]"):
        fit(
            tiny_vae(),
            with_data(digits, train_x=digits.train_x * 16),
            tiny_config(epochs=1),
            run_dir=run_dir,
        )
    test_x = digits.test_x.clone()
    test_x[0, 0] = 0.5
    with pytest.raises(ValueError, match=r"'bernoulli' needs data in \{0, 1\}.*e\.g\. 0\.5"):
        fit(tiny_vae(), with_data(digits, test_x=test_x), tiny_config(epochs=1), run_dir=run_dir)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"train_x": "uint8"}, TypeError, "x must be a floating-point .*, got torch.uint8"),
        ({"train_x": "3d"}, ValueError, r"x must have shape \(N, 64\), got \(1497, 8, 8\)"),
        ({"test_x": "wide"}, ValueError, r"x must have shape \(N, 64\), got \(300, 65\)"),
        ({"train_x": "list"}, TypeError, "x must be a floating-point torch.Tensor, got list"),
    ],
)
def test_wrong_data_shape_or_dtype_in_the_python_api(digits, change, error, match):
    ((split, kind),) = change.items()
    x = getattr(digits, split)
    x = {
        "uint8": lambda: x.to(torch.uint8),
        "3d": lambda: x.reshape(-1, 8, 8),
        "wide": lambda: torch.cat([x, x[:, :1]], 1),
        "list": lambda: x.tolist(),
    }[kind]()
    with pytest.raises(error, match=match):
        fit(tiny_vae(), with_data(digits, **{split: x}), tiny_config(epochs=1))


def test_wrong_argument_types_in_the_python_api(digits):
    with pytest.raises(TypeError, match="dataset must be a pyro_vae Dataset .*got Tensor"):
        fit(tiny_vae(), digits.train_x, tiny_config())
    with pytest.raises(TypeError, match="config must be a pyro_vae Config, got dict"):
        fit(tiny_vae(), digits, {"epochs": 1})
    with pytest.raises(ValueError, match=r"x must have shape \(N, 64\), got \(10, 8, 8\)"):
        evaluate_elbo(tiny_vae(), digits.test_x[:10].reshape(10, 8, 8))


def test_truncated_mnist_file_is_a_one_line_error(tmp_path, capsys):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + bytes(1000))
    code = main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path)])
    err = one_line_error(capsys, code)
    assert "train-images-idx3-ubyte is 1004 bytes but an intact" in err and "truncated" in err


@pytest.mark.parametrize("command", ["sample", "resume"])
@pytest.mark.parametrize(
    "damage, match",
    [
        ("missing folder", "run folder .* does not exist"),
        ("no checkpoint", "no checkpoint|has no checkpoint.pt: the run stopped before"),
        ("truncated", "is not a readable checkpoint \\(truncated or corrupt"),
        ("not a checkpoint", "is not a readable checkpoint \\(not a torch file"),
        ("not ours", "is not a pyro_vae checkpoint"),
        ("other version", "saved in checkpoint format 99; this pyro_vae reads format 1"),
        ("other config version", "saved in format version 7"),
        ("other model shape", "does not fit the model its config describes.*size mismatch"),
    ],
)
def test_bad_run_folder_is_a_one_line_error(command, damage, match, run_copy, capsys):
    checkpoint = run_copy / "checkpoint.pt"
    if damage == "missing folder":
        shutil.rmtree(run_copy)
    elif damage == "no checkpoint":
        checkpoint.unlink()
    elif damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    elif damage == "not a checkpoint":
        checkpoint.write_text('{"model": "weights"}')
    elif damage == "not ours":
        torch.save({"state_dict": torch.zeros(3)}, checkpoint)
    elif damage in ("other version", "other config version", "other model shape"):
        state = torch.load(checkpoint, weights_only=True)
        if damage == "other version":
            state["format_version"] = 99
        elif damage == "other config version":
            state["config"]["format_version"] = 7
            edit_config(run_copy, {"format_version": 7})
        else:
            state["config"]["latent_dim"] = 3
            edit_config(run_copy, {"latent_dim": 3})
        torch.save(state, checkpoint)
    err = one_line_error(capsys, main(read_run_argv(command, run_copy)))
    assert re.search(match, err), err


def test_truncated_config_or_metrics_is_a_one_line_error_on_resume(run_copy, capsys):
    config = (run_copy / "config.json").read_text()
    (run_copy / "config.json").write_text(config[: len(config) // 2])
    err = one_line_error(capsys, main(["train", "--resume", str(run_copy)]))
    assert "config.json is not valid JSON" in err and "truncated" in err
    (run_copy / "config.json").write_text(config)
    (run_copy / "metrics.csv").write_text("epoch,step,train_elbo\n1,8,\n")
    err = one_line_error(capsys, main(["train", "--resume", str(run_copy)]))
    assert "metrics.csv is not a metrics table written by pyro_vae" in err


@pytest.mark.parametrize(
    "args, match",
    [
        (
            ["--lr", "0.1"],
            "only --epochs, --device, --data-dir and --tensorboard may be given with it .*--lr",
        ),
        (["--prior-components", "3"], "may be given with it \\(got --prior-components\\)"),
        (["--out", "elsewhere"], "may be given with it \\(got --out\\)"),
        (["--epochs", "1"], "--epochs 1 is fewer than the 2 epochs already trained"),
    ],
)
def test_resume_flag_conflicts_are_usage_errors(args, match, run_copy, capsys):
    code = main(["train", "--resume", str(run_copy), *args])
    err = one_line_error(capsys, code, expected_code=2)
    assert re.search(match, err), err


def test_training_into_an_existing_run_is_refused(run_copy, capsys):
    before = files_under(run_copy)
    code = main(["train", *TINY, "--epochs", "1", "--out", str(run_copy)])
    err = one_line_error(capsys, code, expected_code=2)
    assert f"{run_copy} already holds a run; continue it with --resume" in err
    assert files_under(run_copy) == before


# -- 2. training faults --------------------------------------------------------------------


def test_cli_reports_a_nan_loss_in_one_line_and_keeps_the_last_good_epoch(
    tmp_path, monkeypatch, capsys
):
    holder = {}

    def remember(vae, config, start_epoch):
        holder["vae"] = vae

    def poison(row):
        if row["epoch"] == 1:
            with torch.no_grad():
                holder["vae"].decoder[0].weight.fill_(float("nan"))

    monkeypatch.setattr(cli_module, "train_run", with_hooks(train_run, remember, poison))
    out = tmp_path / "run"
    err = one_line_error(capsys, main(["train", *TINY, "--epochs", "3", "--out", str(out)]))
    assert "the loss became nan at epoch 2, step 9; try a lower --lr" in err
    assert f"{out} keeps epoch 1" in err
    assert [r["epoch"] for r in read_metrics(out)] == [1]
    run = load_run(out)
    assert run.checkpoint["epoch"] == 1
    assert all(torch.isfinite(p).all() for p in run.vae.parameters())


def test_parameters_that_blow_up_on_the_last_step_are_not_checkpointed(digits, tmp_path):
    class PoisonedAdam(torch.optim.Adam):
        def step(self, closure=None):
            super().step(closure)
            self.steps = getattr(self, "steps", 0) + 1
            if self.steps == 2 * STEPS_PER_EPOCH:  # the last step of epoch 2
                with torch.no_grad():
                    self.param_groups[0]["params"][0].fill_(float("inf"))

    vae = tiny_vae()
    match = "the parameters became non-finite at epoch 2, step 16; .* keeps epoch 1"
    with pytest.raises(FloatingPointError, match=match):
        fit(vae, digits, tiny_config(epochs=3), tmp_path, optimizer=PoisonedAdam(vae.parameters()))
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1]


def test_fit_interrupted_and_resumed_equals_uninterrupted(digits, tmp_path):
    def stop_after_epoch_2(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    config = tiny_config(epochs=3, seed=3, num_particles=2)
    expected = fit(tiny_vae(0), digits, config)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_vae(0), digits, config, run_dir=tmp_path, on_epoch_end=stop_after_epoch_2)
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["epoch"] == 2
    # Other weights and another RNG state: fit must restore both from the checkpoint.
    fresh = tiny_vae(999)
    rows = fit(fresh, digits, config, tmp_path, checkpoint, read_metrics(tmp_path))
    assert without_seconds(rows) == without_seconds(expected)
    assert without_seconds(read_metrics(tmp_path)) == without_seconds(expected)


def test_cli_ctrl_c_says_how_to_resume_and_resume_repeats_the_numbers(
    tmp_path, monkeypatch, capsys
):
    def interrupt(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    args = [*TINY, "--epochs", "3", "--seed", "5"]
    assert main(["train", *args, "--out", str(tmp_path / "whole")]) == 0
    with monkeypatch.context() as patch:
        patch.setattr(cli_module, "train_run", with_hooks(train_run, on_epoch_end=interrupt))
        run_dir = tmp_path / "cut short"
        code = main(["train", *args, "--out", str(run_dir)])
    err = one_line_error(capsys, code, expected_code=130)
    assert f"{run_dir}/checkpoint.pt holds epoch 2." in err
    assert f"Resume with: pyro-vae train --resume '{run_dir}'" in err
    assert main(["train", "--resume", str(run_dir)]) == 0
    expected = without_seconds(read_metrics(tmp_path / "whole"))
    assert without_seconds(read_metrics(run_dir)) == expected
    assert (run_dir / "samples.png").is_file()


def test_ctrl_c_before_training_is_one_line_and_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pyro_vae.runs.load_dataset", interrupted)
    out = tmp_path / "run"
    code = main(["train", *TINY, "--out", str(out)])
    assert one_line_error(capsys, code, expected_code=130) == "pyro-vae: interrupted\n"
    assert not out.exists()


class Killed(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way catches it."""


def dying_replace(num_renames: int):
    """An ``os.replace`` that renames ``num_renames`` times, then dies before the next one."""
    real_replace, calls = os.replace, []

    def replace(src, dst):
        if len(calls) == num_renames:
            raise Killed
        calls.append(dst)
        real_replace(src, dst)

    return replace


def test_every_run_file_is_replaced_atomically_and_a_crash_at_any_write_can_resume(
    digits, tmp_path, monkeypatch
):
    real_replace = os.replace
    written = []

    def spy(src, dst):
        written.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr("pyro_vae.runs.os.replace", spy)
    config = tiny_config(epochs=2)
    expected = without_seconds(fit(tiny_vae(0), digits, config, run_dir=tmp_path / "whole"))
    assert written == ["config.json", "checkpoint.pt"] + ["metrics.csv", "checkpoint.pt"] * 2
    assert {p.name for p in (tmp_path / "whole").iterdir()} == set(written)

    # Die just before each rename in turn (the temporary file complete, the old one in place);
    # before the first checkpoint's rename there is nothing to resume, see the CLI tests.
    for crash_at in range(2, len(written)):
        run_dir = tmp_path / f"crash{crash_at}"
        monkeypatch.setattr("pyro_vae.runs.os.replace", dying_replace(crash_at))
        with pytest.raises(Killed):
            fit(tiny_vae(0), digits, config, run_dir=run_dir)
        monkeypatch.setattr("pyro_vae.runs.os.replace", real_replace)
        check_run_folder_is_whole(run_dir)
        checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
        rows = fit(tiny_vae(), digits, config, run_dir, checkpoint, read_metrics(run_dir))
        assert without_seconds(rows) == expected


def test_evaluation_json_is_replaced_atomically(tmp_path, monkeypatch):
    from pyro_vae.report import write_evaluation

    write_evaluation(tmp_path, {"old": 1})
    monkeypatch.setattr("pyro_vae.runs.os.replace", dying_replace(0))
    with pytest.raises(Killed):
        write_evaluation(tmp_path, {"new": 2})
    assert json.loads((tmp_path / "evaluation.json").read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["evaluation.json"]


# -- 2 and 3. real processes: SIGINT, SIGKILL at several moments, resume ----------------------


def start_training(*args: str) -> subprocess.Popen:
    # One thread, here and in the in-process runs compared with it, so the numbers can match.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pyro_vae", "train", *args]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_real_process_sigint_then_sigkill_at_five_moments_then_resume_repeats_the_numbers(
    tmp_path, capsys
):
    run_dir = tmp_path / "run"
    process = start_training(*TINY, "--epochs", "200", "--out", str(run_dir))
    wait_for_epoch(process, run_dir, 2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"Resume with: pyro-vae train --resume {run_dir}" in err
    last = check_run_folder_is_whole(run_dir)

    # SIGKILL gives no chance to clean up: whatever it interrupts (a step, a checkpoint being
    # written, a metrics file being replaced), the folder must stay whole and resumable.
    for delay in (0.0, 0.01, 0.03, 0.06, 0.1):
        process = start_training("--resume", str(run_dir))
        wait_for_epoch(process, run_dir, last + 1)
        time.sleep(delay)
        process.kill()
        process.communicate(timeout=60)
        last = check_run_folder_is_whole(run_dir)

    epochs = load_checkpoint(run_dir / "checkpoint.pt")["epoch"] + 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--resume", str(run_dir), "--epochs", str(epochs)]) == 0
        whole = tmp_path / "whole"
        assert main(["train", *TINY, "--epochs", str(epochs), "--out", str(whole)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert len(read_metrics(run_dir)) == epochs
    assert without_seconds(read_metrics(run_dir)) == without_seconds(read_metrics(whole))


# -- 4. security ---------------------------------------------------------------------------


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch EXPLOITED",))


@pytest.mark.parametrize("command", ["sample", "resume"])
def test_malicious_checkpoint_is_refused_by_the_cli_without_running_it(
    command, run_copy, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    state = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    state["model"] = _Exploit()
    torch.save(state, run_copy / "checkpoint.pt")
    err = one_line_error(capsys, main(read_run_argv(command, run_copy)))
    assert "refusing to load" in err and "would import posix.system" in err, err
    assert not (tmp_path / "EXPLOITED").exists()


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"out": "../../elsewhere"}, r"unknown config keys \['out'\]"),
        ({"run_dir": "/tmp/elsewhere"}, r"unknown config keys \['run_dir'\]"),
        ({"data_dir": "{elsewhere}/data"}, "the data folder .*elsewhere/data.* does not exist"),
        ({"dataset": "mnist", "data_dir": "{elsewhere}/x"}, "the data folder .* does not exist"),
        ({"data_dir": ["/"]}, "data_dir must be a path string or None"),
    ],
)
def test_hostile_config_json_cannot_make_the_tool_write_outside_the_run_folder(
    changes, match, run_copy, tmp_path, capsys
):
    elsewhere = tmp_path / "elsewhere"
    changes = {
        k: v.format(elsewhere=elsewhere) if isinstance(v, str) else v for k, v in changes.items()
    }
    edit_config(run_copy, changes)
    before = files_under(tmp_path)
    err = one_line_error(capsys, main(["train", "--resume", str(run_copy), "--epochs", "3"]))
    assert re.search(match, err), err
    assert files_under(tmp_path) == before
    assert not elsewhere.exists()


#: MNIST's idx files: (magic number, number of items), from the format's description.
MNIST_IDX = {
    "train-images-idx3-ubyte": (2051, 60000),
    "train-labels-idx1-ubyte": (2049, 60000),
    "t10k-images-idx3-ubyte": (2051, 10000),
    "t10k-labels-idx1-ubyte": (2049, 10000),
}


def blank_idx_file(magic: int, num: int) -> bytes:
    """An intact idx file of ``num`` all-zero 28x28 images (magic 2051) or labels (2049)."""
    if magic == 2051:
        return struct.pack(">IIII", magic, num, 28, 28) + bytes(num * 28 * 28)
    return struct.pack(">II", magic, num) + bytes(num)


@pytest.fixture(scope="module")
def mnist_mirror(tmp_path_factory):
    """A local HTTP mirror serving MNIST-shaped files (blank images, so no real data is needed),
    with the md5 list torchvision checks, and the list of paths requested from it.

    As in test_data.py: HTTP, because torchvision's downloader needs ``response.length``. The
    mirror is checked once by downloading from it into a folder named as ``data_dir``.
    """
    import torchvision.datasets

    mirror_dir = tmp_path_factory.mktemp("mirror")
    resources = []
    for name, (magic, num) in MNIST_IDX.items():
        archive = mirror_dir / f"{name}.gz"
        archive.write_bytes(gzip.compress(blank_idx_file(magic, num), compresslevel=1, mtime=0))
        resources.append((archive.name, hashlib.md5(archive.read_bytes()).hexdigest()))
    requested = []

    class CountingHandler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    class QuietServer(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # torchvision drops its first connection to each file, to follow redirects

    handler = functools.partial(CountingHandler, directory=str(mirror_dir))
    server = QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torchvision.datasets.MNIST, "mirrors", [url])
        patch.setattr(torchvision.datasets.MNIST, "resources", resources)
        control = load_dataset("mnist", tmp_path_factory.mktemp("downloaded"))
    assert control.train_x.shape == (60000, 784) and control.test_x.shape == (10000, 784)
    assert set(requested) == {f"/{name}" for name, _ in resources}
    yield url, resources, requested
    server.shutdown()
    server.server_close()
    thread.join()


#: The three commands that load the data set a run's config names.
READ_RUN_DATA_ARGV = {
    "train --resume": ["train", "--resume", "RUN", "--epochs", "3"],
    "evaluate": ["evaluate", "RUN", "--num-samples", "2", "--limit", "2"],
    "compare": ["compare", "RUN", "--draws", "2", "--num-points", "2", "--train-seconds", "0"],
}


@pytest.mark.parametrize("command", sorted(READ_RUN_DATA_ARGV))
def test_a_data_dir_read_from_a_config_is_never_downloaded_into(
    command, mnist_mirror, run_copy, tmp_path, monkeypatch, capsys
):
    import torchvision.datasets

    url, resources, requested = mnist_mirror
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [url])
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", resources)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # The run now names MNIST in an existing, empty folder, in config.json and the checkpoint.
    changes = {"dataset": "mnist", "data_dir": str(data_dir)}
    edit_config(run_copy, changes)
    state = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    state["config"].update(changes)
    torch.save(state, run_copy / "checkpoint.pt")
    served = len(requested)
    argv = [str(run_copy) if a == "RUN" else a for a in READ_RUN_DATA_ARGV[command]]
    err = one_line_error(capsys, main(argv))
    assert "downloading is off" in err and str(data_dir / "MNIST" / "raw") in err, err
    assert "--data-dir" in err, err
    assert list(data_dir.iterdir()) == []
    assert len(requested) == served, requested[served:]


def test_training_writes_only_inside_the_run_folder(digits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "data"
    elsewhere.mkdir()
    run_dir = tmp_path / "run"
    argv = [*TINY, "--epochs", "1", "--data-dir", str(elsewhere), "--out", str(run_dir)]
    assert main(["train", *argv]) == 0
    assert main(["train", "--resume", str(run_dir), "--epochs", "2"]) == 0
    written = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert written and all(run_dir in p.parents for p in written), written
    assert json.loads((run_dir / "config.json").read_text())["data_dir"] == str(elsewhere)


def test_package_never_evaluates_or_unpickles_untrusted_text():
    source = "\n".join(p.read_text() for p in sorted((REPO / "pyro_vae").glob("*.py")))
    # ``eval()`` in prose and ``module.eval()`` / ``torch.compile()`` are not the builtins.
    assert not re.search(r"(?<![\w.`])(eval|exec|compile|__import__)\(", source)
    assert not re.search(r"pickle\.loads?\(|yaml\.(unsafe_)?load\(|marshal\.loads?\(", source)
    loads = re.findall(r"torch\.load\([^)]*\)", source)
    assert loads and all("weights_only=True" in call for call in loads), loads
    assert "pickle" not in (REPO / "pyro_vae" / "config.py").read_text()


# -- 5. the promises themselves ------------------------------------------------------------

#: Where the Guarantees are written, and the heading of their section.
GUARANTEES_DOC = REPO / "docs" / "guarantees.md"
GUARANTEES_HEADING = "# Guarantees"


def guarantees_section() -> str:
    """The Guarantees section: from its heading to the next heading of the same level."""
    text = GUARANTEES_DOC.read_text()
    start = text.index(GUARANTEES_HEADING + "\n")
    end = text.find(f"\n{GUARANTEES_HEADING.split()[0]} ", start + len(GUARANTEES_HEADING))
    return text[start : end if end != -1 else len(text)]


@functools.cache
def defined_tests(path: Path) -> set[str]:
    """The test functions pytest collects from a file: module-level ``test*`` functions and
    ``test*`` methods of ``Test*`` classes (pytest's default ``python_functions`` and
    ``python_classes``; setup.cfg sets neither)."""
    import ast

    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names |= {
                f"{node.name}::{item.name}"
                for item in node.body
                if isinstance(item, ast.FunctionDef) and item.name.startswith("test")
            }
    return names


def test_every_guarantee_names_tests_that_exist():
    section = guarantees_section()
    # Each promise is a top-level bullet; its text runs until the next bullet or heading.
    promises = re.split(r"\n(?=- |#)", section)
    promises = [p for p in promises if p.startswith("- ")]
    assert len(promises) >= 20, f"only {len(promises)} promises found in {GUARANTEES_DOC}"
    named = re.compile(r"`(tests/test_\w+\.py)::(\w+(?:::\w+)?)`")
    for promise in promises:
        assert named.search(promise), f"this guarantee names no test: {promise[:200]}"
    missing = sorted(
        f"{path}::{name}"
        for path, name in named.findall(section)
        if not (REPO / path).is_file() or name not in defined_tests(REPO / path)
    )
    assert missing == [], f"{GUARANTEES_DOC.name} names tests that do not exist: {missing}"
