#!/usr/bin/env bash
# The MNIST numbers quoted in README, end to end: train, evaluate (K=5000 over the 10,000 test
# images), compare the two ELBO estimators, and the prior and guide tables. Copies the result
# files into benchmarks/results/. About two hours on 2 CPU cores.
#
#   bash benchmarks/mnist_results.sh ../shared/data
set -euo pipefail
data_dir=${1:-../shared/data}
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
pyro-vae train --dataset mnist --data-dir "$data_dir" --epochs 10 --out runs/mnist
pyro-vae evaluate runs/mnist --num-samples 5000
pyro-vae compare runs/mnist
for prior in mixture vamp; do
  pyro-vae train --dataset mnist --data-dir "$data_dir" --epochs 10 --prior "$prior" \
    --out "runs/mnist-$prior"
  pyro-vae evaluate "runs/mnist-$prior" --num-samples 5000
done
pyro-vae train --dataset mnist --data-dir "$data_dir" --epochs 10 --guide full_covariance \
  --out runs/mnist-fullcov
pyro-vae evaluate runs/mnist-fullcov --num-samples 5000
pyro-vae train --dataset mnist --data-dir "$data_dir" --epochs 10 --guide iaf --out runs/mnist-iaf
pyro-vae evaluate runs/mnist-iaf --num-samples 5000
for run in mnist mnist-mixture mnist-vamp mnist-fullcov mnist-iaf; do
  cp "runs/$run/metrics.csv" "$out/$run-metrics.csv"
  cp "runs/$run/evaluation.json" "$out/$run-evaluation.json"
done
cp runs/mnist/comparison.json runs/mnist/comparison.md runs/mnist/comparison_curves.png "$out/"
python benchmarks/train_speed.py --data-dir "$data_dir"
python benchmarks/mixture_log_prob.py
