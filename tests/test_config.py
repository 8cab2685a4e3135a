"""Config schemas: presets, YAML files, --section.key=value overrides, type and range checks."""

import dataclasses
import re

import pytest

from gptforge.config import (MODEL_PRESETS, GenerateConfig, ModelConfig, describe_config, load_run_config,
                             resolve_config_path)
from gptforge.errors import ConfigError


def test_gpt2_presets_have_the_published_shapes():
    expected = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
                "gpt2-xl": (48, 25, 1600)}
    for name, (n_layer, n_head, n_embd) in expected.items():
        c = ModelConfig.from_preset(name)
        assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (n_layer, n_head, n_embd, 1024, 50257)


def test_every_preset_validates():
    for name in MODEL_PRESETS:
        ModelConfig.from_preset(name, vocab_size=100)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {preset: tiny, dropout: 0.2}\ntrain: {max_steps: 50}\n")
    c = load_run_config(path, ["--train.max_steps=7", "train.learning_rate=3e-4", "--model.bias=false",
                               "--data.dir=elsewhere", "--train.lr_decay_steps=null"])
    assert c.preset == "tiny"
    assert c.model.n_layer == MODEL_PRESETS["tiny"]["n_layer"]
    assert c.model.dropout == 0.2 and c.model.bias is False
    assert c.train.max_steps == 7 and c.train.learning_rate == pytest.approx(3e-4)
    assert c.train.lr_decay_steps is None and c.data.dir == "elsewhere"


def test_packaged_presets_resolve_by_name():
    assert resolve_config_path("demo").name == "demo.yaml"
    c = load_run_config("gpt2-124m")
    assert c.model.n_embd == 768 and c.train.grad_accum_steps == 40


@pytest.mark.parametrize("overrides, message", [
    (["--train.max_step=5"], "unknown config key train.max_step (did you mean train.max_steps?)"),
    (["--trian.max_steps=5"], "unknown config section 'trian'"),
    (["--train.max_steps=five"], "train.max_steps must be an integer, got 'five'"),
    (["--train.max_steps=2.5"], "train.max_steps must be an integer"),
    (["--train.max_steps=0"], "train.max_steps must be at least 1, got 0"),
    (["--train.learning_rate=-1"], "train.learning_rate must be a positive number"),
    (["--train.compile=maybe"], "train.compile must be true or false"),
    (["--model.dropout=1.5"], "model.dropout must be in [0.0, 1.0)"),
    (["--model.n_head=5"], "model.n_embd (128) must be divisible by model.n_head (5)"),
    (["--model.preset=gpt3"], "unknown model preset 'gpt3'"),
    (["--train.dtype=int8"], "train.dtype must be auto, float32, bfloat16 or float16"),
    (["--train.device=tpu"], "train.device must be auto, cpu, cuda or cuda:N"),
    (["--train.learning_rate=nan"], "train.learning_rate must be a finite number"),
    (["train.max_steps"], "must look like --section.key=value"),
])
def test_bad_overrides_name_the_problem(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_run_config("demo", overrides)
    assert message in str(err.value)


def test_unknown_preset_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file 'nope.yaml' not found"):
        load_run_config("nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_run_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_run_config(listy)
    section = tmp_path / "section.yaml"
    section.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="config section 'model' must be a mapping"):
        load_run_config(section)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(top_k=0), "top_k must be at least 1"),
    (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
    (dict(num_return_sequences=0), "num_return_sequences must be at least 1"),
    (dict(seed=2**64), "seed must be a 64-bit signed integer"),
    (dict(seed=-2**63 - 1), "seed must be a 64-bit signed integer"),
])
def test_generate_config_ranges(kwargs, message):
    with pytest.raises(ConfigError) as err:
        GenerateConfig(**kwargs).validate()
    assert message in str(err.value)


def test_describe_config_lists_keys_with_docs():
    text = describe_config()
    assert "train.max_steps: int = 1000" in text
    assert "Optimizer steps to run." in text
    assert "model.n_embd" in text


def test_pretraining_and_fine_tuning_share_each_loop_and_optimizer_option():
    from gptforge.config import FinetuneConfig, LoopConfig, OptimizerConfig, TrainConfig, field_docs

    shared = {f.name for piece in (LoopConfig, OptimizerConfig) for f in dataclasses.fields(piece)}
    assert len(shared) == 20  # 18 + max_nonfinite_steps, allow_resume_changes (issue 19)
    for cls in (TrainConfig, FinetuneConfig):
        assert shared <= {f.name for f in dataclasses.fields(cls)}
        docs = field_docs(cls)
        assert all(docs.get(name) == field_docs(piece).get(name) for piece in (LoopConfig, OptimizerConfig)
                   for name in (f.name for f in dataclasses.fields(piece)))  # the piece's docstring, everywhere
    # Fine-tuning keeps its own defaults for the shared options.
    ft, tc = FinetuneConfig(), TrainConfig()
    assert (ft.learning_rate, ft.beta2, ft.max_steps, ft.tensorboard) == (5e-4, 0.999, 200, False)
    assert (tc.learning_rate, tc.beta2, tc.max_steps, tc.tensorboard) == (1e-3, 0.95, 1000, True)


@pytest.mark.parametrize("section", ["train", "finetune"])
def test_a_shared_option_is_checked_under_its_section_name(section):
    from gptforge.config import FinetuneConfig, TrainConfig

    made = TrainConfig() if section == "train" else FinetuneConfig(checkpoint="x", train_file="y")
    for key, value, message in (("grad_clip", -1.0, "grad_clip must be >= 0"),
                                ("batch_size", 0, "batch_size must be at least 1"),
                                ("beta2", 1.0, "beta2 must be in [0.0, 1.0)"), ("dtype", "int8", "dtype must be auto")):
        with pytest.raises(ConfigError, match=re.escape(f"{section}.{message}")):
            dataclasses.replace(made, **{key: value}).validate()


@pytest.mark.parametrize("space, message", [
    (dict(lora_rank=[4, 0]), "tune.lora_rank holds 0, which fine-tuning refuses: finetune.lora_rank must be at least 1"),
    (dict(lora_rank=[]), "tune.lora_rank must be a non-empty list of ranks"),
    (dict(learning_rate=[0.0, 1e-2]), "tune.learning_rate holds 0.0"),
    (dict(dropout=[0.1, 1.0]), "tune.dropout holds 1.0, which fine-tuning refuses: finetune.dropout must be in"),
    (dict(weight_decay=[-0.1, 0.1]), "tune.weight_decay holds -0.1"),
    (dict(warmup_steps=[5, 2]), "tune.warmup_steps must be [low, high] with low <= high"),
])
def test_a_search_space_is_checked_by_the_fine_tuning_options_it_draws(space, message):
    from gptforge.config import FinetuneConfig, TuneConfig

    with pytest.raises(ConfigError, match=re.escape(message)):
        TuneConfig(**space).validate_against(FinetuneConfig(checkpoint="x", train_file="y", strategy="lora"))
    TuneConfig(lora_rank=[2, 4]).validate_against(FinetuneConfig(checkpoint="x", train_file="y"))


def test_temperature_has_one_default_that_beam_search_turns_greedy():
    assert GenerateConfig().temperature == 0.8
    assert GenerateConfig(num_beams=3).validate().temperature == 0.0
    assert GenerateConfig(num_beams=3, temperature=0.0).temperature == 0.0
    with pytest.raises(ConfigError, match="beam search is deterministic"):
        GenerateConfig(num_beams=3, temperature=0.8).validate()


def test_inference_choices_are_declared_once_on_the_field():
    from gptforge.config import INFERENCE_DTYPES, KV_CACHE_DTYPES, InferenceConfig, ServeConfig, flag_spec
    import dataclasses

    specs = {f.name: flag_spec(f) for f in dataclasses.fields(ServeConfig)}
    assert specs["dtype"].choices == INFERENCE_DTYPES and specs["kv_cache_dtype"].choices == KV_CACHE_DTYPES
    assert specs["checkpoint"].required and "--cors-origin" in specs["cors_origins"].aliases
    with pytest.raises(ConfigError, match="dtype must be auto, float32, bfloat16 or float16, got 'int8'"):
        InferenceConfig(checkpoint="x", dtype="int8").validate()
    with pytest.raises(ConfigError, match="quantize must be int8 or null, got 'int4'"):
        ServeConfig(checkpoint="x", quantize="int4").validate()
    with pytest.raises(ConfigError, match="no model to load"):
        ServeConfig().validate()


def test_field_docs_include_the_fields_a_config_extends():
    from gptforge.config import ServeConfig, field_docs

    docs = field_docs(ServeConfig)
    assert docs["device"].startswith("auto (CUDA when present") and docs["port"] == "TCP port to listen on."
    assert "\n" not in docs["batch_invariant"]  # a docstring over several lines reads as one
