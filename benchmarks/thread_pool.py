"""A decode step timed on the main thread and on a second thread, before and after releasing the main thread's
OpenMP worker pool.

    python benchmarks/thread_pool.py [--batch 16] [--context 96] [--steps 30] [--rounds 3] [--tiny]

The server loads its model on the main thread and runs it on the scheduler thread. libgomp, the OpenMP
runtime of torch's CPU ops, keeps a worker pool for every thread that has run parallel work, and counts all
of their threads. Once that count exceeds the CPUs, every worker sleeps between parallel regions after ~100
spins instead of ~300,000. So on a small machine the second thread pays a wake-up for every op, and shows
more system time. ``Scheduler.start()`` therefore calls :func:`gptforge.runtime.release_thread_pool` on the
calling thread, which ends that thread's idle workers.

Each round times the same step (a prepared random GPT-2 124M, float32, ``--batch`` rows over ``--context``
cached positions) in three ways:
1. on the main thread;
2. on a new thread while the main thread's pool is alive;
3. on a new thread after the main thread released its pool.

It prints, for each, the median ms a step and the process's system time a step. ``--tiny`` uses a 2-layer
model, to check that the script runs.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import threading
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=96)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, to check that the script runs")
    args = parser.parse_args()
    if min(args.batch, args.context, args.steps, args.rounds) < 1:
        parser.error("--batch, --context, --steps and --rounds must be at least 1")

    from gptforge.config import ModelConfig
    from gptforge.backends import decode_session, prepare_for_inference
    from gptforge.model import GPT
    from gptforge.runtime import release_thread_pool

    torch.manual_seed(0)
    shape = dict(n_layer=2, n_head=2, n_embd=64) if args.tiny else dict(n_layer=12, n_head=12, n_embd=768)
    model = prepare_for_inference(GPT(ModelConfig(vocab_size=50257, block_size=1024, **shape)))
    cache = model.new_kv_cache(args.batch, args.context + 1)
    token = torch.zeros(args.batch, 1, dtype=torch.long)
    positions = torch.full((args.batch, 1), args.context)
    with torch.inference_mode():
        model(torch.zeros(args.batch, args.context, dtype=torch.long), kv_cache=cache)

    def time_steps() -> tuple[float, float]:
        """(median ms a step, the process's system ms a step) on the calling thread."""
        with torch.inference_mode(), decode_session(model):
            def step():
                cache.length = args.context
                model.hidden_states(token, kv_cache=cache, position_ids=positions)

            for _ in range(3):
                step()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            system = resource.getrusage(resource.RUSAGE_SELF).ru_stime - before
        return statistics.median(times) * 1e3, system / args.steps * 1e3

    def on_new_thread() -> tuple[float, float]:
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("r", time_steps()))
        thread.start()
        thread.join()
        return result["r"]

    print(f"decode step: {'tiny model' if args.tiny else 'GPT-2 124M'}, float32, {args.batch} rows, "
          f"{args.context} cached positions, {torch.get_num_threads()} torch threads; median of {args.steps} steps")
    print(f"{'round':>5} {'main thread':>18} {'second thread':>18} {'second, released':>18}   (ms a step / system ms a step)")
    for r in range(args.rounds):
        main_thread = time_steps()  # this (re)starts the main thread's pool
        second = on_new_thread()
        released = release_thread_pool()
        after = on_new_thread()
        cells = [f"{ms:8.2f} / {sys_ms:5.2f}" for ms, sys_ms in (main_thread, second, after)]
        print(f"{r + 1:>5} {cells[0]:>18} {cells[1]:>18} {cells[2]:>18}"
              + ("" if released else "   (no pool released: OpenMP runtime without omp_pause_resource_all)"),
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
