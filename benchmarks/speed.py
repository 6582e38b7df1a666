"""Speed: pyro_vae against hand-written PyTorch, measured side by side in one process.

Contenders of a comparison run interleaved (A B A B ..., one warm-up each first) and each is
reported by its median with min and max over the rounds. The sections:

- ``train``: images per second of one :func:`pyro_vae.fit` epoch (its test ELBO included)
  against the same epoch written by hand in PyTorch, with the same networks and initial
  weights, Adam settings, minibatches and data on the same device, at batch 32, 100 and 512
  and for the ``trace`` and ``meanfield`` ELBOs. The hand-written loop runs twice: with
  ``torch.optim.Adam`` as a PyTorch user writes it, and with torch's fused Adam (the one
  ``fit`` uses); the roofline fraction is the networks' FLOPs per second over the large-matmul
  FLOPs per second measured in the same run.
- ``logpx``: importance samples times datapoints per second of
  :func:`pyro_vae.estimate_log_likelihood` at K = 5000 against a hand-written IWAE estimate,
  the roofline fraction of the decoder's FLOPs, and the peak memory of a process doing only
  that.
- ``evaluate``: ``pyro-vae evaluate RUN --num-samples 5000`` over the 10,000 MNIST test images
  (a one-epoch run is trained first unless ``--evaluate-run`` names one): wall time and peak
  memory.
- ``peer``: the architecture and batch of Pyro's ``examples/vae/vae.py`` (784-400-50, softplus,
  batch 256), trained by ``SVI.step`` with ``pyro.optim.Adam`` as that example does, against
  ``fit`` with the same architecture.
- ``profile``: where the time of a training step at batch 512 and of a log p(x) pass goes,
  by operator (``torch.profiler``).

Results go to ``benchmarks/results/speed-<device>.json``; ``benchmarks/RESULTS.md`` is
rendered from every ``speed-*.json`` there. ``--tiny`` runs every section on a few digits
images in seconds, to check that the script works (the test suite does that).

    python benchmarks/speed.py --data-dir ../shared/data
    python benchmarks/speed.py --data-dir ../shared/data --device cuda
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn
from torch.nn import functional as F

from pyro_vae import VAE, Config, estimate_log_likelihood, fit, load_dataset, train_run
from pyro_vae.devices import resolve_device
from pyro_vae.distributions import positive_scale
from pyro_vae.objectives import is_importance_weighted
from pyro_vae.report import evaluation_file

HERE = Path(__file__).resolve().parent
SECTIONS = ("train", "objectives", "logpx", "evaluate", "peer", "profile")
#: Sections run only when asked for by ``--sections``.
EXTRA_SECTIONS = ("compile",)
#: The targets of issue 11, as fractions; RESULTS.md says for each whether it holds.
TARGETS = {
    "fit_vs_plain": 1.0,
    "train_roofline_512": 0.60,
    "logpx_roofline": 0.75,
    "logpx_peak_mb": 2048,
    "evaluate_minutes": 8.0,
}


@dataclasses.dataclass
class Sizes:
    """How much work each measurement does (the full run, or ``--tiny``)."""

    dataset: str = "mnist"
    train_images: int = 60000
    test_images: int = 10000
    batch_sizes: tuple[int, ...] = (32, 100, 512)
    elbos: tuple[str, ...] = ("trace", "meanfield")
    rounds: int = 3
    logpx_images: int = 100
    num_samples: int = 5000
    logpx_rounds: int = 3
    evaluate_limit: int | None = None
    hidden_dims: tuple[int, ...] = (400, 400)
    latent_dim: int = 20
    matmul_size: int = 2048


TINY = Sizes(
    dataset="digits",
    train_images=256,
    test_images=64,
    batch_sizes=(32, 64),
    rounds=2,
    logpx_images=2,
    num_samples=50,
    logpx_rounds=2,
    evaluate_limit=20,
    hidden_dims=(32, 32),
    latent_dim=4,
    matmul_size=256,
)


# ----------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(contenders: dict, rounds: int, device: torch.device) -> dict:
    """Seconds per call of each contender: one warm-up call each, then ``rounds`` rounds of
    one call each in turn; median, min and max."""
    seconds = {name: [] for name in contenders}
    for fn in contenders.values():
        fn()
        sync(device)
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
    return {
        name: {"median": statistics.median(t), "min": min(t), "max": max(t)}
        for name, t in seconds.items()
    }


def matmul_gflops(device: torch.device, n: int, reps: int = 10) -> float:
    """Float32 GFLOP/s of an ``n x n`` matrix product, the best of three timings."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = math.inf
    for _ in range(4):  # the first is a warm-up
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best / 1e9


def linear_macs(module: nn.Module) -> tuple[int, int]:
    """Multiply-adds per datapoint of the Linear layers of ``module``, and those of its first."""
    sizes = [m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear)]
    return sum(sizes), sizes[0]


def train_flops(vae: nn.Module, k: int = 1) -> tuple[float, float]:
    """FLOPs per image of a training step and of a test forward pass of encoder and decoder,
    with ``k`` draws through the decoder: forward 2 MACs, weight gradients 2 MACs, input
    gradients 2 MACs except for the first layer (the data need no gradient)."""
    enc, enc_first = linear_macs(vae.encoder)
    dec, _ = linear_macs(vae.decoder)
    step = 6 * enc - 2 * enc_first + k * 6 * dec
    return step, 2 * (enc + k * dec)


# ----------------------------------------------------------------------------- contenders


class PlainVAE(nn.Module):
    """The hand-written VAE: the same encoder and decoder modules, the ELBO written out."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent_dim: int):
        super().__init__()
        self.encoder, self.decoder, self.latent_dim = encoder, decoder, latent_dim

    def loss(self, x: torch.Tensor, elbo: str, k: int = 1) -> torch.Tensor:
        """Minus the objective ``elbo`` (a key of pyro_vae's ELBO registry) summed over the
        batch, written out: the one-sample ELBO for ``trace`` and ``meanfield``, else
        :meth:`objective_loss` with ``k`` draws."""
        if elbo in ("trace", "meanfield"):
            return self._elbo_loss(x, analytic_kl=elbo == "meanfield")
        return self.objective_loss(x, elbo, k)

    def test_metrics(self, x: torch.Tensor, elbo: str, k: int) -> None:
        """The test metrics ``fit`` records for ``elbo``: the test ELBO (the objective's value
        for ``trace``, ``meanfield`` and ``stl``) and, for iwae and dreg, the K-draw test ELBO
        and the test IWAE bound, each from its own draws."""
        if elbo in ("trace", "meanfield"):
            self._elbo_loss(x, analytic_kl=elbo == "meanfield").item()
            return
        self.log_weights(x, k)[0].mean(0).sum().item()
        if elbo != "stl":
            self.log_weights(x, k)[0].logsumexp(0).sum().item()

    def _elbo_loss(self, x: torch.Tensor, analytic_kl: bool) -> torch.Tensor:
        """Minus the one-sample ELBO summed over the batch."""
        loc, raw_scale = self.encoder(x).split(self.latent_dim, dim=-1)
        scale = positive_scale(raw_scale)
        eps = torch.randn_like(loc)
        z = loc + scale * eps
        log_px = -F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="sum")
        if analytic_kl:
            kl = (0.5 * (loc**2 + scale**2 - 1) - scale.log()).sum()
        else:  # log q(z|x) - log p(z) at the draw; the 0.5 log(2 pi) terms cancel
            kl = (0.5 * (z**2 - eps**2) - scale.log()).sum()
        return kl - log_px

    def log_weights(self, x: torch.Tensor, k: int, stop_score: bool = False) -> tuple:
        """The ``(K, B)`` log-weights log p(x, z) - log q(z|x) of K reparameterized draws per
        datapoint (the 0.5 log(2 pi) terms cancel), and the draws; with ``stop_score`` the
        parameters of q are detached in log q (the path derivative only)."""
        loc, raw_scale = self.encoder(x).split(self.latent_dim, dim=-1)
        scale = positive_scale(raw_scale)
        z = loc + scale * torch.randn((k,) + loc.shape, device=x.device)
        logits = self.decoder(z)
        log_px = -F.binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="none"
        ).sum(-1)
        q_loc, q_scale = (loc.detach(), scale.detach()) if stop_score else (loc, scale)
        log_q = (-0.5 * ((z - q_loc) / q_scale) ** 2 - q_scale.log()).sum(-1)
        return log_px - 0.5 * (z**2).sum(-1) - log_q, z

    def objective_loss(self, x: torch.Tensor, name: str, k: int) -> torch.Tensor:
        """Minus the ``stl``, ``iwae`` or ``dreg`` objective summed over the batch, written out
        (DReG with a hook that weights the gradient reaching each draw by its normalized
        weight, as the DReG paper's reference code does in two losses)."""
        log_w, z = self.log_weights(x, k, stop_score=name in ("stl", "dreg"))
        if name == "stl":
            return -log_w.mean(0).sum()
        if name == "dreg":
            weights = torch.softmax(log_w.detach(), dim=0)
            z.register_hook(lambda grad: grad * weights.unsqueeze(-1))
        return -(log_w.logsumexp(0) - math.log(k)).sum()


def objectives_section(data, device, sizes: Sizes, peak: float, batch_size: int = 100):
    """``fit`` with the ``stl``, ``iwae`` and ``dreg`` objectives against the same objectives
    written by hand, at one batch size."""
    return [
        _comparison_row(data, device, sizes, peak, batch_size, elbo, k)
        for elbo, k in (("stl", 1), ("iwae", 5), ("dreg", 5))
    ]


def plain_epoch(model: PlainVAE, data, batch_size: int, elbo: str, k: int, fused: bool) -> None:
    """One epoch of a hand-written training loop of ``elbo`` with ``k`` draws, then its test
    metrics, as a user writes them."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused or None)
    torch.manual_seed(0)
    x = data.train_x
    order = torch.randperm(x.shape[0], device=x.device)
    for start in range(0, x.shape[0], batch_size):
        batch = torch.bernoulli(x[order[start : start + batch_size]])
        loss = model.loss(batch, elbo, k)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        for chunk in data.test_x.split(2000):
            model.test_metrics(chunk, elbo, k)


def train_section(data, device: torch.device, sizes: Sizes, peak: float) -> list[dict]:
    rows = []
    for batch_size in sizes.batch_sizes:
        for elbo in sizes.elbos:
            rows.append(_comparison_row(data, device, sizes, peak, batch_size, elbo))
    return rows


def _comparison_row(
    data, device, sizes: Sizes, peak: float, batch_size: int, elbo: str, k: int = 1
) -> dict:
    """One epoch of ``fit`` against the hand-written loop, with and without fused Adam, from
    the same initial weights: timings, images/s, roofline fractions and the ratios."""
    torch.manual_seed(0)
    vae = VAE(data.data_dim, sizes.latent_dim, sizes.hidden_dims).to(device)
    plain = PlainVAE(copy.deepcopy(vae.encoder), copy.deepcopy(vae.decoder), sizes.latent_dim)
    plain_fused = copy.deepcopy(plain)
    config = Config(dataset=data.name, epochs=1, batch_size=batch_size, elbo=elbo, num_particles=k)
    timings = interleave(
        {
            "pyro_vae": lambda: fit(vae, data, config),
            "plain": lambda: plain_epoch(plain, data, batch_size, elbo, k, fused=False),
            "plain_fused": lambda: plain_epoch(plain_fused, data, batch_size, elbo, k, True),
        },
        sizes.rounds,
        device,
    )
    step, test = train_flops(vae, k)
    test_passes = 2 if is_importance_weighted(elbo) else 1  # test ELBO and test IWAE bound
    flops = step * data.train_x.shape[0] + test_passes * test * data.test_x.shape[0]
    row = {"batch_size": batch_size, "elbo": elbo, "num_particles": k, "timings": timings}
    for name, t in timings.items():
        row[f"{name}_images_per_s"] = data.train_x.shape[0] / t["median"]
        row[f"{name}_roofline"] = flops / t["median"] / 1e9 / peak
    row["fit_vs_plain"] = row["pyro_vae_images_per_s"] / row["plain_images_per_s"]
    row["fit_vs_plain_fused"] = row["pyro_vae_images_per_s"] / row["plain_fused_images_per_s"]
    return row


def plain_log_likelihood(vae: VAE, x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """IWAE log p(x) written by hand for the Gaussian-prior, Bernoulli VAE, one image at a time
    with all K draws in one pass, as a user would write it."""
    results = []
    with torch.no_grad():
        for row in x:
            loc, raw_scale = vae.encoder(row).split(vae.latent_dim, dim=-1)
            q = dist.Normal(loc, positive_scale(raw_scale))
            z = q.rsample((num_samples,))
            logits = vae.decoder(z)
            log_px_z = -F.binary_cross_entropy_with_logits(
                logits, row.expand_as(logits), reduction="none"
            ).sum(-1)
            log_w = log_px_z + dist.Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
            results.append(log_w.logsumexp(0) - math.log(num_samples))
    return torch.stack(results)


def logpx_section(args, peak: float) -> dict:
    """log p(x) throughput, measured in a fresh process (a long training run before it in this
    one leaves the heap in a state that slows large allocations down), and the peak memory of
    another fresh process that runs only pyro_vae's estimate."""
    probe = [sys.executable, __file__, *_shared_args(args), "--probe-logpx"]
    result = json.loads(_run([*probe, "timings"]).stdout.splitlines()[-1])
    for name, t in result["timings"].items():
        result[f"{name}_samples_per_s"] = result["images"] * result["num_samples"] / t["median"]
        result[f"{name}_roofline"] = result["flops"] / t["median"] / 1e9 / peak
    result["pyro_vae_vs_plain"] = result["pyro_vae_samples_per_s"] / result["plain_samples_per_s"]
    result["pyro_vae_peak_mb"] = json.loads(_run([*probe, "memory"]).stdout.splitlines()[-1])[
        "peak_mb"
    ]
    return result


def probe_logpx(args, sizes: Sizes, what: str) -> None:
    """Print, as JSON, the interleaved timings of pyro_vae's and the hand-written log p(x)
    (``what="timings"``), or the peak memory of pyro_vae's alone (``"memory"``)."""
    device = resolve_device(args.device)
    data = load_dataset(sizes.dataset, args.data_dir, binarize="dynamic", device=device)
    torch.manual_seed(0)
    vae = VAE(data.data_dim, sizes.latent_dim, sizes.hidden_dims).to(device).eval()
    x = torch.bernoulli(data.test_x[: sizes.logpx_images])
    k = sizes.num_samples

    def pyro_vae():
        # As pyro-vae evaluate runs it: Pyro's validation off (the hand-written one has none).
        with pyro.validation_enabled(False):
            estimate_log_likelihood(vae.model, vae.guide, x, k)

    if what == "memory":
        pyro_vae()
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        print(json.dumps({"peak_mb": peak}))
        return
    timings = interleave(
        {"pyro_vae": pyro_vae, "plain": lambda: plain_log_likelihood(vae, x, k)},
        sizes.logpx_rounds,
        device,
    )
    dec, _ = linear_macs(vae.decoder)
    enc, _ = linear_macs(vae.encoder)
    flops = x.shape[0] * (k * 2 * dec + 2 * enc)
    print(json.dumps({"num_samples": k, "images": x.shape[0], "flops": flops, "timings": timings}))


def evaluate_section(device, sizes: Sizes, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.evaluate_run
        if run_dir is None:
            run_dir = str(Path(tmp) / "run")
            config = Config(
                dataset=sizes.dataset,
                data_dir=args.data_dir,
                epochs=1,
                latent_dim=sizes.latent_dim,
                hidden_dims=list(sizes.hidden_dims),
                device=str(device),
            )
            train_run(config, run_dir)
        command = ["evaluate", run_dir, "--num-samples", str(sizes.num_samples)]
        command += ["--device", str(device)]
        if args.data_dir is not None:
            command += ["--data-dir", args.data_dir]
        if sizes.evaluate_limit is not None:
            command += ["--limit", str(sizes.evaluate_limit)]
        start = time.perf_counter()
        out = _run([sys.executable, __file__, "--probe-cli", *command])
        seconds = time.perf_counter() - start
        name = evaluation_file("test", sizes.evaluate_limit)
        evaluation = json.loads((Path(run_dir) / name).read_text())
    return {
        "command": "pyro-vae " + shlex.join(command),
        "trained_here": args.evaluate_run is None,
        "num_datapoints": evaluation["num_datapoints"],
        "seconds": seconds,
        "seconds_by_part": evaluation["seconds"],
        "peak_mb": json.loads(out.stdout.splitlines()[-1])["peak_mb"],
    }


def probe_cli(argv: list[str]) -> None:
    """Run ``pyro-vae ARGV`` in this process, then print its peak memory."""
    from pyro_vae.cli import main

    main(argv)
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10}))


class PyroExampleVAE(nn.Module):
    """The model and guide of Pyro's ``examples/vae/vae.py``, as that example writes them:
    one softplus hidden layer each way, the scale through ``exp``, Bernoulli probabilities
    through a sigmoid, parameters registered with ``pyro.module``."""

    def __init__(self, data_dim: int, hidden: int, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.enc_hidden = nn.Linear(data_dim, hidden)
        self.enc_loc = nn.Linear(hidden, latent_dim)
        self.enc_scale = nn.Linear(hidden, latent_dim)
        self.dec_hidden = nn.Linear(latent_dim, hidden)
        self.dec_out = nn.Linear(hidden, data_dim)

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self)
        with pyro.plate("data", x.shape[0]):
            loc = x.new_zeros(x.shape[0], self.latent_dim)
            z = pyro.sample("z", dist.Normal(loc, torch.ones_like(loc)).to_event(1))
            probs = torch.sigmoid(self.dec_out(F.softplus(self.dec_hidden(z))))
            pyro.sample("x", dist.Bernoulli(probs, validate_args=False).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self)
        with pyro.plate("data", x.shape[0]):
            hidden = F.softplus(self.enc_hidden(x))
            loc, scale = self.enc_loc(hidden), torch.exp(self.enc_scale(hidden))
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def peer_section(data, device, sizes: Sizes) -> dict:
    hidden, latent_dim, batch_size = (400, 50, 256) if sizes.dataset == "mnist" else (32, 4, 64)
    peer = PyroExampleVAE(data.data_dim, hidden, latent_dim).to(device)
    svi = SVI(peer.model, peer.guide, pyro.optim.Adam({"lr": 1e-3}), loss=Trace_ELBO())

    def peer_epoch():
        pyro.set_rng_seed(0)
        x = data.train_x
        order = torch.randperm(x.shape[0], device=x.device)
        for start in range(0, x.shape[0], batch_size):
            svi.step(torch.bernoulli(x[order[start : start + batch_size]]))
        with torch.no_grad():
            sum(svi.evaluate_loss(chunk) for chunk in data.test_x.split(2000))

    vae = VAE(data.data_dim, latent_dim, [hidden], activation="softplus").to(device)
    config = Config(dataset=data.name, epochs=1, batch_size=batch_size, activation="softplus")
    timings = interleave(
        {"pyro_vae": lambda: fit(vae, data, config), "pyro_example": peer_epoch},
        sizes.rounds,
        device,
    )
    n = data.train_x.shape[0]
    result = {"architecture": f"{data.data_dim}-{hidden}-{latent_dim} softplus", "timings": timings}
    result["batch_size"] = batch_size
    for name, t in timings.items():
        result[f"{name}_images_per_s"] = n / t["median"]
    result["fit_vs_example"] = result["pyro_vae_images_per_s"] / result["pyro_example_images_per_s"]
    return result


def matmul_ceiling(
    vae: VAE, rows: int, device, peak: float, training: bool, peak_size: int
) -> float:
    """The fraction of the peak that the matrix products of one pass of ``rows`` datapoints
    (training: forward, input and weight gradients; else the decoder's forward) reach when
    timed alone: the roofline fraction the pass would have if nothing else took time."""
    layers = [m for m in vae.decoder.modules() if isinstance(m, nn.Linear)]
    if training:
        layers = [m for m in vae.encoder.modules() if isinstance(m, nn.Linear)] + layers
    products = []
    for i, layer in enumerate(layers):
        d_in, d_out = layer.in_features, layer.out_features
        products.append(((rows, d_in), (d_in, d_out)))  # forward
        if training:
            products.append(((d_out, rows), (rows, d_in)))  # weight gradient
            if i > 0:  # the data need no gradient
                products.append(((rows, d_out), (d_out, d_in)))  # input gradient
    # The peak again, now: this machine's speed drifts over the minutes of a run.
    peak = max(peak, matmul_gflops(device, peak_size))
    flops = seconds = 0.0
    for a_shape, b_shape in products:
        a = torch.randn(a_shape, device=device)
        b = torch.randn(b_shape, device=device)
        times = []
        for _ in range(7):
            sync(device)
            start = time.perf_counter()
            for _ in range(10):
                a @ b
            sync(device)
            times.append((time.perf_counter() - start) / 10)
        flops += 2 * a_shape[0] * a_shape[1] * b_shape[1]
        seconds += statistics.median(times[1:])
    return flops / seconds / 1e9 / peak


def profile_section(data, device, sizes: Sizes, peak: float) -> dict:
    """The operators taking most of the time of 20 training steps at the largest batch and of
    one log p(x) estimate, as fractions of the profiled time."""
    from torch.profiler import ProfilerActivity, profile

    from pyro_vae.objectives import get_elbo
    from pyro_vae.train import default_optimizer

    torch.manual_seed(0)
    vae = VAE(data.data_dim, sizes.latent_dim, sizes.hidden_dims).to(device)
    optimizer = default_optimizer(vae, Config())
    loss_fn = get_elbo("trace")
    x = torch.bernoulli(data.train_x[: max(sizes.batch_sizes)])

    def steps():
        with pyro.validation_enabled(False):
            for _ in range(20):
                optimizer.zero_grad(set_to_none=True)
                loss_fn.differentiable_loss(vae.model, vae.guide, x).backward()
                optimizer.step()

    test_x = torch.bernoulli(data.test_x[:4])

    def logpx():
        with pyro.validation_enabled(False):
            estimate_log_likelihood(vae.eval().model, vae.guide, test_x, sizes.num_samples)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    result = {}
    for name, fn in (("train_step", steps), ("logpx", logpx)):
        fn()
        with profile(activities=activities) as prof:
            fn()
            sync(device)
        events = prof.key_averages()
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        total = sum(getattr(e, key) for e in events)
        top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:8]
        result[name] = [{"op": e.key, "fraction": getattr(e, key) / total} for e in top]
    from pyro_vae.estimators import default_max_elements

    draws = min(sizes.num_samples, default_max_elements(device) // data.data_dim)
    # The training step alone (no data pipeline, no test ELBO, no checks), as a fraction of the
    # peak: between the matrix products alone and a whole fit epoch.
    seconds = []
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        steps()
        sync(device)
        seconds.append(time.perf_counter() - start)
    step_flops = train_flops(vae)[0] * x.shape[0] * 20
    result["step_roofline"] = step_flops / statistics.median(seconds) / 1e9 / peak
    result["matmul_ceiling"] = {
        "train_step": matmul_ceiling(
            vae, max(sizes.batch_sizes), device, peak, True, sizes.matmul_size
        ),
        "logpx": matmul_ceiling(vae, draws, device, peak, False, sizes.matmul_size),
    }
    return result


def compile_section(data, device, sizes: Sizes, batch_size: int = 100) -> dict:
    """``fit`` with ``torch.compile``'d encoder and decoder against ``fit`` as it is: the
    seconds spent compiling (the warm-up epoch), images/s, and how far the parameters of the
    two differ after one epoch from the same weights and seed."""
    torch.manual_seed(0)
    eager = VAE(data.data_dim, sizes.latent_dim, sizes.hidden_dims).to(device)
    start_weights = copy.deepcopy(eager.state_dict())
    compiled = VAE(data.data_dim, sizes.latent_dim, sizes.hidden_dims).to(device)
    compiled.load_state_dict(start_weights)
    encoder, decoder = compiled.encoder, compiled.decoder  # the compiled modules share these
    compiled.encoder, compiled.decoder = torch.compile(encoder), torch.compile(decoder)
    config = Config(dataset=data.name, epochs=1, batch_size=batch_size)
    start = time.perf_counter()
    fit(compiled, data, config)
    compile_seconds = time.perf_counter() - start
    timings = interleave(
        {
            "eager": lambda: fit(eager, data, config),
            "compiled": lambda: fit(compiled, data, config),
        },
        sizes.rounds,
        device,
    )
    eager.load_state_dict(start_weights)
    encoder.load_state_dict(eager.encoder.state_dict())
    decoder.load_state_dict(eager.decoder.state_dict())
    fit(eager, data, config)
    fit(compiled, data, config)
    difference = max(
        (a - b).abs().max().item()
        for a, b in zip(eager.parameters(), compiled.parameters(), strict=True)
    )
    n = data.train_x.shape[0]
    return {
        "batch_size": batch_size,
        "timings": timings,
        "first_epoch_seconds": compile_seconds,
        "compiled_vs_eager": timings["eager"]["median"] / timings["compiled"]["median"],
        "eager_images_per_s": n / timings["eager"]["median"],
        "max_parameter_difference_after_one_epoch": difference,
    }


# ----------------------------------------------------------------------------- the report


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def render(results_dir: Path) -> str:
    """``RESULTS.md`` from every ``speed-*.json`` in ``results_dir``."""
    lines = [
        "# Speed: pyro_vae against hand-written PyTorch",
        "",
        "Written by `benchmarks/speed.py` (see its docstring for what each section measures);",
        "every number is the median of interleaved rounds, ratios above 1 mean pyro_vae is",
        "faster. Targets are those of issue 11; a miss is marked **missed**.",
    ]
    for path in sorted(results_dir.glob("speed-*.json")):
        report = json.loads(path.read_text())
        lines += _render_report(report)
    if not (results_dir / "speed-cuda.json").is_file():
        lines += [
            "",
            "## cuda",
            "",
            "Not measured yet: no GPU was available where these results were made. On a",
            "machine with one, `python benchmarks/speed.py --data-dir DATA --device cuda` adds",
            "this section.",
        ]
    return "\n".join(lines) + "\n"


def _mark(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _render_report(r: dict) -> list[str]:
    m = r["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['threads']} threads"
    out = [
        "",
        f"## {r['device']}: {where}",
        "",
        f"torch {m['torch']}, pyro {m['pyro']}, Python {m['python']}. Each section was run by",
        "the command below it, which also measured the large-matmul peak (float32, "
        f"{r['sizes']['matmul_size']}^2) that its roofline fractions divide by:",
        "",
    ]
    for name, c in r["commands"].items():
        out.append(
            f"- {name} ({c['date']}, peak {c['matmul_gflops']:.0f} GFLOP/s): `{c['command']}`"
        )
    if "train" in r:
        out += _render_train(r)
    if "objectives" in r:
        out += _render_objectives(r)
    if "peer" in r:
        p = r["peer"]
        out += [
            "",
            f"### Peer: Pyro's examples/vae ({p['architecture']}, batch {p['batch_size']})",
            "",
            "| contender | images/s |",
            "|---|---|",
            f"| `fit` | {p['pyro_vae_images_per_s']:.0f} |",
            f"| `SVI.step` + `pyro.optim.Adam`, the example's model | "
            f"{p['pyro_example_images_per_s']:.0f} |",
            "",
            f"`fit` / example: **{p['fit_vs_example']:.2f}**",
        ]
    if "logpx" in r:
        out += _render_logpx(r)
    if "evaluate" in r:
        e = r["evaluate"]
        minutes = e["seconds"] / 60
        ok = minutes <= TARGETS["evaluate_minutes"] or e["num_datapoints"] < 10000
        out += [
            "",
            "### Full evaluation",
            "",
            f"`{e['command']}` over {e['num_datapoints']} images"
            + (" (model trained for one epoch by the script)" if e["trained_here"] else "")
            + f": **{minutes:.1f} min** (target {TARGETS['evaluate_minutes']:.0f} min: "
            f"{_mark(ok)}), peak memory {e['peak_mb']:.0f} MB; by part: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in e["seconds_by_part"].items()),
        ]
    if "compile" in r:
        c = r["compile"]
        out += [
            "",
            f"### `torch.compile` of encoder and decoder (batch {c['batch_size']}, one epoch)",
            "",
            f"compiled / eager images/s: **{c['compiled_vs_eager']:.2f}**; the first "
            f"(compiling) epoch took {c['first_epoch_seconds']:.0f} s; parameters after one "
            f"epoch from the same weights and seed differ by up to "
            f"{c['max_parameter_difference_after_one_epoch']:.1e}.",
        ]
    out += _render_misses(r)
    if "profile" in r:
        out += ["", "### Where the time goes (share of profiled operator time)", ""]
        ceiling = r["profile"]["matmul_ceiling"]
        for name in ("train_step", "logpx"):
            top = r["profile"][name]
            ops = ", ".join(f"`{t['op']}` {100 * t['fraction']:.0f}%" for t in top)
            out.append(f"- {name.replace('_', ' ')}: {ops}")
        out += [
            "",
            "The matrix products of a pass, timed alone at its shapes, reach "
            f"{100 * ceiling['train_step']:.0f}% of the peak for a training step at batch "
            f"{max(r['sizes']['batch_sizes'])} and {100 * ceiling['logpx']:.0f}% for a log p(x) "
            "pass: the roofline fraction each would reach if nothing but its matrix products "
            f"took time. The training step alone (Pyro's loss, backward, fused Adam; no data "
            f"pipeline, test ELBO or checks) reaches {100 * r['profile']['step_roofline']:.0f}%.",
        ]
    return out


def _render_objectives(r: dict) -> list[str]:
    out = [
        "",
        f"### The importance-weighted and path-derivative objectives (batch "
        f"{r['objectives'][0]['batch_size']}; the hand-written versions in `PlainVAE`)",
        "",
        "| ELBO | K | `fit` images/s | plain images/s | plain + fused Adam images/s | "
        "fit / plain | fit / plain fused | roofline fit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["objectives"]:
        out.append(
            f"| {row['elbo']} | {row['num_particles']} | {row['pyro_vae_images_per_s']:.0f} | "
            f"{row['plain_images_per_s']:.0f} | {row['plain_fused_images_per_s']:.0f} | "
            f"**{row['fit_vs_plain']:.2f}** | {row['fit_vs_plain_fused']:.2f} | "
            f"{100 * row['pyro_vae_roofline']:.0f}% |"
        )
    return out


def _render_misses(r: dict) -> list[str]:
    """One line per missed target, with the numbers of this report that explain it."""
    lines = []
    for row in r.get("train", []):
        if row["elbo"] == "trace" and row["fit_vs_plain"] < TARGETS["fit_vs_plain"]:
            t = row["timings"]
            lines.append(
                f"- `fit` / plain at batch {row['batch_size']}: {row['fit_vs_plain']:.2f}. The "
                f"rounds took {t['pyro_vae']['min']:.2f}-{t['pyro_vae']['max']:.2f} s (`fit`) and "
                f"{t['plain']['min']:.2f}-{t['plain']['max']:.2f} s (plain): the two overlap. "
                "Pyro's per-step cost (tracing, parameter registration, per-datapoint "
                "log-densities) about cancels what fused Adam saves at this batch size."
            )
    big = [row for row in r.get("train", []) if row["elbo"] == "trace"]
    profile = r.get("profile")
    if big and profile and big[-1]["pyro_vae_roofline"] < TARGETS["train_roofline_512"]:
        lines.append(
            f"- Roofline at batch {big[-1]['batch_size']}: the `fit` epoch reaches "
            f"{100 * big[-1]['pyro_vae_roofline']:.0f}% (the hand-written loop "
            f"{100 * big[-1]['plain_roofline']:.0f}%), the training step alone "
            f"{100 * profile['step_roofline']:.0f}% and its matrix products alone "
            f"{100 * profile['matmul_ceiling']['train_step']:.0f}%. The loss between the step and "
            "the epoch is the same for both loops, so it lies around the step: the bare steps "
            "reuse one batch already in cache, while an epoch gathers and binarizes a fresh "
            "batch per step and ends with the test ELBO (this split was not timed on an idle "
            "machine)."
        )
    logpx = r.get("logpx")
    if logpx and profile and logpx["pyro_vae_roofline"] < TARGETS["logpx_roofline"]:
        softplus = sum(t["fraction"] for t in profile["logpx"] if "softplus" in t["op"])
        lines.append(
            f"- log p(x) roofline: {100 * logpx['pyro_vae_roofline']:.0f}% against "
            f"{100 * TARGETS['logpx_roofline']:.0f}%. The decoder's matrix products alone reach "
            f"{100 * profile['matmul_ceiling']['logpx']:.0f}% at the pass's shapes; the "
            f"softplus over the 784 logits of every draw takes {100 * softplus:.0f}% of the "
            "operator time, and the activations, the Gaussian log-densities and Pyro's tracing "
            "most of the rest."
        )
    e = r.get("evaluate")
    if e and e["num_datapoints"] >= 10000 and e["seconds"] / 60 > TARGETS["evaluate_minutes"]:
        per_image = 1e3 * e["seconds_by_part"]["log_likelihood"] / e["num_datapoints"]
        line = f"- Full evaluation: {e['seconds'] / 60:.1f} min, {per_image:.0f} ms per image "
        if logpx:
            fresh = 1e3 * logpx["num_samples"] / logpx["pyro_vae_samples_per_s"]
            line += (
                f"for log p(x), against {fresh:.0f} ms per image in the "
                "log p(x) section above (the same estimator and model size, run in the same "
                "session): the speed of this shared machine drifts by that much over minutes."
            )
        lines.append(line)
    return ["", "### Targets missed, and why", ""] + lines if lines else []


def _render_train(r: dict) -> list[str]:
    sizes = r["sizes"]
    out = [
        "",
        f"### Training: one `fit` epoch against the hand-written loop ({sizes['train_images']} "
        f"training and {sizes['test_images']} test images of {sizes['dataset']}, "
        f"{r['data_dim']}-{'-'.join(map(str, sizes['hidden_dims']))}-{sizes['latent_dim']} "
        "ReLU)",
        "",
        "| batch | ELBO | `fit` images/s | plain images/s | plain + fused Adam images/s | "
        "fit / plain | fit / plain fused | roofline fit | roofline plain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["train"]:
        target = row["fit_vs_plain"] >= TARGETS["fit_vs_plain"] or row["elbo"] != "trace"
        out.append(
            f"| {row['batch_size']} | {row['elbo']} | {row['pyro_vae_images_per_s']:.0f} | "
            f"{row['plain_images_per_s']:.0f} | {row['plain_fused_images_per_s']:.0f} | "
            f"**{row['fit_vs_plain']:.2f}**{'' if target else ' (missed)'} | "
            f"{row['fit_vs_plain_fused']:.2f} | {100 * row['pyro_vae_roofline']:.0f}% | "
            f"{100 * row['plain_roofline']:.0f}% |"
        )
    big = [row for row in r["train"] if row["batch_size"] == 512 and row["elbo"] == "trace"]
    if big:
        ok = big[0]["pyro_vae_roofline"] >= TARGETS["train_roofline_512"]
        out += [
            "",
            f"Targets: `fit` / plain >= {TARGETS['fit_vs_plain']:.1f} for `trace` at every "
            f"batch; roofline at batch 512 >= {100 * TARGETS['train_roofline_512']:.0f}%: "
            f"{100 * big[0]['pyro_vae_roofline']:.0f}% ({_mark(ok)}).",
        ]
    return out


def _render_logpx(r: dict) -> list[str]:
    p = r["logpx"]
    ok = p["pyro_vae_roofline"] >= TARGETS["logpx_roofline"]
    ok_mb = p["pyro_vae_peak_mb"] < TARGETS["logpx_peak_mb"]
    return [
        "",
        f"### log p(x): K = {p['num_samples']} importance samples, {p['images']} test images",
        "",
        "| contender | samples x images / s | roofline (decoder FLOPs) |",
        "|---|---|---|",
        f"| `estimate_log_likelihood` (validation off, as `evaluate` runs it) | "
        f"{p['pyro_vae_samples_per_s']:.3g} | "
        f"{100 * p['pyro_vae_roofline']:.0f}% |",
        f"| hand-written IWAE | {p['plain_samples_per_s']:.3g} | "
        f"{100 * p['plain_roofline']:.0f}% |",
        "",
        f"pyro_vae / hand-written: **{p['pyro_vae_vs_plain']:.2f}**; roofline target "
        f"{100 * TARGETS['logpx_roofline']:.0f}%: {_mark(ok)}; peak memory of a process doing "
        f"only this: {p['pyro_vae_peak_mb']:.0f} MB (target < {TARGETS['logpx_peak_mb']} MB: "
        f"{_mark(ok_mb)}).",
    ]


# ----------------------------------------------------------------------------- main


def _shared_args(args) -> list[str]:
    shared = ["--device", args.device]
    if args.data_dir is not None:
        shared += ["--data-dir", args.data_dir]
    return shared + (["--tiny"] if args.tiny else [])


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, capture_output=True, text=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, of {SECTIONS}"
    )
    parser.add_argument("--evaluate-run", default=None, help="a trained MNIST run to evaluate")
    parser.add_argument("--tiny", action="store_true", help="a few digits images, seconds")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON")
    parser.add_argument("--results-md", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--probe-logpx", choices=("timings", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--probe-cli", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    sizes = TINY if args.tiny else Sizes()
    if args.probe_cli is not None:
        return probe_cli(args.probe_cli)
    if args.probe_logpx is not None:
        return probe_logpx(args, sizes, args.probe_logpx)
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS + EXTRA_SECTIONS))
    if unknown:
        raise SystemExit(
            f"speed.py: error: unknown section {unknown[0]!r}; choose from "
            f"{list(SECTIONS + EXTRA_SECTIONS)}"
        )
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise SystemExit(f"speed.py: error: {e}") from None
    data = load_dataset(sizes.dataset, args.data_dir, binarize="dynamic", device=device)
    data = dataclasses.replace(
        data,
        train_x=data.train_x[: sizes.train_images],
        train_y=data.train_y[: sizes.train_images],
        test_x=data.test_x[: sizes.test_images],
        test_y=data.test_y[: sizes.test_images],
    )
    if device.type == "cuda" and not args.tiny:
        sizes = dataclasses.replace(sizes, matmul_size=8192)  # 2048^2 is too small for a GPU
    out = Path(args.out)
    path = out / f"speed-{device.type}.json"
    # Sections run separately are merged into one report per device.
    report = json.loads(path.read_text()) if path.is_file() else {"commands": {}}
    report.update(
        device=device.type,
        machine=machine(device),
        data_dim=data.data_dim,
        sizes=dataclasses.asdict(sizes),
    )
    command = "python benchmarks/speed.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    peak = matmul_gflops(device, sizes.matmul_size)
    runners = {
        "train": lambda: train_section(data, device, sizes, peak),
        "objectives": lambda: objectives_section(data, device, sizes, peak, sizes.batch_sizes[1]),
        "peer": lambda: peer_section(data, device, sizes),
        "logpx": lambda: logpx_section(args, peak),
        "profile": lambda: profile_section(data, device, sizes, peak),
        "evaluate": lambda: evaluate_section(device, sizes, args),
        "compile": lambda: compile_section(data, device, sizes),
    }
    for name in sections:
        report[name] = runners[name]()
        report["commands"][name] = {
            "command": command,
            "date": datetime.date.today().isoformat(),
            "matmul_gflops": peak,
        }
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    Path(args.results_md).write_text(render(out))
    print(render(out))


if __name__ == "__main__":
    main()
