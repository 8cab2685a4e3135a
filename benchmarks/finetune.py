"""Full fine-tuning against LoRA on the same model and data: parameters trained, peak memory, speed, score.

    python benchmarks/finetune.py --preset small --steps 30

Builds the preset model with random weights (vocabulary 4096, a character tokenizer for the text) and a
synthetic sentiment task (texts of filler words with "good" → pos or "bad" → neg somewhere in them), then
fine-tunes it once per strategy, each in a fresh subprocess so that its peak resident memory (RSS, from
``getrusage``) is its own. Every run takes the same number of optimizer steps on the same batches.
Reports trainable parameters, the memory that training state takes by construction (weights, plus a
gradient and AdamW's two moments per trainable weight, float32), the measured peak RSS (and peak CUDA
memory on a GPU), training tokens/s, the final validation accuracy and the size of the saved best/.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FILLER = "the movie was plot actors scene very quite really story acting music long short".split()
VOCAB_SIZE = 4096
STRATEGY_LR = {"full": 3e-4, "lora": 3e-3}  # each strategy's usual range: LoRA's few weights take a larger step


def write_task(root: Path, n_train: int, n_val: int, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)

    def example() -> dict:
        label = rng.choice(["pos", "neg"])
        words = [rng.choice(FILLER) for _ in range(rng.randint(6, 12))]
        words.insert(rng.randrange(len(words) + 1), "good" if label == "pos" else "bad")
        return {"text": " ".join(words), "label": label}

    files = []
    for name, n in (("train.jsonl", n_train), ("val.jsonl", n_val)):
        path = root / name
        path.write_text("".join(json.dumps(example()) + "\n" for _ in range(n)), encoding="utf-8")
        files.append(path)
    return files[0], files[1]


def write_base(root: Path, preset: str) -> Path:
    import torch

    from gptforge.checkpoint import save_checkpoint
    from gptforge.config import ModelConfig
    from gptforge.model import GPT
    from gptforge.tokenizer import CharTokenizer

    torch.manual_seed(0)
    tok = CharTokenizer(sorted(set("".join(FILLER) + "goodbad ")))
    config = ModelConfig.from_preset(preset, vocab_size=VOCAB_SIZE, dropout=0.0)
    model = GPT(config)
    save_checkpoint(root / "base", model, tok, {"model": vars(config)})
    return root / "base"


def child(args: argparse.Namespace) -> None:
    """One fine-tuning run; prints one JSON line of figures."""
    import torch

    from gptforge.config import FinetuneConfig
    from gptforge.finetune import finetune

    config = FinetuneConfig(task="classify", checkpoint=args.base, train_file=args.train, val_file=args.val,
                            out_dir=args.out, strategy=args.strategy, max_steps=args.steps,
                            eval_interval=args.steps, batch_size=args.batch_size, learning_rate=STRATEGY_LR[args.strategy],
                            warmup_steps=max(1, args.steps // 10), dropout=0.0, evaluate_before=False,
                            device=args.device, overwrite=True).validate()
    start = time.perf_counter()
    result = finetune(config, progress=False)
    seconds = time.perf_counter() - start
    figures = {
        "strategy": args.strategy, "trainable": result.trainable_parameters, "total": result.total_parameters,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        # float32 weights + (gradient + AdamW exp_avg + exp_avg_sq) per trainable weight
        "state_mb": (result.total_parameters + 3 * result.trainable_parameters) * 4 / 2**20,
        "tokens_per_s": result.tokens_per_s, "accuracy": result.after["metrics"]["accuracy"],
        "val_loss": result.after["metrics"]["val_loss"], "seconds": seconds,
        "best_size_mb": sum(f.stat().st_size for f in result.best_checkpoint.iterdir()) / 2**20,
    }
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="model shape (random weights); default small")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-examples", type=int, default=480)
    parser.add_argument("--val-examples", type=int, default=96)
    parser.add_argument("--strategies", default="full,lora")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    parser.add_argument("--val", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = write_base(root, args.preset)
        train, val = write_task(root, args.train_examples, args.val_examples)
        print(f"preset {args.preset} (random weights, vocab {VOCAB_SIZE}), {args.train_examples} train / "
              f"{args.val_examples} val examples, {args.steps} steps of batch {args.batch_size}")
        header = f"{'strategy':<9}{'trainable':>14}{'of total':>13}{'state':>10}{'peak RSS':>11}{'peak CUDA':>11}" \
                 f"{'tokens/s':>10}{'accuracy':>10}{'val loss':>10}{'saved':>10}{'time':>8}"
        print(header)
        for strategy in args.strategies.split(","):
            cmd = [sys.executable, __file__, "--child", "1", "--strategy", strategy, "--base", str(base),
                   "--train", str(train), "--val", str(val), "--out", str(root / strategy), "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--device", args.device]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{strategy} run failed:\n{done.stderr}")
            f = json.loads(done.stdout.strip().splitlines()[-1])
            cuda = "-" if f["peak_cuda_mb"] is None else f"{f['peak_cuda_mb']:.0f} MB"
            print(f"{strategy:<9}{f['trainable']:>14,}{100 * f['trainable'] / f['total']:>12.2f}%"
                  f"{f['state_mb']:>7.0f} MB{f['peak_rss_mb']:>8.0f} MB{cuda:>11}{f['tokens_per_s']:>10,.0f}{f['accuracy']:>10.3f}"
                  f"{f['val_loss']:>10.4f}{f['best_size_mb']:>7.1f} MB{f['seconds']:>7.0f}s")


if __name__ == "__main__":
    main()
