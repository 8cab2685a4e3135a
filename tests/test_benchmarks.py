"""The benchmark scripts run (smallest settings; figures are printed, never asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

from gptforge.backends.cpu import panel_isa

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def test_train_throughput_prints_its_figures():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/train_throughput.py"), "--preset", "tiny",
                           "--steps", "1", "--warmup", "0", "--batch-size", "2", "--block-size", "16"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for figure in ("tokens/s", "GFLOP/s", "peak"):
        assert figure in done.stdout


def test_finetune_benchmark_compares_full_and_lora():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/finetune.py"), "--preset", "tiny", "--steps", "2",
                           "--batch-size", "4", "--train-examples", "16", "--val-examples", "8"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "full" in done.stdout and "lora" in done.stdout.lower()


def test_serve_benchmark_runs_against_a_real_server():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/serve.py"), "--tiny", "--concurrency", "1", "2",
                           "--max-tokens", "8", "--repeats", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rounds = [line for line in done.stdout.splitlines() if line.startswith("round ")]
    assert len(rounds) == 2 and all("c2 " in r and "transformers b8" in r for r in rounds)
    assert "server  concurrency   2:" in done.stdout and "range over rounds" in done.stdout


def test_decode_benchmark_interleaves_rounds_and_checks_tokens():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/decode.py"), "--tiny", "--repeats", "2",
                           "--new-tokens", "8", "--batch-sizes", "1", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("round ") == 2  # each round times every configuration
    assert "tokens identical (gptforge fp32, batch 2)            yes" in done.stdout
    assert "bound from memory bandwidth" in done.stdout


@pytest.mark.skipif("panel_isa() < 1",  # a string: evaluated when the test runs, not at collection
                    reason="the panel kernel needs the native build (a C++ compiler) on x86 with AVX2")
def test_panel_kernel_benchmark_checks_bit_invariance_before_timing():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/panel_kernel.py"), "--tiny", "--repeats", "2",
                           "--rows", "1", "3"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "invariance checks: all hold" in done.stdout
    assert "panel vs oneDNN" in done.stdout


def test_thread_pool_benchmark_times_the_three_threads():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/thread_pool.py"), "--tiny", "--steps", "2",
                           "--rounds", "1", "--batch", "2", "--context", "4"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "second, released" in done.stdout
    assert len([line for line in done.stdout.splitlines() if line.strip().startswith("1 ")]) == 1


def test_faults_benchmark_kills_checkpoint_writers_and_loads():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/faults.py"), "--kills", "6"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kills (SIGKILL): 6" in done.stdout
    assert "bad loads after kill -9 during checkpoint writes:" in done.stdout and "(target 0)" in done.stdout


def test_faults_serve_benchmark_fuzzes_drops_and_signals_a_real_server():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/faults_serve.py"), "--requests", "40",
                           "--concurrency", "8", "--drops", "2", "--drop-wave", "2", "--streams", "3",
                           "--stream-tokens", "8", "--second-tokens", "50"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for figure in ("5xx responses:", "off-shape errors:", "every row free", "SIGTERM with 3 streams in flight",
                   "second SIGTERM"):
        assert figure in done.stdout


def test_knowledge_benchmark_times_build_and_queries_against_bm25s():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/knowledge.py"), "--passages", "300",
                           "--queries", "20"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "→ 300 passages" in done.stdout
    for figure in ("build BM25 index (bm25s)", "save folder (atomic)", "load folder", "queries/s",
                   "reference: bm25s retrieve", "reference: naive scoring", "the same top-5 scores for 20/20"):
        assert figure in done.stdout, done.stdout


def test_score_benchmark_compares_shared_prefix_scoring_with_a_transformers_loop():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/score.py"), "--tiny", "--repeats", "1",
                           "--candidates", "6", "--context-tokens", "12", "--candidate-tokens", "5",
                           "--reference-candidates", "3", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for figure in ("gptforge score_ids", "transformers loop (reference)", "transformers batched", "ratio to the loop",
                   "(over 3 candidates)"):
        assert figure in done.stdout, done.stdout
    diff = float(done.stdout.split("log-probability: ")[1].split()[0])
    assert diff < 1e-3  # the two libraries score the same weights alike
