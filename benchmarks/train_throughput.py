"""Training throughput of a preset model on random tokens, against the machine's own matmul speed.

    python benchmarks/train_throughput.py --preset tiny --steps 20 --batch-size 16

Times full optimizer steps (forward, backward, clipping, AdamW) after a few warmup steps, then
reports tokens/s and the achieved FLOP rate (``model.flops_per_token``: 6N + attention), next to
the FLOP rate of a large matmul measured in the same process, so "fraction of peak" compares like
with like on any machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from gptforge.config import MODEL_PRESETS, ModelConfig, TrainConfig
from gptforge.evaluate.lm import lm_loss
from gptforge.model import GPT
from gptforge.runtime import autocast_dtype as resolve_autocast, resolve_device
from gptforge.train.optim import build_optimizer

DEFAULT_VOCAB = 4096  # for presets without their own vocabulary (tiny, small)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048, min_seconds: float = 1.0) -> float:
    """Measured GFLOP/s of an n×n @ n×n matmul (2n³ FLOPs each)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    synchronize(device)
    reps, start = 0, time.perf_counter()
    while True:
        for _ in range(5):
            torch.mm(a, b)
        reps += 5
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return 2 * n**3 * reps / elapsed / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=list(MODEL_PRESETS))
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    device = resolve_device(args.device)
    autocast_dtype, scaled = resolve_autocast(args.dtype, device)
    overrides = {"dropout": 0.0}
    if MODEL_PRESETS[args.preset].get("vocab_size") is None:
        overrides["vocab_size"] = DEFAULT_VOCAB
    if args.block_size:
        overrides["block_size"] = args.block_size
    config = ModelConfig.from_preset(args.preset, **overrides)
    T, B = config.block_size, args.batch_size

    torch.manual_seed(0)
    model = GPT(config).to(device).train()
    optimizer = build_optimizer(model, TrainConfig(), device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=scaled)
    runner = torch.compile(model) if args.compile else model
    tokens = torch.randint(config.vocab_size, (8, B, T + 1), device=device)

    def step(i: int) -> None:
        batch = tokens[i % len(tokens)]
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = lm_loss(runner(batch[:, :-1]), batch[:, 1:])
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(i)
    synchronize(device)
    start = time.perf_counter()
    for i in range(args.steps):
        step(i)
    synchronize(device)
    elapsed = time.perf_counter() - start

    tokens_per_s = args.steps * B * T / elapsed
    achieved = model.flops_per_token(T) * tokens_per_s / 1e9
    fp32_peak = matmul_gflops(device, torch.float32)
    peak_dtype = autocast_dtype or torch.float32
    peak = fp32_peak if peak_dtype == torch.float32 else matmul_gflops(device, peak_dtype)
    dtype_name = str(peak_dtype).removeprefix("torch.")

    print(f"device           {device} ({torch.get_num_threads()} CPU threads)" if device.type == "cpu"
          else f"device           {torch.cuda.get_device_name(device)}")
    print(f"model            {args.preset}: {model.num_parameters() / 1e6:.2f}M parameters, vocab {config.vocab_size}, "
          f"block {T}, batch {B}, {dtype_name}{', compiled' if args.compile else ''}")
    print(f"step time        {elapsed / args.steps * 1000:.1f} ms ({args.steps} steps after {args.warmup} warmup)")
    print(f"throughput       {tokens_per_s:,.0f} tokens/s")
    print(f"achieved         {achieved:,.1f} GFLOP/s ({model.flops_per_token(T) / 1e6:.1f} MFLOP/token)")
    print(f"matmul fp32      {fp32_peak:,.1f} GFLOP/s (2048x2048 torch.mm)")
    if peak_dtype != torch.float32:
        print(f"matmul {dtype_name:<9} {peak:,.1f} GFLOP/s (2048x2048 torch.mm)")
    print(f"fraction of peak {achieved / peak:.1%} of the {dtype_name} matmul rate")


if __name__ == "__main__":
    main()
