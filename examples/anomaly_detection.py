"""Anomaly detection with a VAE: digits of classes never seen in training get a low log p(x).

A VAE is trained only on some digit classes (by default 0-4). Every test digit is then scored
by its importance-weighted log p(x) (``pyro_vae.estimators.estimate_log_likelihood``), and
-log p(x) is used as an anomaly score for telling the held-out classes from the training ones;
the ROC AUC (``sklearn.metrics.roc_auc_score``) measures how well it separates them (0.5 is
chance, 1 is perfect). The per-class mean log p(x) shows which unseen digits look familiar.

Run::

    python examples/anomaly_detection.py
    python examples/anomaly_detection.py --normal-classes 1 7 --epochs 100
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import pyro
import torch
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from pyro_vae import VAE, Config, fit, load_dataset
from pyro_vae.estimators import estimate_log_likelihood


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--normal-classes", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--latent-dim", type=int, default=8)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--num-samples", type=int, default=100, help="K for log p(x)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for figures (default: temp)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="pyro_vae_anomaly_detection_"))
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset("digits", binarize="dynamic")
    normal_classes = torch.tensor(args.normal_classes)
    in_train = torch.isin(data.train_y, normal_classes)
    in_test = torch.isin(data.test_y, normal_classes)
    # Train (and monitor the test ELBO) on the normal classes only.
    normal_data = dataclasses.replace(
        data,
        train_x=data.train_x[in_train],
        train_y=data.train_y[in_train],
        test_x=data.test_x[in_test],
        test_y=data.test_y[in_test],
    )
    vae = VAE(64, args.latent_dim, (args.hidden_dim,))
    fit(vae, normal_data, Config(epochs=args.epochs, batch_size=100, lr=3e-3, seed=args.seed))
    vae.eval()

    pyro.set_rng_seed(args.seed)
    log_px = estimate_log_likelihood(vae.model, vae.guide, data.test_x, args.num_samples)
    is_anomaly = (~in_test).numpy()
    score = (-log_px).numpy()  # higher = more anomalous
    auc = roc_auc_score(is_anomaly, score)
    print(f"trained on digits {args.normal_classes}; {int(in_train.sum())} training images")
    print(f"mean log p(x) on test digits, K={args.num_samples}:")
    for c in range(10):
        kind = "seen" if c in args.normal_classes else "held out"
        print(f"  digit {c} ({kind:>8}): {log_px[data.test_y == c].mean().item():8.2f} nats")
    print(f"ROC AUC of -log p(x) for held-out vs seen classes: {auc:.3f}")

    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax_hist, ax_roc = fig.subplots(1, 2)
    bins = torch.linspace(log_px.min().item(), log_px.max().item(), 30).numpy()
    ax_hist.hist(log_px[in_test].numpy(), bins=bins, alpha=0.6, label="seen classes")
    ax_hist.hist(log_px[~in_test].numpy(), bins=bins, alpha=0.6, label="held-out classes")
    ax_hist.set_xlabel("log p(x) (nats)")
    ax_hist.legend()
    fpr, tpr, _ = roc_curve(is_anomaly, score)
    ax_roc.plot(fpr, tpr, label=f"AUC {auc:.3f}")
    ax_roc.plot([0, 1], [0, 1], "k--", lw=1)
    ax_roc.set_xlabel("false positive rate")
    ax_roc.set_ylabel("true positive rate")
    ax_roc.legend()
    fig.savefig(out / "anomaly_scores.png", dpi=100)
    print(f"figure: {out / 'anomaly_scores.png'}")


if __name__ == "__main__":
    main()
