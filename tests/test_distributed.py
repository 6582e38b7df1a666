"""Data-parallel training (:mod:`pyro_vae.distributed`): what 2 CPU processes over Gloo train
is what 1 process trains on the same global batches, and a torchrun job writes one whole run.

The tests marked slow start real processes. Those of :func:`spawn` are 2 ranks started by
``torch.multiprocessing.spawn`` and joined through a rendezvous file (no port to race for),
each running a worker function of this file; they share each group between several checks,
since starting one costs seconds. The others run ``torchrun`` itself, as a user would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing
from common import (
    TINY_MODEL,
    check_run_folder_is_whole,
    one_line_error,
    tiny_config,
    tiny_vae,
    wait_for_epoch,
    without_seconds,
)
from torch.utils.data import DistributedSampler

from pyro_vae import VAE, Config, distributed, fit, load_dataset, load_run, resume_run, train_run
from pyro_vae import runs as runs_module
from pyro_vae.cli import main
from pyro_vae.data import bernoulli_draw
from pyro_vae.describe import build_vae
from pyro_vae.distributed import (
    WorldSizeError,
    data_parallel,
    rank_device,
    record_world,
    step_seed,
)
from pyro_vae.objectives import get_elbo
from pyro_vae.runs import load_checkpoint, read_metrics, restarted_run
from pyro_vae.train import evaluate_elbo, pyro_checks

REPO = Path(__file__).resolve().parents[1]
#: How long a collective of the spawned groups may wait: a rank stuck by a bug fails the test.
TIMEOUT = datetime.timedelta(seconds=60)


def spawn(worker, folder: Path, *args, nprocs: int = 2) -> list[dict]:
    """Run ``worker(rank, folder, *args)`` in ``nprocs`` processes joined in one Gloo group;
    returns what each rank's worker returned (in rank order)."""
    torch.multiprocessing.spawn(_join, (nprocs, str(folder), worker, args), nprocs=nprocs)
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(nprocs)]


def _join(rank: int, world_size: int, folder: str, worker, args: tuple) -> None:
    torch.set_num_threads(1)
    init = f"file://{folder}/rendezvous"
    dist.init_process_group("gloo", init, rank=rank, world_size=world_size, timeout=TIMEOUT)
    try:
        result = worker(rank, Path(folder), *args)
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(folder) / f"rank{rank}.pt")


# -- 1. the same parameters as one process on the same global batches --------------------------

#: One case per objective, together covering the parts with parameters of their own: the
#: VampPrior's pseudo-inputs, learned priors, a learned likelihood scale, the IAF flow.
CASES = {
    "trace": {"prior": "vamp", "guide": "iaf", "prior_kwargs": {"num_components": 5}},
    "meanfield": {"prior": "learned_normal"},
    "stl": {"prior": "mixture", "guide": "full_covariance", "prior_kwargs": {"num_components": 3}},
    "iwae": {"prior": "vamp", "num_particles": 2, "prior_kwargs": {"num_components": 4}},
    "dreg": {"likelihood": "learned_normal", "guide": "iaf", "num_particles": 3},
}
#: 4 global batches of 64 per epoch: 32 rows per rank and step, no row repeated.
NUM_TRAIN, GLOBAL_BATCH = 256, 64
#: SGD, whose step is proportional to the gradient: a gradient off by a factor shows (Adam's
#: step would hide it).
SGD_LR = 1e-4


def case_config(elbo: str) -> Config:
    options = {"latent_dim": 2, "hidden_dims": [8], "epochs": 2, "seed": 5, **CASES[elbo]}
    return Config(elbo=elbo, batch_size=GLOBAL_BATCH, data_dim=64, **options)


def case_data(config: Config):
    binarize = "none" if config.likelihood == "learned_normal" else "dynamic"
    data = load_dataset("digits", binarize=binarize)
    return dataclasses.replace(data, train_x=data.train_x[:NUM_TRAIN])


def case_vae(config: Config) -> VAE:
    torch.manual_seed(0)
    return build_vae(config)


def sgd(vae: VAE) -> torch.optim.Optimizer:
    return torch.optim.SGD(vae.parameters(), lr=SGD_LR)


class ParamOutsideModules(VAE):
    """A model with a ``pyro.param`` of its own, outside the VAE's modules."""

    def model(self, x):
        pyro.param("offset", torch.zeros(()))
        super().model(x)


def train_every_case(rank: int, folder: Path) -> dict:
    """Each rank: every case trained by fit with SGD, and the error of a pyro.param model."""
    results = {}
    for elbo in CASES:
        config = case_config(elbo)
        vae = case_vae(config)
        rows = fit(vae, case_data(config), config, optimizer=sgd(vae))
        results[elbo] = {"rows": without_seconds(rows), "state": vae.state_dict()}
    config = Config(latent_dim=2, hidden_dims=[8], epochs=1, batch_size=GLOBAL_BATCH)
    vae = ParamOutsideModules(64, latent_dim=2, hidden_dims=[8])
    try:
        fit(vae, load_dataset("digits", binarize="dynamic"), config)
    except ValueError as error:
        results["pyro.param error"] = str(error)
    return results


def reference_fit(vae: VAE, data, config: Config, world_size: int) -> list[float]:
    """One process, SGD on the same global batches and draws as ``world_size`` ranks: each
    step's batch is the next chunk of the epoch's permutation (DistributedSampler's, for one
    replica), whose every ``world_size``-th row from row r on is what rank r takes, drawn
    after seeding with step_seed(seed, step, r). The gradients of the shards add up, as the
    loss is a sum. Returns the training ELBO of each epoch."""
    optimizer, loss_fn = sgd(vae), get_elbo(config.elbo, config.num_particles)
    x, step, train_elbos = data.train_x, 0, []
    for epoch in range(1, config.epochs + 1):
        sampler = DistributedSampler(range(len(x)), 1, 0, shuffle=True, seed=config.seed)
        sampler.set_epoch(epoch)
        total = 0.0
        for i, rows in enumerate(torch.tensor(list(sampler)).split(config.batch_size)):
            optimizer.zero_grad()
            for rank in range(world_size):
                torch.manual_seed(step_seed(config.seed, step, rank))
                shard = x[rows[rank::world_size]]
                shard = bernoulli_draw(shard) if data.binarize == "dynamic" else shard
                with pyro_checks(config, first=i == 0):
                    loss = loss_fn.differentiable_loss(vae.model, vae.guide, shard)
                loss.backward()
                total += loss.item()
            optimizer.step()
            step += 1
        train_elbos.append(-total / len(x))
    return train_elbos


@pytest.fixture(scope="module")
def every_case(two_ranks) -> list[dict]:
    return [result["cases"] for result in two_ranks[1]]


@pytest.mark.slow
@pytest.mark.parametrize("elbo", CASES)
def test_two_processes_train_the_parameters_of_one_process_on_the_same_global_batches(
    every_case, elbo
):
    config = case_config(elbo)
    data = case_data(config)
    vae = case_vae(config)
    train_elbos = reference_fit(vae, data, config, world_size=2)
    ranks = [result[elbo] for result in every_case]
    for name, value in vae.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][name], value, msg=name)
        assert torch.equal(ranks[1]["state"][name], ranks[0]["state"][name]), name
    rows = ranks[0]["rows"]
    assert ranks[1]["rows"] == rows  # the metrics are reduced: every rank has the same row
    assert [row["train_elbo"] for row in rows] == pytest.approx(train_elbos, rel=1e-5)
    with pyro.validation_enabled(False):
        test_elbo = evaluate_elbo(vae, data.test_x, "trace", config.num_particles)
    # Other draws than the ranks' (whose shards together are the whole test set).
    assert rows[-1]["test_elbo"] == pytest.approx(test_elbo, abs=1.5)


@pytest.mark.slow
def test_a_pyro_param_outside_the_modules_is_refused(every_case):
    for result in every_case:
        assert (
            "creates the parameter 'offset' with pyro.param outside its modules"
            in (result["pyro.param error"])
        )


# -- 2. run folders and command lines in a group of 2 -------------------------------------------

#: The model of the run-folder checks: TINY_MODEL, 8 steps of 200 per epoch.
RUN = {"seed": 1}


def forbidden(*args, **kwargs):
    raise AssertionError("a rank other than 0 wrote into the run folder")


def cli(argv: list[str]) -> dict:
    """``main(argv)``: its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return {"code": code, "out": out.getvalue(), "err": err.getvalue()}


def runs_and_command_lines(rank: int, folder: Path, runs: dict) -> dict:
    """Each rank: train_run, resume_run and a run in a new folder, with the writing functions
    of rank 1 made to fail; then command lines with settings that do not fit 2 processes."""
    if rank != 0:
        for name in ("atomic_write_bytes", "save_figures", "new_run_dir"):
            setattr(runs_module, name, forbidden)
    results = {}
    train_run(tiny_config(epochs=2, **RUN), folder / "interrupted")
    resumed = resume_run(folder / "interrupted", epochs=3)
    results["resumed epoch"] = resumed.checkpoint["epoch"]
    train_run(tiny_config(epochs=3, **RUN), folder / "whole")
    os.chdir(folder)
    results["new folder"] = train_run(tiny_config(epochs=1, **RUN)).path
    tiny = [*TINY_MODEL, "--epochs", "1"]
    results["odd batch"] = cli(["train", *tiny, "--batch-size", "201", "--out", "odd"])
    results["resume odd batch"] = cli(["train", "--resume", str(runs["odd batch"])])
    results["resume"] = cli(["train", "--resume", str(runs["one process"]), "--epochs", "2"])
    results["one gpu"] = cli(["train", *tiny, "--device", "cuda:1"])
    return results


def both(rank: int, folder: Path, runs: dict) -> dict:
    """The workers of the spawned group: starting one costs seconds, so they share it."""
    return {
        "cases": train_every_case(rank, folder),
        "runs": runs_and_command_lines(rank, folder, runs),
    }


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The spawned group's folder and the results of each rank."""
    folder = tmp_path_factory.mktemp("ranks")
    runs = {"odd batch": folder / "odd-one", "one process": folder / "one"}
    one_epoch = ["train", *TINY_MODEL, "--epochs", "1"]
    assert main([*one_epoch, "--batch-size", "201", "--out", str(runs["odd batch"])]) == 0
    assert main([*one_epoch, "--out", str(runs["one process"])]) == 0
    return folder, spawn(both, folder, runs)


@pytest.fixture(scope="module")
def runs_and_errors(two_ranks) -> tuple[Path, list[dict]]:
    return two_ranks[0], [result["runs"] for result in two_ranks[1]]


@pytest.mark.slow
def test_only_rank_zero_writes_and_every_rank_resumes_from_the_checkpoint(runs_and_errors):
    folder, ranks = runs_and_errors  # rank 1 would have failed on writing anything
    assert [r["resumed epoch"] for r in ranks] == [3, 3]
    resumed, whole = read_metrics(folder / "interrupted"), read_metrics(folder / "whole")
    assert len(resumed) == 3 and without_seconds(resumed) == without_seconds(whole)
    new = ranks[0]["new folder"]
    assert ranks[1]["new folder"] == new and list((folder / "runs").iterdir()) == [folder / new]
    assert load_run(folder / new).config.world_size == 2


def check_every_rank(ranks: list[dict], case: str, code: int, start: str) -> list[str]:
    """Every rank ended ``case`` with exit code ``code`` and one line on stderr starting with
    ``start``, and printed nothing; returns the lines."""
    lines = []
    for result in ranks:
        outcome = result[case]
        assert outcome["code"] == code and outcome["out"] == "", outcome
        assert outcome["err"].count("\n") == 1 and outcome["err"].startswith(start), outcome
        lines.append(outcome["err"])
    return lines


@pytest.mark.slow
def test_a_batch_two_processes_do_not_divide_is_a_one_line_error_on_every_rank(
    runs_and_errors,
):
    _, ranks = runs_and_errors
    for line in check_every_rank(ranks, "odd batch", 2, "pyro-vae train: error: "):
        assert "batch_size 201 is the global batch, shared evenly by the 2 processes" in line
        assert "2 does not divide it; set --batch-size to a multiple of 2 or start" in line
    for line in check_every_rank(ranks, "resume odd batch", 2, "pyro-vae train: error: "):
        assert "this run was trained by 1 process(es) with batch_size 201" in line
        assert "resume it with a number of processes that divides 201" in line
    for line in check_every_rank(ranks, "one gpu", 1, "pyro-vae: error: "):
        assert "device 'cuda:1' names one GPU" in line


@pytest.mark.slow
def test_a_run_resumed_by_more_processes_warns_on_rank_zero_which_alone_prints(
    runs_and_errors,
):
    folder, (first, second) = runs_and_errors
    assert first["resume"]["code"] == second["resume"]["code"] == 0
    assert first["resume"]["err"].startswith("pyro-vae: warning: this run was trained by 1")
    assert first["resume"]["out"].count("run saved to") == 1
    assert second["resume"]["err"] == second["resume"]["out"] == ""
    run = load_run(folder / "one")
    assert (run.config.world_size, run.config.backend, run.checkpoint["epoch"]) == (2, "gloo", 2)


# -- 3. torchrun itself: one run, and a restart after a rank was killed ------------------------

#: The torchrun runs: TINY_MODEL for 30 epochs (about 4 s of training for 2 processes here).
TORCHRUN_TRAIN = ["train", *TINY_MODEL, "--epochs", "30", "--seed", "2"]
#: How far a 2-process training may end from a 1-process one, in nats: 1-process runs of
#: TORCHRUN_TRAIN with seeds 0 to 5 end between -30.2 and -29.8.
CONVERGENCE = 1.0


def torchrun(*args: str) -> subprocess.Popen:
    """``torchrun --standalone --nproc-per-node 2 *args``, with this checkout importable."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return subprocess.Popen(
        [*command, "--nproc-per-node", "2", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory) -> tuple[Path, str]:
    """A run trained by ``torchrun ... -m pyro_vae train``, and what it printed."""
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    process = torchrun("-m", "pyro_vae", *TORCHRUN_TRAIN, "--out", str(run_dir))
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return run_dir, out


@pytest.mark.slow
def test_torchrun_trains_one_run_that_loads_samples_and_converges_like_one_process(
    torchrun_run, tmp_path
):
    run_dir, out = torchrun_run
    test_elbo = read_metrics(run_dir)[-1]["test_elbo"]
    assert out == f"test ELBO {test_elbo:.2f} nats after epoch 30; run saved to {run_dir}\n"
    run = load_run(run_dir)
    assert (run.config.world_size, run.config.backend, run.checkpoint["epoch"]) == (2, "gloo", 30)
    assert main(["sample", str(run_dir), "--num", "4"]) == 0
    assert (run_dir / "sample_grid.png").is_file()
    assert main([*TORCHRUN_TRAIN, "--out", str(tmp_path / "one")]) == 0
    one = read_metrics(tmp_path / "one")[-1]["test_elbo"]
    assert abs(run.metrics[-1]["test_elbo"] - one) < CONVERGENCE


def worker_pid(torchrun_pid: int, rank: int) -> int:
    """The process of rank ``rank`` among the children of a torchrun process."""
    for pid in Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise LookupError(f"no process of rank {rank} under torchrun ({torchrun_pid})")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's ranks in /proc")
def test_a_rank_killed_mid_epoch_under_max_restarts_is_restarted_and_the_run_repeats(
    torchrun_run, tmp_path
):
    run_dir = tmp_path / "run"
    process = torchrun(
        "--max-restarts", "1", "-m", "pyro_vae", *TORCHRUN_TRAIN, "--out", str(run_dir)
    )
    wait_for_epoch(process, run_dir, 3)
    os.kill(worker_pid(process.pid, rank=0), signal.SIGKILL)  # the rank that writes
    assert read_metrics(run_dir)[-1]["epoch"] < 30
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert out.count("run saved to") == 1
    assert check_run_folder_is_whole(run_dir) == 30
    # The restarted job resumed from the last checkpoint: the same numbers as an uninterrupted one.
    assert without_seconds(read_metrics(run_dir)) == without_seconds(read_metrics(torchrun_run[0]))


# -- 4. one process: the pieces, and what a torchrun job of one refuses -----------------------


def test_step_seeds_differ_by_step_and_rank_and_repeat():
    seeds = {step_seed(0, step, rank) for step in range(100) for rank in range(4)}
    assert len(seeds) == 400
    assert step_seed(3, 7, 1) == step_seed(3, 7, 1) != step_seed(4, 7, 1)


def test_one_process_records_world_size_1():
    assert (record_world(Config()).world_size, record_world(Config()).backend) == (1, None)
    assert record_world(Config(world_size=2, backend="gloo")).world_size == 1


def test_a_run_of_2_processes_resumed_by_1_says_its_draws_change(digits, tmp_path):
    config = tiny_config(epochs=1)
    fit(tiny_vae(0), digits, config, run_dir=tmp_path)
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    checkpoint["config"]["world_size"] = 2  # as if 2 processes had trained it
    with pytest.warns(UserWarning, match=r"trained by 2 process\(es\) and resumes with 1: the"):
        fit(tiny_vae(0), digits, dataclasses.replace(config, epochs=2), checkpoint=checkpoint)


def test_a_world_size_that_does_not_divide_the_global_batch_is_refused(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(WorldSizeError, match="shared evenly by the 3 processes of this job, but"):
        record_world(Config(batch_size=100))
    with pytest.raises(WorldSizeError, match="trained by 2 process.es. with batch_size 100, the"):
        record_world(Config(batch_size=100, world_size=2))


def test_a_process_of_several_takes_the_gpu_of_its_local_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'cuda:0' names one GPU, but each of the 4"):
        rank_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device("auto") == rank_device("cuda") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="has 2 CUDA device.s. but runs process LOCAL_RANK 2"):
        rank_device("cuda")


def test_a_process_of_several_outside_a_process_group_is_refused(digits, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="one of the 2 that torchrun started, but it has joined"):
        data_parallel(VAE(64, latent_dim=2), Config(), digits.train_x)


def test_max_restarts_without_out_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    err = one_line_error(capsys, main(["train", *TINY_MODEL]), expected_code=2)
    assert "torchrun --max-restarts needs --out" in err


def test_a_restarted_job_resumes_its_own_run_and_no_other(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    argv = ["train", *TINY_MODEL, "--epochs", "1", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    assert not restarted_run(tmp_path / "run")  # not restarted
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert restarted_run(tmp_path / "run") and not restarted_run(tmp_path / "none")
    assert main([*argv[:-3], "2", *argv[-2:]]) == 0  # resumed, to 2 epochs
    assert [row["epoch"] for row in read_metrics(tmp_path / "run")] == [1, 2]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    capsys.readouterr()
    assert "already holds a run" in one_line_error(capsys, main(argv), expected_code=2)
