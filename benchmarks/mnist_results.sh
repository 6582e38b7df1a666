#!/usr/bin/env bash
# The MNIST numbers quoted in README, end to end: train, evaluate (K=5000 over the 10,000 test
# images), AIS against IWAE on the first 1000 test images (evaluate --ais), the estimator study
# (pyro-vae compare), the prior and guide tables, and the importance-weighted objectives at
# K=50. Copies the result files into benchmarks/results/.
# About five and a half hours on 2 CPU cores (the two K=50 runs take about an hour each, and the study
# trains each of five objectives for 300 s). The speed figures come from benchmarks/speed.py
# (benchmarks/RESULTS.md).
#
#   bash benchmarks/mnist_results.sh ../shared/data
#
# TINY=1 runs every step on a tiny digits model in a minute, writing its runs and results under
# $OUT (default: a new temporary folder), so that the test suite can check the script.
set -euo pipefail
data_dir=${1:-../shared/data}
cd "$(dirname "$0")/.."
if [[ "${TINY:-0}" == 1 ]]; then
  root=${OUT:-$(mktemp -d)}
  runs="$root/runs"
  out="$root/results"
  train=(--dataset digits --epochs 1 --latent-dim 2 --hidden-dims 16 --batch-size 300)
  samples=10
  compare=(--draws 4 --num-points 20 --batch-size 20 --particles 1 2 --train-seconds 1 --num-samples 20)
  particles=2
  limit=20
  ais=(--num-samples 20 --ais-steps 3 10 --ais-chains 2 --bdmc-points 10)
  mixture=(--num-samples 50 --repeats 2 --out "$out")
else
  runs=runs
  out=benchmarks/results
  train=(--dataset mnist --data-dir "$data_dir" --epochs 10)
  samples=5000
  compare=(--train-seconds 300)
  particles=50
  limit=1000
  ais=()
  mixture=()
fi
mkdir -p "$out"
pyro-vae train "${train[@]}" --out "$runs/mnist"
pyro-vae evaluate "$runs/mnist" --num-samples "$samples"
pyro-vae evaluate "$runs/mnist" --ais --limit "$limit" "${ais[@]}"
cp "$runs/mnist/evaluation-first$limit.json" "$out/mnist-ais-evaluation.json"
pyro-vae compare "$runs/mnist" "${compare[@]}"
for prior in mixture vamp; do
  pyro-vae train "${train[@]}" --prior "$prior" --out "$runs/mnist-$prior"
  pyro-vae evaluate "$runs/mnist-$prior" --num-samples "$samples"
done
pyro-vae train "${train[@]}" --guide full_covariance --out "$runs/mnist-fullcov"
pyro-vae evaluate "$runs/mnist-fullcov" --num-samples "$samples"
pyro-vae train "${train[@]}" --guide iaf --out "$runs/mnist-iaf"
pyro-vae evaluate "$runs/mnist-iaf" --num-samples "$samples"
for elbo in iwae dreg; do
  pyro-vae train "${train[@]}" --elbo "$elbo" --num-particles "$particles" --out "$runs/mnist-$elbo-k50"
  pyro-vae evaluate "$runs/mnist-$elbo-k50" --num-samples "$samples"
done
for run in mnist mnist-mixture mnist-vamp mnist-fullcov mnist-iaf mnist-iwae-k50 mnist-dreg-k50; do
  cp "$runs/$run/metrics.csv" "$out/$run-metrics.csv"
  cp "$runs/$run/evaluation.json" "$out/$run-evaluation.json"
done
cp "$runs"/mnist/comparison{.json,.md,_curves.png,_snr.png} "$out/"
python benchmarks/mixture_log_prob.py "${mixture[@]}"
