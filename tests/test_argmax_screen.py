"""gptforge.inference.ArgmaxScreen: greedy decoding's argmax from an int8 copy of the LM head plus exact
float32 outputs of the few candidates; it must give exactly ``layer(x).argmax(-1)``, ties included."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn

from gptforge.config import GenerateConfig, ModelConfig
from gptforge.errors import ConfigError
from gptforge.generate import generate_ids
from gptforge.generate.batch import PromptBatch
from gptforge.inference import ArgmaxScreen, PackedLinear, panel_available, prepare_for_inference
from gptforge.model import GPT
from gptforge.native import amx_available

pytestmark = pytest.mark.skipif(not panel_available(), reason="the argmax screen needs the native panel kernel")
SCREEN_KERNELS = ["panel"] + (["amx"] if amx_available() else [])


def screened_layer(weight: torch.Tensor, kernel: str = "auto", dense: bool = False) -> PackedLinear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    layer = PackedLinear(lin, kernel="panel")
    layer.screened = True
    layer._screen = ArgmaxScreen(layer._packed, layer.out_features, lin.weight if dense else None, kernel=kernel)
    return layer


def full_argmax(layer: PackedLinear, x: torch.Tensor, suppress=None) -> torch.Tensor:
    logits = layer(x)
    if suppress is not None:
        logits[:, suppress] = float("-inf")
    return logits.argmax(-1)


@pytest.mark.parametrize("kernel", SCREEN_KERNELS)
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("isa", [-1, 0])  # the candidate scan's vector code, and its scalar code
@torch.no_grad()
def test_screen_equals_the_full_argmax(kernel, dense, isa):
    torch.manual_seed(0)
    n, k = 3000, 96
    weight = torch.randn(n, k) * 0.02
    weight[7] *= 40  # rows of very different scales
    weight[100:200] *= 1e-3
    layer = screened_layer(weight, kernel, dense)
    layer._screen.isa = isa
    candidates = []
    for rows in (1, 3, 8, 17):
        for scale in (1e-3, 1.0, 30.0):
            x = torch.randn(rows, k) * scale
            x[0, 5] = 50 * scale  # an outlier feature (what the amx split's grid follows)
            assert torch.equal(layer.argmax(x), full_argmax(layer, x))
            candidates.append(layer._screen.last_candidates)
            for suppress in (0, int(full_argmax(layer, x)[0])):
                assert torch.equal(layer.argmax(x, suppress), full_argmax(layer, x, suppress))
    # The screen really screens: most outputs are ruled out without their float32 product.
    assert 0 < min(candidates) and sorted(candidates)[len(candidates) // 2] < n // 20


@pytest.mark.parametrize("kernel", SCREEN_KERNELS)
@pytest.mark.parametrize("isa", [-1, 0])
@torch.no_grad()
def test_ties_and_near_ties_give_the_first_largest_as_torch_argmax(kernel, isa):
    torch.manual_seed(1)
    n, k = 512, 64
    weight = torch.randn(n, k) * 0.05
    weight[300] = weight[40]  # exact ties: equal outputs for every x
    weight[41] = weight[40]
    weight[42] = torch.nextafter(weight[40], torch.full_like(weight[40], 1.0))  # one ulp apart
    weight[43] = weight[40] * (1 + 1e-7)
    layer = screened_layer(weight, kernel)
    layer._screen.isa = isa
    for trial in range(40):
        x = torch.randn(2, k)
        # Point x at row 40 so that its group wins; in one row only, so rows' candidates differ.
        x[0] = weight[40] * (20 + trial) + 1e-3 * torch.randn(k)
        got, want = layer.argmax(x), full_argmax(layer, x)
        assert torch.equal(got, want), (trial, got, want)
        assert int(got[0]) in (40, 41, 42, 43)


@torch.no_grad()
def test_fallbacks_give_the_same_answer():
    torch.manual_seed(2)
    weight = torch.randn(700, 48)
    layer = screened_layer(weight)
    x = torch.randn(4, 48)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    # NaN and inf rows: the full layer's argmax (NaN logits: torch.argmax's answer), other rows as well.
    for isa in (-1, 0):
        layer._screen.isa = isa
        assert torch.equal(layer.argmax(x), full_argmax(layer, x))
    x = torch.randn(4, 48)
    layer._screen.max_candidates = 0  # too many candidates: the full layer
    assert torch.equal(layer.argmax(x), full_argmax(layer, x))
    zero = torch.zeros(2, 48)  # all outputs equal: candidates are everything, the answer is 0
    layer._screen.max_candidates = 10
    assert layer.argmax(zero).tolist() == [0, 0]


def test_screen_refusals():
    lin = nn.Linear(16, 40, bias=False)
    layer = PackedLinear(lin, kernel="panel")
    with pytest.raises(ConfigError, match="auto, amx or panel"):
        ArgmaxScreen(layer._packed, 40, kernel="fast")
    biased = PackedLinear(nn.Linear(16, 40), kernel="panel")
    assert not biased.enable_argmax_screen() and not biased.screened
    with torch.no_grad():
        lin.weight[3, 3] = float("inf")
    assert not PackedLinear(lin, kernel="panel").enable_argmax_screen()
    other = nn.Linear(16, 40, bias=False)
    layer = PackedLinear(nn.Linear(16, 40, bias=False), kernel="panel")
    assert layer.enable_argmax_screen(other.weight) and layer._screen._dense is None  # not its weight


@torch.no_grad()
def test_screen_follows_new_weights_copies_and_pickles():
    torch.manual_seed(3)
    first, second = torch.randn(300, 32), torch.randn(300, 32)
    layer = screened_layer(first)
    layer.enable_argmax_screen()
    layer.load_state_dict({"weight": second})
    x = torch.randn(5, 32)
    assert layer.screened and torch.equal(layer.argmax(x), (x @ second.T).argmax(-1))
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert other.screened and other._screen is not layer._screen
        assert torch.equal(other.argmax(x), layer.argmax(x))
    assert list(layer.state_dict()) == ["weight"]


def gpt(seed: int = 0, vocab: int = 2000) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=96, vocab_size=vocab)).eval()


@torch.no_grad()
def test_prepare_for_inference_screens_the_tied_head_and_greedy_tokens_are_unchanged():
    plain = gpt()
    screened = prepare_for_inference(copy.deepcopy(plain))
    unscreened = prepare_for_inference(copy.deepcopy(plain), argmax_screen=False)
    assert screened.lm_head.screened and not unscreened.lm_head.screened
    assert screened.lm_head._screen._dense is screened.wte.weight  # candidates' rows from the embedding
    screen = screened.lm_head._screen
    prepare_for_inference(screened)  # again: nothing to redo
    assert screened.lm_head._screen is screen
    assert set(screened.state_dict()) == set(plain.state_dict())
    prompts = [[5, 17, 2], [9, 8, 7, 6, 5, 4, 3], [60]]
    calls = []
    original = screened.greedy_tokens
    screened.greedy_tokens = lambda *a, **k: calls.append(1) or original(*a, **k)
    for config in (GenerateConfig(max_new_tokens=40, temperature=0.0),
                   GenerateConfig(max_new_tokens=40, min_new_tokens=20, temperature=0.0)):
        want = [c[0].token_ids for c in generate_ids(plain, prompts, config, eos_id=1)]
        assert [c[0].token_ids for c in generate_ids(screened, prompts, config, eos_id=1)] == want
        assert [c[0].token_ids for c in generate_ids(unscreened, prompts, config, eos_id=1)] == want
    assert len(calls) >= 60  # the greedy steps went through the screen
    # Controls that need the logits take the full head (and still agree).
    calls.clear()
    for config in (GenerateConfig(max_new_tokens=10, temperature=0.0, logprobs=2),
                   GenerateConfig(max_new_tokens=10, temperature=0.0, repetition_penalty=1.3),
                   GenerateConfig(max_new_tokens=10, temperature=0.8, seed=3)):
        got = generate_ids(screened, prompts, config)
        want = generate_ids(unscreened, prompts, config)
        assert [c[0].token_ids for c in got] == [c[0].token_ids for c in want]
    assert not calls


@torch.no_grad()
def test_greedy_tokens_without_a_screen_is_the_logits_argmax():
    model = gpt(1)
    batch = PromptBatch(model, [[3, 4, 5]], GenerateConfig(max_new_tokens=4, temperature=0.0))
    assert not batch.screened
    hidden = model.hidden_states(torch.tensor([[3, 4, 5]]))[:, -1]
    logits = model.lm_head(hidden)
    assert torch.equal(model.greedy_tokens(hidden), logits.argmax(-1))
    best = int(logits.argmax(-1))
    logits[:, best] = float("-inf")
    assert torch.equal(model.greedy_tokens(hidden, suppress=best), logits.argmax(-1))


@pytest.mark.skipif(not amx_available(), reason="no AMX-INT8 here")
@torch.no_grad()
def test_the_amx_input_split_is_within_the_screens_assumption():
    # The bound assumes the amx kernel sees each input within max|x| / (127 * 500) of its value. With the
    # identity as weight (exactly on the int8 grid: q = 127, scale 1/127) the kernel returns those inputs.
    torch.manual_seed(4)
    k = 128
    layer = screened_layer(torch.eye(k), kernel="amx")
    x = torch.randn(6, k) * torch.tensor([1e-3, 1.0, 7.0, 1e3, 1.0, 1.0])[:, None]
    x[4, 0] = 100.0  # one outlier: a coarse grid for the rest of its row
    seen = layer._screen._int8(x, None)
    limit = x.abs().amax(dim=1, keepdim=True) / (127 * 500)
    error = (seen.double() - x.double()).abs()
    assert bool((error <= limit).all())
    assert float((error / limit).max()) > 0.5  # the assumption is tight: the bound must keep its split term
