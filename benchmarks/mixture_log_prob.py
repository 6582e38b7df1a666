"""Mixture prior density: DiagonalNormalMixture against torch's MixtureSameFamily.

Times ``log_prob`` of both for one evaluation pass of ``pyro-vae evaluate`` (5000 importance
samples of one image, 20 latent dimensions) against the 10 components of the ``mixture`` prior
and the 500 of the ``vamp`` prior, in float32 on CPU, and reports the largest difference from
a float64 reference. Writes ``benchmarks/results/mixture_log_prob.json`` and prints a Markdown
table.

    python benchmarks/mixture_log_prob.py
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

from pyro_vae.distributions import DiagonalNormalMixture

RESULTS = Path(__file__).parent / "results"


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--latent-dim", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS), help="folder for the JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for num_components in (10, 500):
        logits = torch.randn(num_components, dtype=torch.float64)
        loc = torch.randn(num_components, args.latent_dim, dtype=torch.float64)
        scale = torch.empty_like(loc).uniform_(0.05, 1.5)
        z = loc[torch.randint(num_components, (args.num_samples,))] + torch.randn(
            args.num_samples, args.latent_dim, dtype=torch.float64
        )
        exact = DiagonalNormalMixture(logits, loc, scale).log_prob(z)
        logits32, loc32, scale32, z32 = (t.float() for t in (logits, loc, scale, z))
        generic = dist.MixtureSameFamily(
            dist.Categorical(logits=logits32), dist.Normal(loc32, scale32).to_event(1)
        )
        fast = DiagonalNormalMixture(logits32, loc32, scale32)
        row = {"num_components": num_components}
        with torch.no_grad():
            for name, mixture in (("MixtureSameFamily", generic), ("DiagonalNormalMixture", fast)):
                seconds = median_seconds(lambda m=mixture, z=z32: m.log_prob(z), args.repeats)
                error = (mixture.log_prob(z32).double() - exact).abs().max().item()
                row[name] = {"ms": 1000 * seconds, "max_abs_error": error}
        row["speedup"] = row["MixtureSameFamily"]["ms"] / row["DiagonalNormalMixture"]["ms"]
        rows.append(row)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, pyro {pyro.__version__}",
        "num_samples": args.num_samples,
        "latent_dim": args.latent_dim,
        "dtype": "float32",
        "results": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mixture_log_prob.json").write_text(json.dumps(report, indent=2) + "\n")
    print("| components | MixtureSameFamily ms | DiagonalNormalMixture ms | speed-up | max error |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        generic, fast = r["MixtureSameFamily"], r["DiagonalNormalMixture"]
        print(
            f"| {r['num_components']} | {generic['ms']:.1f} | {fast['ms']:.1f} | "
            f"{r['speedup']:.0f}x | {fast['max_abs_error']:.1e} (generic "
            f"{generic['max_abs_error']:.1e}) |"
        )


if __name__ == "__main__":
    main()
