"""gptforge's panel kernel (the float32 decode-step linear layers) against oneDNN's prepacked kernel and MKL.

    python benchmarks/panel_kernel.py [--rows 1 2 4 8 16 32] [--prefetch 32] [--repeats 12] [--tiny]

A decode step multiplies 1-16 rows by each weight matrix, and the server needs a row's result to have the
same bits whatever other rows share the call (so that a batched request returns what ``gptforge
generate`` returns). :class:`gptforge.backends.cpu.PackedLinear` runs gptforge's own kernel for that
(``kernel="panel"``, in gptforge/backends/cpu/csrc/panel.cpp): weights packed once in panels of 64 outputs, a
register tile of up to 6 rows x 64 outputs, one fused multiply-add chain per output over the inputs in
order, so batch-invariant by construction; panels split across threads, weights prefetched ahead.

This script checks the construction's promise first (the AVX-512, AVX2 and scalar code agree bit for
bit; each row alone equals its row in a batch of 20), then times the 49 linear layers of a GPT-2 124M
decode step at each row count: MKL (``F.linear``, what transformers runs), oneDNN prepacked (gptforge's
kernel where the panel kernel has no vector code), the panel kernel, and the panel kernel with another
prefetch distance (``--prefetch``, k-rows ahead; 0: none; the library uses 32). Prints the median of
``--repeats`` in ms for all layers once; then the same layers quantized to int8 on each int8 CPU kernel
the machine has (``amx``: Intel AMX tiles; ``panel``; ``fbgemm``). ``--tiny`` runs small layers to check
that the script works.
Needs the native kernels (a C++ compiler; built once, ~40 s) on an x86 CPU with AVX2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def check_invariance(module, shapes, rows: int = 20) -> list[str]:
    """The bit-level properties the design promises; returns what failed (empty: all hold)."""
    from gptforge.backends.cpu import pack_panels

    failures = []
    for k, n in shapes:
        w, b, x = torch.randn(n, k) * 0.02, torch.randn(n), torch.randn(rows, k)
        p = pack_panels(w)
        by_isa = [module.panel_linear(x, p, n, b, isa) for isa in range(module.panel_isa() + 1)]
        if any(not torch.equal(y, by_isa[0]) for y in by_isa):
            failures.append(f"{k}x{n}: instruction sets disagree")
        full = by_isa[-1]
        if any(not torch.equal(module.panel_linear(x[i:i + 1], p, n, b)[0], full[i]) for i in range(rows)):
            failures.append(f"{k}x{n}: a row alone differs from the same row in a batch of {rows}")
        reference = F.linear(x.double(), w.double(), b.double())
        if not torch.allclose(full.double(), reference, rtol=1e-4, atol=1e-4):
            failures.append(f"{k}x{n}: result differs from float64 F.linear")
    return failures


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--prefetch", type=int, default=0,
                        help="k-rows ahead for the last column (default 0: no prefetch; the library uses 32)")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--tiny", action="store_true", help="small layers: checks that the script runs")
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1 or min(args.rows) < 1 or args.prefetch < 0:
        parser.error("--repeats, --threads and --rows must be at least 1, --prefetch at least 0")

    from types import SimpleNamespace

    from gptforge.backends.cpu import native_op, onednn_available, pack_panels, panel_isa

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    panel_linear = native_op("panel_linear")
    module = SimpleNamespace(panel_linear=panel_linear, panel_isa=panel_isa)  # the op table's two the checks use
    if panel_linear is None or panel_isa() < 1:
        raise SystemExit("the panel kernel needs gptforge's native kernels (a C++ compiler) on an x86 CPU "
                         "with AVX2; see the warning above")
    c, vocab, layers = (64, 1000, 2) if args.tiny else (768, 50257, 12)
    block = [(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)]
    failures = check_invariance(module, block[:2] + [(c, vocab), (5, 7)])
    print(f"isa level {module.panel_isa()} (2 AVX-512, 1 AVX2); invariance checks: "
          + ("all hold" if not failures else "FAILED: " + "; ".join(failures)))
    if failures:
        raise SystemExit(1)
    weights = [(torch.randn(n, k) * 0.02, torch.zeros(n)) for _ in range(layers) for k, n in block]
    weights.append((torch.randn(vocab, c) * 0.02, None))
    onednn = ([(torch.ops.mkldnn._reorder_linear_weight(w), b) for w, b in weights]
              if onednn_available() else None)
    panels = [(pack_panels(w), b, w.shape[0]) for w, b in weights]
    mb = sum(w.numel() for w, _ in weights) * 4 / 1e6
    print(f"{len(weights)} linear layers ({mb:.1f} MB of float32 weights), {args.threads} threads, "
          f"median of {args.repeats}; ms for all layers once")
    other = f"panel, prefetch {args.prefetch}"
    print(f"{'rows':>4} {'MKL F.linear':>13} {'oneDNN packed':>14} {'panel':>8} {other:>19} "
          f"{'panel vs oneDNN':>16}")
    for m in args.rows:
        xs = {k: torch.randn(m, k) for k in {w.shape[1] for w, _ in weights}}
        t_mkl = median_ms(lambda: [F.linear(xs[w.shape[1]], w, b) for w, b in weights], args.repeats)
        t_dnn = (median_ms(lambda: [torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, b, "none", [], "")
                                    for (p, b), (w, _) in zip(onednn, weights)], args.repeats)
                 if onednn is not None else float("nan"))
        t_pan = median_ms(lambda: [module.panel_linear(xs[p.shape[1]], p, n, b) for p, b, n in panels],
                          args.repeats)
        t_other = median_ms(lambda: [module.panel_linear(xs[p.shape[1]], p, n, b, -1, args.prefetch)
                                     for p, b, n in panels], args.repeats)
        print(f"{m:>4} {t_mkl:>13.2f} {t_dnn:>14.2f} {t_pan:>8.2f} {t_other:>19.2f} {t_dnn / t_pan:>15.2f}x",
              flush=True)
    int8_table(weights, args)


def int8_table(weights, args) -> None:
    """The same layers quantized to int8 (gptforge.backends.quant.Int8Linear), on each int8 CPU kernel this machine has."""
    import torch.nn as nn

    from gptforge.backends.quant import Int8Linear, amx_available, fbgemm_available, panel_available

    kernels = [k for k, ok in (("amx", amx_available()), ("panel", panel_available()), ("fbgemm", fbgemm_available()))
               if ok]
    layers: dict[str, list] = {k: [] for k in kernels}
    for w, b in weights:
        linear = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            linear.weight.copy_(w)
            if b is not None:
                linear.bias.copy_(b)
        for kernel in kernels:
            q = Int8Linear.from_linear(linear, kernel=kernel)
            q.prepare()
            layers[kernel].append((q._native, q.bias, w.shape[1]))
    mb = sum(w.numel() for w, _ in weights) / 1e6
    print(f"\nint8 ({mb:.1f} MB of int8 weights): amx = int8 x two-part int8 activations on AMX tiles; panel = int8 "
          f"widened to float32, float32 activations; fbgemm = int8 x two-part int8 rows. ms for all layers once")
    print(f"{'rows':>4} " + " ".join(f"{k:>8}" for k in kernels))
    for m in args.rows:
        xs = {k: torch.randn(m, k) for k in {w.shape[1] for w, _ in weights}}
        times = [median_ms(lambda: [fn(xs[k], b) for fn, b, k in layers[kernel]], args.repeats) for kernel in kernels]
        print(f"{m:>4} " + " ".join(f"{t:>8.2f}" for t in times), flush=True)


if __name__ == "__main__":
    sys.exit(main())
