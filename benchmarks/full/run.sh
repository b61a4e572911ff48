#!/usr/bin/env bash
# The full benchmark suite: every task x every method, 3 seeds, in two parallel parts
# (one torch thread each), merged into benchmarks/full/ with one report, the plots and
# the README's headline table. Sized for <= 30 minutes on a quiet 2-core machine:
# the tasks shortened below say so in their JSON ("epochs") and in report.md.
# Measured 2026-12-01 (commit fb7a3d9, load ~1): part A 400 s, part B 637 s, in parallel.
#
#   bash benchmarks/full/run.sh            (from the repository root, after `make install`)
#
# Environment (for trial runs only; the defaults are the real run):
#   OUT=dir            where to write (default benchmarks/full)
#   README=file        the Markdown file whose headline markers get the table
#                      (default docs/readme/bench.md; README.md is then re-synced)
#   TRIAL_EPOCHS=spec  extra --epochs items applied after the ones below, e.g. '*=1'
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/full}
README=${README:-docs/readme/bench.md}
TRIAL=${TRIAL_EPOCHS:+,$TRIAL_EPOCHS}
BENCH=.venv/bin/torchsven
export OMP_NUM_THREADS=1

# Part A: the paper's 1-D task (20 -> 10 epochs, 10k samples: the largest item; at 20
# epochs part A alone takes ~25 min), diabetes (full length), digits-ce (20 -> 10 epochs)
# and friedman1 (20 -> 5 epochs).
PART_A=(--tasks regression-1d,diabetes,digits-ce,friedman1
        --epochs "regression-1d=10,digits-ce=10,friedman1=5$TRIAL")
# Part B: digits-label (20 -> 5 epochs: its 10 rows per sample make sven-svd's generic
# backend ~0.2 s per step), the PDEs (poisson-2d 200 -> 100 steps, poisson-5d 150 -> 30,
# heat-1d 200 -> 60; sven-svd runs them on the generic backend at up to
# ~0.5 s per step) and the eleven curve-fitting problems (100 iterations each, 3 starts:
# x0, 10 x0, 100 x0; 100 -> 50 iterations).
B_TASKS=digits-label,poisson-2d,poisson-5d,heat-1d,mgh
B_EPOCHS='digits-label=5,poisson-2d=100,poisson-5d=30,heat-1d=60,mgh-*=50'
PART_B=(--tasks "$B_TASKS" --epochs "$B_EPOCHS$TRIAL")

rm -rf "$OUT/part2" "$OUT/part-a" "$OUT/part-b" "$OUT"/*.png
mkdir -p "$OUT"
echo "start $(date -u +%FT%TZ); load $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$OUT/run.log"
"$BENCH" bench --full "${PART_A[@]}" --out "$OUT/part-a" --no-progress --no-plots \
  > "$OUT/part-a.log" 2>&1 &
A=$!
"$BENCH" bench --full "${PART_B[@]}" --out "$OUT/part-b" --no-progress --no-plots \
  > "$OUT/part-b.log" 2>&1 &
B=$!
wait "$A"
wait "$B"
echo "parts done $(date -u +%FT%TZ); load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/run.log"
"$BENCH" bench report "$OUT/part-a/results.json" "$OUT/part-b/results.json" \
  --out "$OUT" --json "$OUT/results.json" --readme "$README"
if [ "$README" = docs/readme/bench.md ]; then
  .venv/bin/python tools/sync_readme.py
fi
echo "done $(date -u +%FT%TZ)" | tee -a "$OUT/run.log"
