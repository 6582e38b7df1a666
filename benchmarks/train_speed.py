"""Training speed: pyro_vae's SVI step against a plain PyTorch VAE of the same architecture.

Both train the 784-400-400-20 ReLU VAE on dynamically binarized MNIST with Adam (lr 1e-3,
batch 100) for the same number of steps; the plain version writes the ELBO by hand (analytic
KL, one sample). Writes ``benchmarks/results/train_speed.json`` and prints a Markdown table.

    python benchmarks/train_speed.py --data-dir ../shared/data
"""

import argparse
import json
import platform
import time
from pathlib import Path

import pyro
import torch
from torch import nn
from torch.nn import functional as F

from pyro_vae import VAE, iterate_batches, load_dataset
from pyro_vae.objectives import get_elbo

RESULTS = Path(__file__).parent / "results"


class PlainVAE(nn.Module):
    def __init__(self, data_dim=784, hidden=400, latent_dim=20):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(data_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 2 * latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, data_dim),
        )

    def loss(self, x):
        loc, raw_scale = self.encoder(x).chunk(2, dim=-1)
        scale = F.softplus(raw_scale) + 1e-4
        z = loc + scale * torch.randn_like(loc)
        logits = self.decoder(z)
        log_px = -F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kl = (0.5 * (loc**2 + scale**2 - 1) - scale.log()).sum()
        return -(log_px - kl)


def time_steps(step, batches, num_steps, warmup=20):
    for _ in range(warmup):
        step(next(batches))
    start = time.perf_counter()
    for _ in range(num_steps):
        step(next(batches))
    return (time.perf_counter() - start) / num_steps


def endless(x, batch_size):
    while True:
        yield from iterate_batches(x, batch_size, binarize=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()
    data = load_dataset("mnist", args.data_dir, binarize="dynamic")
    steps_per_epoch = -(-len(data.train_x) // args.batch_size)
    results = {}
    for name in ("pyro_vae trace", "pyro_vae meanfield", "plain PyTorch"):
        torch.manual_seed(0)
        pyro.clear_param_store()
        if name.startswith("pyro_vae"):
            vae = VAE(784)
            elbo = get_elbo(name.split()[1])

            def loss_fn(x, vae=vae, elbo=elbo):
                return elbo.differentiable_loss(vae.model, vae.guide, x)
        else:
            vae = PlainVAE()
            loss_fn = vae.loss
        optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)

        def step(x, loss_fn=loss_fn, optimizer=optimizer):
            optimizer.zero_grad()
            loss_fn(x).backward()
            optimizer.step()

        seconds = time_steps(step, endless(data.train_x, args.batch_size), args.steps)
        results[name] = {"ms_per_step": 1000 * seconds, "s_per_epoch": seconds * steps_per_epoch}
    report = {
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, pyro {pyro.__version__}",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    print("| implementation | ms / step | s / MNIST epoch |\n|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['ms_per_step']:.1f} | {r['s_per_epoch']:.1f} |")


if __name__ == "__main__":
    main()
