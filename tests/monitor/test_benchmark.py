"""benchmarks/monitor.py runs (smallest settings; its figures are printed, never asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def test_monitor_benchmark_prints_texts_per_second_and_its_reference():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/monitor.py"), "--tiny", "--texts", "20",
                           "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "texts/s" in done.stdout and "reference: classify_texts alone" in done.stdout
