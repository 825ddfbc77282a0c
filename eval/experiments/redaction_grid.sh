#!/usr/bin/env bash
# Issue 4 validation grid for one attacker strategy: budget 2000 first (the target), then 4000, then the rest.
# Cells resume from eval/results/redaction-$1/runs/*/cell.json, so each pass only adds what is missing; the
# cells and cached student scores are committed as they land (harvests, checkpoints and trainer state are not).
# Usage: bash eval/experiments/redaction_grid.sh naive; bash eval/experiments/redaction_grid.sh decompose
# Then: distill-guard report eval/results/redaction-naive eval/results/redaction-decompose --out eval/results/redaction
set -x
D="--defense full --defense answer-only --defense sealed --defense summary --defense truncate:4 --defense truncate:8"
for budgets in 2000 2000,4000 500,1000,2000,4000; do
  OMP_NUM_THREADS=1 .venv/bin/distill-guard leakage $D --strategy $1 --budgets $budgets --seeds 3 --out eval/results/redaction-$1
done
