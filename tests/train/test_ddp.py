"""Two-process DistributedDataParallel on CPU (gloo) matches one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gptforge.train import pretrain
from gptforge.train.metrics import read_metrics

pytestmark = pytest.mark.integration

# Appended to each worker: once pretrain returns, no DistributedDataParallel wrapper is left alive, not even
# in an uncollected reference cycle. One left over keeps the process group alive past destroy_process_group,
# until interpreter exit tears it down, and there gloo's threads sometimes abort the process.
NO_WRAPPER_LEFT = """
import gc
from torch.nn.parallel import DistributedDataParallel
assert not [o for o in gc.get_objects() if isinstance(o, DistributedDataParallel)], "a DDP wrapper outlived pretrain"
"""

WORKER = """
import json, sys
from gptforge.config import build_run_config
from gptforge.train import pretrain

result = pretrain(build_run_config(json.loads(sys.argv[1])), progress=False)
assert result.steps == 6, result
""" + NO_WRAPPER_LEFT


def test_two_processes_match_one_process_with_accumulation(make_config, tmp_path):
    steps = 6
    two = make_config(max_steps=steps, grad_accum_steps=1, eval_interval=3, checkpoint_interval=3,
                      tensorboard=True, out_dir=str(tmp_path / "ddp"))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), json.dumps(two.to_dict())],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    one = pretrain(make_config(max_steps=steps, grad_accum_steps=2, eval_interval=3, checkpoint_interval=3,
                               out_dir=str(tmp_path / "single")), progress=False)

    ddp_records = read_metrics(tmp_path / "ddp/metrics.jsonl")
    single_records = read_metrics(tmp_path / "single/metrics.jsonl")
    ddp_train = [(r["step"], r["train_loss"]) for r in ddp_records if "train_loss" in r]
    single_train = [(r["step"], r["train_loss"]) for r in single_records if "train_loss" in r]
    assert [s for s, _ in ddp_train] == list(range(1, steps + 1))  # one line per step: rank 1 wrote none
    assert [s for s, _ in ddp_train] == [s for s, _ in single_train]
    for (_, a), (_, b) in zip(ddp_train, single_train):
        assert a == pytest.approx(b, rel=1e-4)
    ddp_val = [r["val_loss"] for r in ddp_records if "val_loss" in r]
    single_val = [r["val_loss"] for r in single_records if "val_loss" in r]
    assert len(ddp_val) == 2 and ddp_val == pytest.approx(single_val, rel=1e-4)
    assert ddp_val[-1] == pytest.approx(one.val_loss, rel=1e-4)

    # Only rank 0 wrote: one TensorBoard writer, and the checkpoint records both processes' RNG states.
    assert len(list((tmp_path / "ddp/tensorboard").glob("events.out.tfevents.*"))) == 1
    state = json.loads((tmp_path / "ddp/checkpoints/step-0000006/trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["global_batch_size"] == 8
    assert state["tokens_seen"] == one.tokens_seen


# Rank 1 alone reports a NaN loss at step 2 (its gradients stay finite) and alone receives SIGTERM during
# step 3: both processes must skip step 2 and both must stop, with one checkpoint, after step 3.
FAULTY_WORKER = """
import importlib, json, os, signal, sys
import torch
from gptforge.config import build_run_config

pretraining = importlib.import_module("gptforge.train.pretrain")  # the module, not the function of that name
rank = int(os.environ["RANK"])
calls = [0]
real_loss = pretraining.next_token_loss

def loss(model, batch):
    calls[0] += 1
    value = real_loss(model, batch)
    if rank == 1 and calls[0] == 2:
        value = value + torch.tensor(float("nan"))  # a NaN value, finite gradients
    if rank == 1 and calls[0] == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return value

pretraining.next_token_loss = loss
result = pretraining.pretrain(build_run_config(json.loads(sys.argv[1])), progress=False, handle_signals=True)
# A file per rank, not stdout: the two processes share torchrun's pipe, where lines can interleave.
with open(os.path.join(sys.argv[2], f"result-{rank}.json"), "w") as f:
    json.dump({"rank": rank, "steps": result.steps, "stopped_by": result.stopped_by}, f)
""" + NO_WRAPPER_LEFT


def test_processes_agree_on_skipping_a_step_and_on_stopping_for_a_signal(make_config, tmp_path):
    config = make_config(max_steps=50, eval_interval=100, checkpoint_interval=100, out_dir=str(tmp_path / "ddp"))
    script = tmp_path / "worker.py"
    script.write_text(FAULTY_WORKER)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), json.dumps(config.to_dict()), str(tmp_path)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in (0, 1)]
    assert results == [{"rank": 0, "steps": 3, "stopped_by": "SIGTERM"}, {"rank": 1, "steps": 3, "stopped_by": "SIGTERM"}]
    records = read_metrics(tmp_path / "ddp/metrics.jsonl")
    assert [r["step"] for r in records if r.get("skipped")] == [2]
    assert [r["step"] for r in records if r.get("train_loss") is not None] == [1, 3]
    state = json.loads((tmp_path / "ddp/checkpoints/step-0000003/trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["skipped_steps"] == 1
    assert sorted(p.name for p in (tmp_path / "ddp/checkpoints").iterdir()) == ["latest", "step-0000003"]
