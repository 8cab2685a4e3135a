"""The command line: every user error is one `error: ...` line and a non-zero exit, never a traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptforge.checkpoint import COMPLETE_MARKER
from gptforge.cli import EXIT_USER_ERROR
from tests.cli_utils import assert_one_line_error, run, save_tiny_bpe_checkpoint
from tests.model_utils import save_tiny_checkpoint


@pytest.fixture(scope="module")
def bpe_checkpoint(tmp_path_factory) -> Path:
    """A byte-level BPE model with the demo model's 128-token context."""
    return save_tiny_bpe_checkpoint(tmp_path_factory.mktemp("bpe") / "ckpt")


@pytest.fixture(scope="module")
def bpe_classifier(tmp_path_factory) -> Path:
    return save_tiny_bpe_checkpoint(tmp_path_factory.mktemp("cls") / "ckpt", labels=["neg", "pos"])


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
    assert_one_line_error(code, err, f"weights {tiny_checkpoint / 'model.safetensors'} do not fit the model config: "
                                     "tensor ")
    assert "the config gives (" in err


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
    ("serve", ("ServeConfig", "ModerationConfig")),
    ("chat", ("ModerationConfig",)),
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
    assert config_from_flags(GenerateConfig, args) == GenerateConfig()
    assert GenerateConfig().max_new_tokens is None  # unset: what the context leaves (resolve_max_new_tokens)


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


# --------------------------------------------------------------------------------------------------
# Issue 19: text that is not UTF-8, failures that print nothing but their error, defaults that fit the model,
# and the line that says what was loaded.
NOT_UTF8 = ("holds a lone surrogate U+DCFF at character 3 (as Python reads the byte 0xff of input that is not UTF-8), "
            "which is not valid Unicode and cannot be tokenized")


def test_prompt_bytes_that_are_not_utf8_are_one_error_line(bpe_checkpoint):
    # A real process, with the raw byte in argv: Python decodes it with surrogateescape.
    exe = Path(sys.executable).parent / "gptforge"
    done = subprocess.run([str(exe), "generate", "--checkpoint", str(bpe_checkpoint), "--prompt", b"KIN\xff"],
                          capture_output=True, timeout=120)
    assert done.returncode == EXIT_USER_ERROR
    assert done.stdout == b""
    assert done.stderr.decode() == f"error: --prompt {NOT_UTF8}\n"


@pytest.mark.parametrize("flags", [[], ["--json"], ["--num-samples", "2"], ["--num-beams", "2"]])
def test_a_lone_surrogate_in_any_generate_mode_is_refused_before_loading(capsys, bpe_checkpoint, flags):
    code, out, err = run(capsys, "generate", "--checkpoint", str(bpe_checkpoint), "--prompt", "KIN\udcff", *flags)
    assert (code, out, err) == (EXIT_USER_ERROR, "", f"error: --prompt {NOT_UTF8}\n")


def test_a_prompt_file_that_is_not_utf8_names_the_file_line_and_byte(capsys, bpe_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("ROMEO:\nJULIET: caf\xc3\xa9\nKING: \xe9t\xe9\n".encode("latin-1"))
    code, out, err = run(capsys, "generate", "--checkpoint", str(bpe_checkpoint), "--prompt-file", str(prompts))
    assert (code, out) == (EXIT_USER_ERROR, "")
    assert err == (f"error: prompt file {prompts} is not UTF-8: byte 0xe9 on line 3 is not valid UTF-8; "
                   "save the file as UTF-8\n")
    # a byte-order mark is not part of the first prompt
    prompts.write_bytes(b"\xef\xbb\xbfROMEO:\n")
    code, out, _ = run(capsys, "generate", "--checkpoint", str(bpe_checkpoint), "--prompt-file", str(prompts),
                       "--max-new-tokens", "2", "--json")
    assert code == 0 and json.loads(out)["prompt"] == "ROMEO:"


@pytest.mark.parametrize("prompt, flags, message", [
    ("KING:", ["--max-new-tokens", "200"], "prompt (3 tokens) + max_new_tokens (200) is longer than the model's "
                                           "context of 128 tokens; shorten the prompt or lower max_new_tokens"),
    ("KING: " * 100, [], "the prompt (400 tokens) leaves no room to generate in the model's context of 128 tokens; "
                         "shorten the prompt"),
    ("KING:", ["--seed", str(2**64)], f"seed must be a 64-bit signed integer (-2**63 .. 2**63-1), got {2**64}"),
    ("KING:", ["--min-new-tokens", "126"], "min_new_tokens (126) is more than the 125 new tokens the model's "
                                           "context of 128 tokens leaves after the prompt (3 tokens)"),
])
def test_a_failing_generate_prints_only_its_error(capsys, bpe_checkpoint, prompt, flags, message):
    code, out, err = run(capsys, "generate", "--checkpoint", str(bpe_checkpoint), "--prompt", prompt, *flags)
    assert out == ""  # not the prompt before the error (was "KING:error: ...")
    assert_one_line_error(code, err, message)


@pytest.mark.parametrize("flags, count", [
    ([], 125),                                         # one prompt, streamed
    (["--num-samples", "2", "--seed", "1"], 125),      # sampled sequences
    (["--num-beams", "2", "--temperature", "0"], 125),  # beam search
    (["--max-new-tokens", "40"], 40),                  # a given value is kept
])
def test_max_new_tokens_defaults_to_what_the_context_leaves(capsys, bpe_checkpoint, flags, count):
    code, out, err = run(capsys, "generate", "--checkpoint", str(bpe_checkpoint), "--prompt", "KING:",
                         "--ignore-eos", "--json", *flags)
    assert code == 0, err
    record = json.loads(out)
    assert record["completions"][0]["prompt_tokens"] == 3
    assert {len(c["token_ids"]) for c in record["completions"]} == {count}  # 128 - 3, not 200


def test_generate_says_which_checkpoint_it_loaded(capsys, bpe_checkpoint, tmp_path):
    code, out, err = run(capsys, "generate", "--checkpoint", str(bpe_checkpoint), "--prompt", "KING:",
                         "--max-new-tokens", "3")
    assert code == 0 and out.startswith("KING:")
    assert [line for line in err.splitlines() if line.startswith("loaded")] == [f"loaded {bpe_checkpoint}"]
    code, out, err = run(capsys, "-q", "generate", "--checkpoint", str(bpe_checkpoint), "--max-new-tokens", "3")
    assert code == 0 and err == ""  # -q: results only


def test_classify_says_what_it_loaded_and_refuses_text_that_is_not_utf8(capsys, bpe_classifier, tmp_path):
    code, out, err = run(capsys, "classify", "--checkpoint", str(bpe_classifier), "--text", "good", "--text", "KIN\udcff")
    assert (code, out, err) == (EXIT_USER_ERROR, "", f"error: --text {NOT_UTF8}\n")
    texts = tmp_path / "texts.txt"
    texts.write_bytes(b"good\nba\xffd\n")
    code, out, err = run(capsys, "classify", "--checkpoint", str(bpe_classifier), "--file", str(texts))
    assert (code, out) == (EXIT_USER_ERROR, "")
    assert err == f"error: text file {texts} is not UTF-8: byte 0xff on line 2 is not valid UTF-8; save the file as UTF-8\n"
    code, out, err = run(capsys, "classify", "--checkpoint", str(bpe_classifier), "--text", "good")
    assert code == 0 and out.startswith(("neg\t", "pos\t"))
    assert [line for line in err.splitlines() if line.startswith("loaded")] == [f"loaded {bpe_classifier}"]


def test_evaluate_names_the_data_file_holding_a_lone_surrogate(capsys, bpe_classifier, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "good", "label": "pos"}\n{"text": "KIN\\udcff", "label": "neg"}\n', encoding="utf-8")
    code, out, err = run(capsys, "evaluate", "--checkpoint", str(bpe_classifier), "--data", str(data))
    assert (code, out) == (EXIT_USER_ERROR, "")
    # the model is loaded (and says so) before the data is read; then one error line
    assert err == f"loaded {bpe_classifier}\nerror: data file {data}: the text {NOT_UTF8}\n"
    data.write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n', encoding="utf-8")
    code, out, err = run(capsys, "evaluate", "--checkpoint", str(bpe_classifier), "--data", str(data))
    assert code == 0 and out.startswith("val_loss ")
    assert [line for line in err.splitlines() if line.startswith("loaded")] == [f"loaded {bpe_classifier}"]
