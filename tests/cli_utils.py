"""Helpers for the command-line tests: run ``gptforge`` in-process and check its one-line errors.

Import as ``from tests.cli_utils import run, assert_one_line_error`` (pytest runs with --import-mode=importlib).
"""

from gptforge.cli import EXIT_USER_ERROR, main


def run(capsys, *argv):
    """Run ``gptforge *argv`` in-process; return (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, fragment):
    """The exit code is the user-error one and stderr has exactly one ``error:`` line, containing ``fragment``."""
    assert code == EXIT_USER_ERROR
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err


def save_tiny_bpe_checkpoint(path, *, block_size: int = 128, labels=None):
    """A seeded random one-layer GPT with a small byte-level BPE, saved at ``path``: the demo's tokenizer kind
    and (by default) its 128-token context. ``labels``: a classifier with a fresh head over these labels."""
    import torch

    from gptforge.checkpoint import build_task_model, save_checkpoint, task_model_state
    from gptforge.config import ModelConfig
    from gptforge.model import GPT
    from gptforge.tokenizer import BPETokenizer

    text = ["ROMEO: What light through yonder window breaks?\nJULIET: O Romeo, Romeo!\n",
            "KING: Speak, HAMLET: the rest is silence.\n"] * 20
    tok = BPETokenizer.train(iter(text), vocab_size=300)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16))
    config = {"model": vars(model.config)}
    if labels is None:
        return save_checkpoint(path, model, tok, config)
    task = {"type": "classify", "labels": list(labels), "chat_template": None}
    task_model = build_task_model(model, task)
    return save_checkpoint(path, task_model, tok, {**config, "task": task}, state=task_model_state(task_model))
