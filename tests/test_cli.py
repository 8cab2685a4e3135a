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
    (["generate", "--checkpoint", "x", "--seed", "abc"], "argument --seed: must be an integer, got 'abc'"),
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
    assert_one_line_error(code, err, "is damaged: model.safetensors does not match the checksum")
    (tiny_checkpoint / "COMPLETE").write_text("ok\n")  # as older gptforge wrote it: no checksums to verify
    code, _, err = run(capsys, "generate", "--checkpoint", str(tiny_checkpoint), "--max-new-tokens", "3")
    assert_one_line_error(code, err, "cannot read weights")


def test_checkpoint_config_that_does_not_fit_the_weights(capsys, tiny_checkpoint):
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    cfg["model"]["n_embd"] = 32
    (tiny_checkpoint / "config.json").write_text(json.dumps(cfg))
    (tiny_checkpoint / "COMPLETE").write_text("ok\n")  # as older gptforge wrote it: no checksums to verify
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


@pytest.mark.parametrize("command, classes", [
    ("generate", ("InferenceConfig", "GenerateConfig")),
    ("serve", ("ServeConfig",)),
])
def test_every_config_field_is_a_flag_with_its_docstring_as_help(capsys, command, classes):
    import dataclasses

    from gptforge import config as cfg

    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    text = " ".join(out.split())
    for cls in (getattr(cfg, name) for name in classes):
        docs = cfg.field_docs(cls)
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in out, f.name
            assert " ".join(docs[f.name].split()[:6]) in text, f.name


def test_flags_fill_the_config_with_its_own_defaults():
    from gptforge.cli import build_parser, config_from_flags
    from gptforge.config import GenerateConfig, ServeConfig

    args, _ = build_parser().parse_known_args(["generate", "--checkpoint", "x"])
    assert config_from_flags(GenerateConfig, args) == GenerateConfig()
    args, _ = build_parser().parse_known_args(["serve", "--checkpoint", "x"])
    assert config_from_flags(ServeConfig, args) == ServeConfig(checkpoint="x")
    args, _ = build_parser().parse_known_args(["chat", "--checkpoint", "x"])
    assert config_from_flags(GenerateConfig, args) == GenerateConfig(max_new_tokens=256)


def test_readme_flag_spellings_parse():
    from gptforge.cli import build_parser, config_from_flags
    from gptforge.config import GenerateConfig, ServeConfig

    parser = build_parser()
    args, rest = parser.parse_known_args(
        ["generate", "--checkpoint", "runs/demo", "--prompt", "JULIET:", "--temperature", "0.9", "--top-k", "50",
         "--top-p", "0.95", "--seed", "7", "--num-samples", "3", "--min-p", "0.05", "--repetition-penalty", "1.2",
         "--no-repeat-ngram-size", "3", "--stop", "\\n\\n", "--ignore-eos", "--no-prepack", "--quantize", "int8"])
    gen = config_from_flags(GenerateConfig, args)
    assert rest == [] and gen.num_return_sequences == 3 and gen.stop == ["\n\n"] and gen.ignore_eos
    assert (gen.temperature, gen.top_k, gen.top_p, gen.seed, gen.min_p) == (0.9, 50, 0.95, 7, 0.05)
    assert args.prepack is False and args.quantize == "int8"
    args, rest = parser.parse_known_args(
        ["serve", "--checkpoint", "gpt2", "--port", "9000", "--api-key", "s3cret", "--max-batch-size", "32",
         "--max-queue", "128", "--cors-origin", "http://localhost:3000", "--cors-origin", "http://a.b",
         "--request-timeout", "120", "--no-batch-invariant", "--kv-cache-dtype", "bfloat16"])
    serve = config_from_flags(ServeConfig, args)
    assert rest == [] and serve.cors_origins == ["http://localhost:3000", "http://a.b"]
    assert (serve.port, serve.api_key, serve.max_batch_size, serve.max_queue, serve.request_timeout) == (
        9000, "s3cret", 32, 128, 120.0)
    assert serve.batch_invariant is False and serve.kv_cache_dtype == "bfloat16"


@pytest.mark.parametrize("argv, fragment", [
    (["chat", "--checkpoint", "x", "--temperature", "-1"], "temperature must be a finite number >= 0, got -1.0"),
    (["chat", "--checkpoint", "x", "--top-p", "2"], "top_p must be in (0, 1], got 2.0"),
    (["serve", "--checkpoint", "x", "--port", "70000"], "port must be in [0, 65535], got 70000"),
    (["serve", "--checkpoint", "x", "--request-timeout", "soon"], "argument --request-timeout: must be a number"),
    (["serve", "--checkpoint", "x", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["serve"], "the following arguments are required: --checkpoint"),
])
def test_bad_chat_and_serve_flags(capsys, argv, fragment):
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, fragment)
