"""Render README's "Published results, reproduced" from the run folders of reproduce.sh.

    python benchmarks/reproduce_table.py --out benchmarks/results RUN_DIR [RUN_DIR ...]
    python benchmarks/reproduce_table.py --machine RUN_DIR     # record where RUN_DIR trained

Each row reads the run's config.json (its recipe and what was given over it), metrics.csv
(epochs run, wall time), evaluation.json (test log p(x), K=5000) and machine.json, and says
honestly how the run ended: the whole protocol, early stopping, or the budget (``--epochs``
given over the recipe's). Writes ``reproduce.md`` and ``reproduce_curves.png`` (test ELBO by
epoch of every row) into ``--out``.
"""

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from pyro_vae.plots import plot_elbo_curves
from pyro_vae.recipes import recipe_settings
from pyro_vae.runs import load_config, read_metrics

#: The papers' test log p(x) (K=5000, dynamically binarized MNIST), by row of reproduce.sh, as
#: issue 13 quotes them: IWAE paper table 1 (Burda et al. 2016), VampPrior paper (Tomczak and
#: Welling 2018).
PAPER = {
    "iwae-paper-vae": -86.76,
    "iwae-paper-k50": -84.78,
    "iwae-paper-2layer-vae": -85.33,
    "iwae-paper-2layer-k50": -82.90,
    "vampprior-paper": -84.45,
    "vampprior-paper-vamp": -82.43,
    "vampprior-paper-2layer-vamp": -81.56,
}
HEADER = (
    "| row | recipe and flags | paper | ours: test log p(x) | epochs | how it ended | wall time "
    "| machine |\n|---|---|---:|---:|---:|---|---:|---|\n"
)


def write_machine(run_dir: Path, device: str | None) -> None:
    """Record the machine a run trained on, in ``machine.json`` beside its config."""
    cuda = (device or "").startswith("cuda") and torch.cuda.is_available()
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
    machine = torch.cuda.get_device_name() if cuda else cpu
    (run_dir / "machine.json").write_text(json.dumps({"machine": machine}) + "\n")


def how_it_ended(config, rows: list[dict]) -> str:
    """The whole protocol, early stopping or the budget, in words."""
    planned = recipe_settings(config.recipe)["epochs"] if config.recipe else config.epochs
    run = len(rows)
    if run < config.epochs:
        best = max(rows, key=lambda r: r.get("valid_elbo", float("-inf")))["epoch"]
        return f"early stopping at epoch {run} (best valid ELBO at {best})"
    if run < planned:
        return f"**stopped by the budget** at {run} of {planned} epochs"
    return "the whole protocol"


def row(run_dir: Path) -> str:
    config, rows = load_config(run_dir), read_metrics(run_dir)
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    k = evaluation["num_samples"]
    estimate = next(r for r in evaluation["log_likelihood"] if r["k"] == k)
    images = evaluation["num_datapoints"]
    ours = f"{estimate['mean']:.2f} ± {estimate['stderr']:.2f} (K={k}, {images} images)"
    given = " ".join(f"{o}" for o in config.recipe_overrides)
    recipe = f"`{config.recipe}`" + (f", given: {given}" if given else "")
    name = run_dir.name.removeprefix("reproduce-")
    paper = f"{PAPER[name]:.2f}" if name in PAPER else "—"
    hours = sum(r["seconds"] for r in rows) / 3600
    machine_file = run_dir / "machine.json"
    machine = json.loads(machine_file.read_text())["machine"] if machine_file.exists() else "?"
    return (
        f"| {name} | {recipe} | {paper} | {ours} | {len(rows)} | {how_it_ended(config, rows)} "
        f"| {hours:.2f} h | {machine} |\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of reproduce.sh")
    parser.add_argument("--out", type=Path, help="folder of reproduce.md and the figure")
    parser.add_argument("--machine", action="store_true", help="record the machine of RUN_DIR")
    parser.add_argument("--device", default=None, help="the device the run trained on")
    args = parser.parse_args()
    if args.machine:
        for run_dir in args.runs:
            write_machine(run_dir, args.device)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    table = HEADER + "".join(row(run_dir) for run_dir in args.runs)
    (args.out / "reproduce.md").write_text(table)
    curves = {run.name.removeprefix("reproduce-"): read_metrics(run) for run in args.runs}
    plot_elbo_curves(curves).savefig(args.out / "reproduce_curves.png", dpi=120)
    print(table, end="")


if __name__ == "__main__":
    main()
