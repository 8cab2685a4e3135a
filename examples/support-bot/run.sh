#!/usr/bin/env bash
# The support-bot example from start to end: index the docs, fine-tune a grounded model and a memorising
# baseline from the demo checkpoint, evaluate both on held-out paraphrased questions and on questions about
# documents added to the index after fine-tuning, print a table, and show how to serve the grounded bot.
#
#   examples/support-bot/run.sh                 # from the repository root, after `make demo` (or it runs it)
#   STEPS=4000 OUT=runs/support-bot-long examples/support-bot/run.sh
#   PARALLEL=1 OMP_NUM_THREADS=1 examples/support-bot/run.sh   # both fine-tunes at once, one thread each
#
# The grounded model's training file, train-grounded.jsonl, is checked in; make_training.py (seeded) writes
# it from faq.jsonl and docs/, and tests/examples/test_support_bot.py checks the two agree.
# GPTFORGE is the command to run (default: gptforge, e.g. after `source .venv/bin/activate`).
set -euo pipefail

EX=examples/support-bot
GPTFORGE=${GPTFORGE:-gptforge}
BASE=${BASE:-runs/demo}          # the model both bots are fine-tuned from
OUT=${OUT:-runs/support-bot}     # everything this script writes
STEPS=${STEPS:-2000}             # fine-tuning steps of each model
PARALLEL=${PARALLEL:-0}          # 1: fine-tune the two models at the same time (on a machine with 2+ cores)
ANSWER_TOKENS=16                 # answers are short; the rest of the 128-token context is the passages'
PASSAGES=1                       # one passage and the question fill the demo model's context

[ -d "$EX/docs" ] || { echo "run this from the repository root: examples/support-bot/run.sh" >&2; exit 2; }
mkdir -p "$OUT"
start=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - start )) s)"; }

if [ ! -d "$BASE" ]; then
  step "no $BASE: training the demo model first (make demo's commands)"
  $GPTFORGE prepare --corpus shakespeare --tokenizer bpe --vocab-size 4096 --out data/shakespeare
  $GPTFORGE train --config configs/demo.yaml --train.overwrite=true
fi

step "1. index the documents (passages counted with the model's tokenizer)"
rm -rf "$OUT/kb"
$GPTFORGE index --docs "$EX/docs" --out "$OUT/kb" --checkpoint "$BASE"
$GPTFORGE index --query "how much is a day pass" "$OUT/kb" -k 2

step "2. retrieval on the held-out paraphrases"
$GPTFORGE evaluate --task retrieval --knowledge "$OUT/kb" --data "$EX/qa.jsonl" --json "$OUT/retrieval.json"

# Both models see the same FAQ questions for the same number of steps with the same settings; the grounded
# one also sees the passage that answers each question, in the chat template's context slot, plus copies
# whose passage states another answer and reading exercises on made-up passages (make_training.py), so that
# it learns to copy from the passage rather than to memorise.
# Each is validated on its own training file: held-out questions are for step 6.
FT=(--task lm --checkpoint "$BASE" --strategy full --max_steps="$STEPS" --batch_size=8 --learning_rate=2e-3
    --warmup_steps=20 --eval_interval="$STEPS" --checkpoint_interval="$STEPS" --overwrite=true --quiet)
grounded() { $GPTFORGE finetune "${FT[@]}" --train "$EX/train-grounded.jsonl" --val "$EX/train-grounded.jsonl" --out "$OUT/grounded"; }
memorise() { $GPTFORGE finetune "${FT[@]}" --train "$EX/train-memorise.jsonl" --val "$EX/train-memorise.jsonl" --out "$OUT/memorise"; }
if [ "$PARALLEL" = 1 ]; then
  step "3-4. fine-tune the grounded model and the memorising baseline (FAQ alone) side by side ($STEPS steps each)"
  grounded & g=$!
  memorise & m=$!
  wait $g; wait $m
else
  step "3. fine-tune the grounded model ($STEPS steps)"
  grounded
  step "4. fine-tune the memorising baseline on the FAQ alone ($STEPS steps)"
  memorise
fi

step "5. add documents written after fine-tuning to the index"
$GPTFORGE index --add --docs "$EX/docs-added" --out "$OUT/kb"
$GPTFORGE evaluate --task retrieval --knowledge "$OUT/kb" --data "$EX/qa-added.jsonl" --json "$OUT/retrieval-added.json"

step "6. evaluate both models on the paraphrases and on the new documents' questions"
for data in qa qa-added; do
  $GPTFORGE evaluate --task grounded --checkpoint "$OUT/grounded" --knowledge "$OUT/kb" --passages $PASSAGES \
    --data "$EX/$data.jsonl" --max-new-tokens $ANSWER_TOKENS --json "$OUT/grounded-$data.json"
  $GPTFORGE evaluate --task grounded --checkpoint "$OUT/memorise" --data "$EX/$data.jsonl" \
    --max-new-tokens $ANSWER_TOKENS --json "$OUT/memorise-$data.json"
done

step "7. the figures"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def load(name):
    with open(f"{out}/{name}.json") as f:
        return json.load(f)
for name, what in (("retrieval", "the paraphrases"), ("retrieval-added", "the added documents' questions")):
    r = load(name)["metrics"]
    print(f"retrieval on {what}: recall@1 {r['recall@1']:.3f}  recall@5 {r['recall@5']:.3f}  "
          f"recall@10 {r['recall@10']:.3f}  MRR {r['mrr']:.3f}")
print()
print(f"{'questions':<34} {'model':<28} {'exact match':>11} {'token F1':>9} {'source hit':>10}")
for data, what in (("qa", "paraphrased FAQ questions"), ("qa-added", "documents added after tuning")):
    for model, name in (("grounded", "grounded (retrieval)"), ("memorise", "memorising (FAQ only)")):
        res = load(f"{model}-{data}")
        m, n = res["metrics"], res["report"]["questions"]
        hit = "-" if m["source_hit"] is None else f"{m['source_hit']:.3f}"
        print(f"{what + f' ({n})':<34} {name:<28} {m['exact_match']:>11.3f} {m['f1']:>9.3f} {hit:>10}")
PY

step "done; serve the grounded bot (sources in every reply) with"
echo "  $GPTFORGE serve --checkpoint $OUT/grounded --knowledge $OUT/kb --passages $PASSAGES"
echo "  $GPTFORGE chat --checkpoint $OUT/grounded --knowledge $OUT/kb --passages $PASSAGES --max-new-tokens $ANSWER_TOKENS --temperature 0"
