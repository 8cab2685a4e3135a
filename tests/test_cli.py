"""The command line: every user error is one `error: ...` line and a non-zero exit, never a traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptforge.checkpoint import COMPLETE_MARKER
from gptforge.cli import EXIT_USER_ERROR
from tests.cli_utils import assert_one_line_error, run
from tests.model_utils import save_tiny_checkpoint


@pytest.fixture()
def tiny_checkpoint(tmp_path) -> Path:
    return save_tiny_checkpoint(tmp_path / "ckpt", "abcdefghijklmnopqrstuvwxyz .\n", block_size=32, n_layer=1, n_embd=16)


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--config", "demo", "--train.max_step=3"], "unknown config key train.max_step (did you mean train.max_steps?)"),
    (["train", "--config", "demo", "--model.preset=huge"], "unknown model preset 'huge'"),
    (["train", "--config", "demo", "--train.batch_size=many"], "train.batch_size must be an integer, got 'many'"),
    (["train", "--config", "demo", "--train.batch_size=-2"], "train.batch_size must be at least 1, got -2"),
    (["train", "--config", "missing.yaml"], "config file 'missing.yaml' not found"),
    (["train", "--config", "demo", "--train.max_steps"], "override '--train.max_steps' has no value"),
    (["generate", "--checkpoint", "x", "--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    (["generate", "--checkpoint", "x", "--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["generate", "--checkpoint", "x", "--max-new-tokens", "0"], "must be at least 1, got 0"),
    (["generate", "--checkpoint", "x", "--seed", "abc"], "invalid int value: 'abc'"),
    (["prepare", "--corpus", "x"], "the following arguments are required: --out"),
    (["generate", "--checkpoint", "x", "--train.max_steps=3"], "belong to `gptforge train`"),
])
def test_bad_arguments(capsys, argv, fragment):
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, fragment)


def test_generate_from_checkpoint_streams_text(capsys, tiny_checkpoint):
    code, out, _ = run(capsys, "generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "ab",
                       "--max-new-tokens", "10", "--seed", "1", "--device", "cpu")
    assert code == 0 and out.startswith("ab") and len(out) > 3
    code2, out2, _ = run(capsys, "generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "ab",
                         "--max-new-tokens", "10", "--seed", "1", "--device", "cpu")
    assert out2 == out  # same seed, same text
    code, out, _ = run(capsys, "generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "ab",
                       "--max-new-tokens", "5", "--num-samples", "3", "--temperature", "0")
    assert code == 0 and out.count("--- sample") == 3


def test_generate_context_too_long(capsys, tiny_checkpoint):
    code, _, err = run(capsys, "generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "a" * 30,
                       "--max-new-tokens", "10")
    assert_one_line_error(code, err, "is longer than the model's context of 32 tokens")


def test_generate_missing_prompt_file(capsys, tiny_checkpoint, tmp_path):
    code, _, err = run(capsys, "generate", "--checkpoint", str(tiny_checkpoint), "--prompt-file", str(tmp_path / "no.txt"))
    assert_one_line_error(code, err, "prompt file")


def test_half_written_checkpoint_is_refused(capsys, tiny_checkpoint):
    (tiny_checkpoint / COMPLETE_MARKER).unlink()
    code, _, err = run(capsys, "generate", "--checkpoint", str(tiny_checkpoint), "--max-new-tokens", "3")
    assert_one_line_error(code, err, "is incomplete")


def test_corrupt_checkpoint_weights(capsys, tiny_checkpoint):
    (tiny_checkpoint / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    code, _, err = run(capsys, "generate", "--checkpoint", str(tiny_checkpoint), "--max-new-tokens", "3")
    assert_one_line_error(code, err, "cannot read weights")


def test_checkpoint_config_that_does_not_fit_the_weights(capsys, tiny_checkpoint):
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    cfg["model"]["n_embd"] = 32
    (tiny_checkpoint / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, "generate", "--checkpoint", str(tiny_checkpoint), "--max-new-tokens", "3")
    assert_one_line_error(code, err, "do not fit the model config")


def test_console_script_exit_code_and_help():
    exe = Path(sys.executable).parent / "gptforge"
    done = subprocess.run([str(exe), "train", "--config", "demo", "--train.warmup_steps=-1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_USER_ERROR
    assert done.stderr.strip() == "error: train.warmup_steps must be >= 0, got -1"
    helped = subprocess.run([str(exe), "train", "--help-config"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "train.learning_rate" in helped.stdout


def test_prompt_file_is_one_batch_and_json_has_every_field(capsys, tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ab\n\ncde fg\nline\\nbreak\n")
    code, out, _ = run(capsys, "generate", "--checkpoint", str(tiny_checkpoint), "--prompt-file", str(prompts),
                       "--max-new-tokens", "6", "--json", "--logprobs", "2", "--seed", "3")
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in records] == ["ab", "cde fg", "line\nbreak"]
    first = records[0]["completions"][0]
    assert len(first["token_ids"]) == len(first["logprobs"]) == len(first["top_logprobs"]) == 6
    assert all(len(alts) == 2 for alts in first["top_logprobs"])
    assert first["finish_reason"] == "length" and first["prompt_tokens"] == 2
    # the same prompt alone, with the seed its row had in the batch, gives the same tokens
    code, out, _ = run(capsys, "generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "cde fg",
                       "--max-new-tokens", "6", "--json", "--seed", "4")
    assert json.loads(out)["completions"][0]["token_ids"] == records[1]["completions"][0]["token_ids"]


def test_stop_flags_understand_escapes_and_repeat():
    from gptforge.cli import build_parser, generate_config_from_args

    args, _ = build_parser().parse_known_args(
        ["generate", "--checkpoint", "x", "--stop", "\\n\\n", "--stop", "END"])
    assert generate_config_from_args(args).stop == ["\n\n", "END"]
    args, _ = build_parser().parse_known_args(["generate", "--checkpoint", "x", "--num-beams", "2"])
    assert generate_config_from_args(args).temperature == 0.0  # beams default to greedy scoring


def test_generate_with_a_bfloat16_kv_cache(capsys, tiny_checkpoint):
    code, out, _ = run(capsys, "generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "ab",
                       "--max-new-tokens", "8", "--temperature", "0", "--kv-cache-dtype", "bfloat16", "--json")
    assert code == 0
    record = json.loads(out.splitlines()[0])
    assert record["prompt"] == "ab" and len(record["completions"][0]["token_ids"]) == 8


def test_beam_search_flags(capsys, tiny_checkpoint):
    code, out, _ = run(capsys, "generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "ab",
                       "--max-new-tokens", "5", "--num-beams", "3", "--num-return-sequences", "2")
    assert code == 0 and out.count("--- sample") == 2
    code, _, err = run(capsys, "generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "ab",
                       "--num-beams", "2", "--temperature", "0.5")
    assert_one_line_error(code, err, "beam search is deterministic and does not sample")


@pytest.mark.parametrize("argv, fragment", [
    (["--prompt-file", "EMPTY"], "has no prompts"),
    (["--draft-checkpoint", "CKPT", "--num-beams", "2"], "speculative decoding (--draft-checkpoint) supports"),
    (["--quantize", "int4"], "invalid choice: 'int4'"),
    (["--kv-cache-dtype", "float16"], "invalid choice: 'float16'"),
    (["--min-p", "2"], "min_p must be in [0, 1]"),
    (["--stop", ""], "stop"),
])
def test_bad_generate_flags(capsys, tiny_checkpoint, tmp_path, argv, fragment):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    argv = [str(empty) if a == "EMPTY" else str(tiny_checkpoint) if a == "CKPT" else a for a in argv]
    code, _, err = run(capsys, "generate", "--checkpoint", str(tiny_checkpoint), "--max-new-tokens", "3", *argv)
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize("argv, quiet, verbose", [
    (["-q", "prepare", "--out", "x"], True, False),
    (["prepare", "-q", "--out", "x"], True, False),
    (["prepare", "--out", "x"], False, False),
    (["-v", "generate", "--checkpoint", "c"], False, True),
    (["generate", "--checkpoint", "c", "--verbose"], False, True),
])
def test_output_flags_before_or_after_the_subcommand(argv, quiet, verbose):
    from gptforge.cli import build_parser

    args, _ = build_parser().parse_known_args(argv)
    assert (args.quiet, args.verbose) == (quiet, verbose)
