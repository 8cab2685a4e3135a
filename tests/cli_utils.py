"""Helpers for the command-line tests: run ``gptforge`` in-process and check its one-line errors.

Import as ``from tests.cli_utils import run, assert_one_line_error`` (pytest runs with --import-mode=importlib).
"""

from pathlib import Path

from gptforge.cli import EXIT_USER_ERROR, main


def make_tiny_checkpoint(tmp_path: Path) -> Path:
    """A 1-layer, 16-wide GPT with a character tokenizer, saved as a checkpoint folder (seeded)."""
    import torch

    from gptforge.checkpoint import save_checkpoint
    from gptforge.config import ModelConfig
    from gptforge.model import GPT
    from gptforge.tokenizer import CharTokenizer

    torch.manual_seed(0)
    tok = CharTokenizer(list("abcdefghijklmnopqrstuvwxyz .\n"))
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    path = tmp_path / "ckpt"
    save_checkpoint(path, model, tok, {"model": vars(model.config)})
    return path


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
