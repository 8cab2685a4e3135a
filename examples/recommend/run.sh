#!/usr/bin/env bash
# The recommendation example from start to end: MovieLens 100K (from RecBole's PyPI wheel) into leave-last-out
# histories, a popularity baseline, the demo model ranking every unseen movie by its log-probability after the
# user's history, fine-tuning on the training histories, the same ranking again, and the table.
#
#   examples/recommend/run.sh                   # from the repository root, after `make demo` (or it runs it)
#   STEPS=2000 OUT=runs/recommend-long examples/recommend/run.sh
#
# GPTFORGE is the command to run (default: gptforge), PYTHON the interpreter that has gptforge (default:
# python); SOURCE RecBole's wheel, "recbole" (installed) or a folder holding ml-100k.inter and ml-100k.item
# (default: an installed recbole, else `pip download --no-deps recbole==1.2.1` into $OUT/pkg).
set -euo pipefail

EX=examples/recommend
GPTFORGE=${GPTFORGE:-gptforge}
PYTHON=${PYTHON:-python}
BASE=${BASE:-runs/demo}            # the model ranked before fine-tuning, and fine-tuned
OUT=${OUT:-runs/recommend}         # everything this script writes
STEPS=${STEPS:-600}                # fine-tuning steps (batch 16: about 1.3 passes over the windows)
ITEMS=${ITEMS:-300}                # the most rated movies kept
USERS=${USERS:-300}                # users evaluated (a seeded sample of those with 20+ ratings of them)
SOURCE=${SOURCE:-}

[ -f "$EX/recommend.py" ] || { echo "run this from the repository root: examples/recommend/run.sh" >&2; exit 2; }
mkdir -p "$OUT"
start=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - start )) s)"; }
REC=("$PYTHON" "$EX/recommend.py")

if [ ! -d "$BASE" ]; then
  step "no $BASE: training the demo model first (make demo's commands)"
  $GPTFORGE prepare --corpus shakespeare --tokenizer bpe --vocab-size 4096 --out data/shakespeare
  $GPTFORGE train --config configs/demo.yaml --train.overwrite=true
fi

if [ -z "$SOURCE" ]; then
  if "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('recbole') is None)"; then
    SOURCE=recbole
  else
    SOURCE="$OUT/pkg/recbole-1.2.1-py3-none-any.whl"
    [ -f "$SOURCE" ] || "$PYTHON" -m pip download --no-deps recbole==1.2.1 -d "$OUT/pkg"
  fi
fi

step "1. prepare MovieLens 100K from $SOURCE ($ITEMS movies, $USERS users evaluated)"
"${REC[@]}" prepare --source "$SOURCE" --checkpoint "$BASE" --out "$OUT/data" --items "$ITEMS" --users "$USERS"

step "2. baselines: a random order and popularity (training counts)"
"${REC[@]}" random --data "$OUT/data" --json "$OUT/random.json"
"${REC[@]}" popularity --data "$OUT/data" --json "$OUT/popularity.json"

step "3. rank with $BASE before fine-tuning"
"${REC[@]}" rank --data "$OUT/data" --checkpoint "$BASE" --name "demo model, not fine-tuned" --json "$OUT/before.json"

step "4. fine-tune on the training histories ($STEPS steps)"
$GPTFORGE finetune --task lm --checkpoint "$BASE" --train "$OUT/data/train.jsonl" --val "$OUT/data/val.jsonl" \
  --out "$OUT/finetuned" --strategy full --max_steps="$STEPS" --batch_size=16 --learning_rate=2e-3 \
  --warmup_steps=30 --eval_interval=200 --checkpoint_interval="$STEPS" --overwrite=true --quiet

step "5. rank with the fine-tuned model"
"${REC[@]}" rank --data "$OUT/data" --checkpoint "$OUT/finetuned" --name "demo model, fine-tuned" --json "$OUT/after.json"

step "6. the figures (hit@10 and NDCG@10 of each user's held-out movie among every movie not in their history)"
"${REC[@]}" table "$OUT/random.json" "$OUT/popularity.json" "$OUT/before.json" "$OUT/after.json"
echo
echo "done in $(( $(date +%s) - start )) s; the results per user are in $OUT/*.json"
