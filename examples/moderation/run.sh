#!/usr/bin/env bash
# The toxicity-safety example from start to end: fine-tune a small moderation classifier (ok / toxic) from the
# demo checkpoint on a made-up data set, evaluate it, serve the demo model behind it, and show blocked and
# allowed exchanges over HTTP.
#
#   examples/moderation/run.sh                  # from the repository root, after `make demo` (or BASE=...)
#   STEPS=120 OUT=runs/moderation-long examples/moderation/run.sh
#
# GPTFORGE is the command to run (default: gptforge, e.g. after `source .venv/bin/activate`); PYTHON runs
# the few lines that read the JSON answers (default: python3).
set -euo pipefail

EX=examples/moderation
GPTFORGE=${GPTFORGE:-gptforge}
PYTHON=${PYTHON:-python3}
BASE=${BASE:-runs/demo}            # the model the classifier is fine-tuned from, and the model served
OUT=${OUT:-runs/moderation}        # everything this script writes
STEPS=${STEPS:-60}                 # fine-tuning steps (the data is easy: validation accuracy is 1.0 by step 30)
PORT=${PORT:-8765}
THRESHOLD=${THRESHOLD:-0.5}

[ -f "$EX/train.jsonl" ] || { echo "run this from the repository root: examples/moderation/run.sh" >&2; exit 2; }
[ -d "$BASE" ] || { echo "no $BASE: train the demo model first (make demo) or set BASE" >&2; exit 2; }
mkdir -p "$OUT"
start=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - start )) s)"; }

if [ -d "$OUT/classifier/best" ] && [ -z "${RETRAIN:-}" ]; then
  echo "$OUT/classifier/best exists: skipping steps 1-2 (RETRAIN=1 redoes them)"
else
step "1. fine-tune the moderation classifier ($STEPS steps)"
$GPTFORGE finetune --task classify --checkpoint "$BASE" --train "$EX/train.jsonl" --val "$EX/val.jsonl" \
  --out "$OUT/classifier" --max_steps="$STEPS" --batch_size=16 --learning_rate=1e-3 --eval_interval=30 \
  --checkpoint_interval="$STEPS" --overwrite=true --quiet

step "2. evaluate it: the test split (same templates, new fillings) and hand-written held-out phrasings"
$GPTFORGE evaluate --checkpoint "$OUT/classifier" --data "$EX/test.jsonl" --json "$OUT/test.json"
$GPTFORGE evaluate --checkpoint "$OUT/classifier" --data "$EX/heldout.jsonl" --json "$OUT/heldout.json"
$GPTFORGE classify --checkpoint "$OUT/classifier" --text "you are an idiot" --text "thanks, that fixed it" \
  --text "Thou art a fool" --text "I will find you"
fi

step "3. serve $BASE behind the classifier (block toxic at p >= $THRESHOLD)"
$GPTFORGE serve --checkpoint "$BASE" --port "$PORT" --quiet --moderation "$OUT/classifier" --block toxic \
  --threshold "$THRESHOLD" --moderation-refusal "Let's keep this conversation kind." &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
URL="http://127.0.0.1:$PORT/v1"
show() {  # the answer's text, finish_reason and moderation field, one line each choice
  $PYTHON -c '
import json, sys
body = json.load(sys.stdin)
for c in body["choices"]:
    text = c["message"]["content"] if "message" in c else c["text"]
    print("  [%d] finish_reason=%s moderation=%s" % (c["index"], c["finish_reason"], json.dumps(c.get("moderation"))))
    print("      " + json.dumps(text))'
}
chat() {
  echo "user: $1"
  curl -s "$URL/chat/completions" -H 'Content-Type: application/json' -d "$($PYTHON -c '
import json, sys
print(json.dumps({"model": "demo", "messages": [{"role": "user", "content": sys.argv[1]}], "max_tokens": 40,
                  "temperature": 0.8, "seed": 1}))' "$1")" | show
}

step "4a. input blocked: the model never runs"
chat "you are an idiot and I will find you"
step "4b. allowed: the demo model's own (Shakespearean) reply"
chat "Good morrow, could you help me with my order?"
step "4c. output blocked: the demo model rarely says anything rude, so sample until the screen cuts a reply"
found=0
for seed in $(seq 1 30); do
  body=$(curl -s "$URL/completions" -H 'Content-Type: application/json' \
    -d "{\"model\": \"demo\", \"prompt\": \"KING:\\nThou art a\", \"max_tokens\": 60, \"temperature\": 1.0, \"n\": 4, \"seed\": $seed}")
  if echo "$body" | grep -q '"content_filter"'; then
    echo "prompt \"KING:\\nThou art a\", seed $seed (4 samples):"; echo "$body" | show; found=1; break
  fi
done
[ "$found" = 1 ] || echo "no sample of seeds 1-30 was blocked (try THRESHOLD=0.3)"
step "4d. the same, streamed: only cleared text is sent, then finish_reason content_filter"
[ "$found" = 1 ] && curl -sN "$URL/completions" -H 'Content-Type: application/json' \
  -d "{\"model\": \"demo\", \"prompt\": \"KING:\\nThou art a\", \"max_tokens\": 60, \"temperature\": 1.0, \"n\": 4, \"seed\": $seed, \"stream\": true}" \
  | grep -E 'content_filter|DONE' | cut -c1-220

step "5. /metrics: blocks by side and label"
curl -s "http://127.0.0.1:$PORT/metrics" | grep '^gptforge_moderation'
step "done"
