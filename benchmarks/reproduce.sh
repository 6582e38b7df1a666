#!/usr/bin/env bash
# README's "Published results, reproduced": one run per row of the table below (run folders
# runs/reproduce-ROW), trained with `pyro-vae train --recipe`, evaluated with K=5000 importance
# samples over the 10,000 test images; their config, metrics and evaluation are copied to
# benchmarks/results/reproduce-ROW/, from which benchmarks/reproduce_table.py renders the table
# benchmarks/results/reproduce.md and reproduce_curves.png (every row run so far).
#
#   bash benchmarks/reproduce.sh ../shared/data [ROW ...]     # every row, or the rows named
#
# The full protocols take days on a CPU (iwae-paper: 3,280 epochs at K=50); on a GPU, hours.
# EPOCHS=N caps every run at N epochs, a budget: the table labels such a run "stopped by the
# budget" with its learning curve. A run folder that exists is continued (--resume), so the
# script can be run again with a larger EPOCHS. LIMIT=N evaluates the first N test images only
# (labelled so). DEVICE=cuda trains on a GPU.
#
# TINY=1 runs two rows on a tiny digits model in a minute, under $OUT (default: a temporary
# folder), so that the test suite can check the script.
set -euo pipefail
data_dir=${1:-../shared/data}
shift || true
cd "$(dirname "$0")/.."
# row name | recipe | extra flags (the papers' numbers are in benchmarks/reproduce_table.py)
rows=(
  "iwae-paper-vae|iwae-paper|--elbo trace --num-particles 1"
  "iwae-paper-k50|iwae-paper|"
  "iwae-paper-2layer-vae|iwae-paper-2layer|--elbo trace --num-particles 1"
  "iwae-paper-2layer-k50|iwae-paper-2layer|"
  "vampprior-paper|vampprior-paper|"
  "vampprior-paper-vamp|vampprior-paper-vamp|"
  "vampprior-paper-2layer|vampprior-paper-2layer|"
  "vampprior-paper-2layer-vamp|vampprior-paper-2layer-vamp|"
)
if [[ "${TINY:-0}" == 1 ]]; then
  root=${OUT:-$(mktemp -d)}
  runs="$root/runs" out="$root/results" samples=10 epochs=${EPOCHS:-1}
  tiny=(--dataset digits --latent-dim 2 --hidden-dims 8 --batch-size 300 --num-particles 2)
  tiny+=(--validation-size 100 --warmup-epochs 1)
  selected=("${@:-iwae-paper-2layer-k50 vampprior-paper-vamp}")
else
  runs=runs out=benchmarks/results samples=5000 epochs=${EPOCHS:-} tiny=()
  selected=("$@")
fi
mkdir -p "$out"
names=()
for row in "${rows[@]}"; do
  IFS='|' read -r name recipe flags <<< "$row"
  if [[ ${#selected[@]} -gt 0 && " ${selected[*]} " != *" $name "* ]]; then continue; fi
  names+=("$name")
  run="$runs/reproduce-$name"
  if [[ -f "$run/checkpoint.pt" ]]; then
    full=$(python -c "from pyro_vae.recipes import recipe_settings as r; print(r('$recipe')['epochs'])")
    pyro-vae train --resume "$run" --data-dir "$data_dir" --epochs "${epochs:-$full}"
  else
    # shellcheck disable=SC2086 # $flags holds several flags
    pyro-vae train --recipe "$recipe" --data-dir "$data_dir" $flags "${tiny[@]}" \
      ${epochs:+--epochs "$epochs"} ${DEVICE:+--device "$DEVICE"} --out "$run"
  fi
  python benchmarks/reproduce_table.py --machine "$run" ${DEVICE:+--device "$DEVICE"}
  pyro-vae evaluate "$run" --data-dir "$data_dir" --num-samples "$samples" \
    ${LIMIT:+--limit "$LIMIT"} ${DEVICE:+--device "$DEVICE"}
done
# The small files of each run (not its checkpoints) are kept beside the table, which is
# rendered from them.
for name in "${names[@]}"; do
  mkdir -p "$out/reproduce-$name"
  cp "$runs/reproduce-$name"/{config.json,metrics.csv,machine.json} "$out/reproduce-$name/"
  cp "$runs/reproduce-$name/evaluation${LIMIT:+-first$LIMIT}.json" "$out/reproduce-$name/evaluation.json"
done
python benchmarks/reproduce_table.py --out "$out" "$out"/reproduce-*/
