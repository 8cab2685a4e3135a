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
[ -d "$CHECKPOINT" ] || { echo "error: no checkpoint $CHECKPOINT (make demo trains runs/demo)" >&2; exit 2; }
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
    --tasks gptforge_mc --include_path examples/lm-eval --output_path "$OUT/results" --log_samples \
    >"$OUT/lm_eval.log" 2>&1 || { cat "$OUT/lm_eval.log"; exit 1; }
$GPTFORGE evaluate --task choice --checkpoint "$CHECKPOINT" --data examples/lm-eval/mc.jsonl --json "$OUT/choice.json" \
    >/dev/null 2>&1

python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
result = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())["results"]["gptforge_mc"]
samples = sorted((json.loads(line) for line in sorted(out.rglob("samples_gptforge_mc_*.jsonl"))[-1].open()),
                 key=lambda s: s["doc_id"])
ours = json.loads((out / "choice.json").read_text())["report"]
print(f"lm-eval, local-completions against gptforge serve: acc {result['acc,none']:.4f}  acc_norm {result['acc_norm,none']:.4f}")
print(f"gptforge evaluate --task choice (in-process):      acc {ours['acc']:.4f}  acc_norm {ours['acc_norm']:.4f}")
theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]  # ["logprob", "is_greedy"] as text
mine = [p["logprobs"] for p in ours["predictions"]]
diff = max(abs(a - b) for t, m in zip(theirs, mine) for a, b in zip(t, m))
same = sum(max(range(len(t)), key=t.__getitem__) == p["predicted"] for t, p in zip(theirs, ours["predictions"]))
print(f"per question: the same choice on {same}/{len(mine)}; largest log-probability difference {diff:.2e}")
PY
