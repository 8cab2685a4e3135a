#!/usr/bin/env bash
# EleutherAI's lm-evaluation-harness scores a running `gptforge serve` through its local-completions model
# on gptforge_mc.yaml (60 questions in mc.jsonl, read from disk: nothing is fetched from the hub), then
# `gptforge evaluate --task choice` scores the same file in-process; the two accuracies are printed together.
#
#   bash examples/lm-eval/run.sh [CHECKPOINT]          # default runs/demo (make demo trains it)
#
# Needs lm_eval (`pip install lm_eval==0.4.13 transformers`, best in a venv of its own) on PATH or in $LM_EVAL;
# $GPTFORGE is the gptforge command (default: gptforge), $PORT the port to serve on (default 8765).
set -euo pipefail
cd "$(dirname "$0")/../.."
CHECKPOINT=${1:-runs/demo}
PORT=${PORT:-8765}
GPTFORGE=${GPTFORGE:-gptforge}
LM_EVAL=${LM_EVAL:-lm_eval}
OUT=$(mktemp -d)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # all local: fail rather than download

# lm-eval counts context tokens with a Hugging Face tokenizer: the checkpoint's own, exported.
$GPTFORGE convert --to-hf "$CHECKPOINT" --out "$OUT/hf" >/dev/null
$GPTFORGE serve --checkpoint "$CHECKPOINT" --port "$PORT" --model-name demo >"$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; rm -rf "$OUT"' EXIT
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    kill -0 "$SERVER" 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }
    sleep 1
done

# max_length: the model's context (lm-eval keeps one position for the token it asks the server to generate).
$LM_EVAL --model local-completions \
    --model_args "model=demo,base_url=http://127.0.0.1:$PORT/v1/completions,tokenizer_backend=huggingface,tokenizer=$OUT/hf,max_length=128,num_concurrent=1,max_retries=1" \
    --tasks gptforge_mc --include_path examples/lm-eval --output_path "$OUT/results" >"$OUT/lm_eval.log" 2>&1 \
    || { cat "$OUT/lm_eval.log"; exit 1; }
python3 - "$OUT/results" <<'PY'
import json, sys
from pathlib import Path
result = json.loads(sorted(Path(sys.argv[1]).rglob("results_*.json"))[-1].read_text())["results"]["gptforge_mc"]
print(f"lm-eval (local-completions via gptforge serve): acc {result['acc,none']:.4f}  acc_norm {result['acc_norm,none']:.4f}")
PY
echo "gptforge evaluate --task choice:"
$GPTFORGE evaluate --task choice --checkpoint "$CHECKPOINT" --data examples/lm-eval/mc.jsonl
