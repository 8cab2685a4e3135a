"""gptforge.backends.cpu.ArgmaxScreen: greedy decoding's argmax from an int8 copy of the LM head plus exact
float32 outputs of the few candidates; it must give exactly ``layer(x).argmax(-1)``, ties included."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch
import torch.nn as nn

from gptforge.config import GenerateConfig, ModelConfig
from gptforge.errors import ConfigError
from gptforge.generate import generate_ids
from gptforge.backends import prepare_for_inference
from gptforge.backends.cpu import ArgmaxScreen, PackedLinear, amx_available, panel_available
from gptforge.model import GPT

SCREEN_KERNELS = ["panel", "amx"]


@pytest.fixture(autouse=True)
def _skip_missing_screen_kernel(request):
    """Skip every test without the native panel kernel, and one parametrized with the amx screen kernel
    where there is no AMX-INT8. Asked when a test runs, never at import: collecting builds nothing."""
    if not panel_available():
        pytest.skip("the argmax screen needs the native panel kernel")
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("kernel") == "amx" and not amx_available():
        pytest.skip("no AMX-INT8 here")


@pytest.fixture()
def needs_amx():
    if not amx_available():
        pytest.skip("no AMX-INT8 here")


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
@pytest.mark.parametrize("isa", [-1, 1, 0])  # the row scans' best vector code, AVX2 at most, the scalar code
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
@pytest.mark.parametrize("isa", [-1, 1, 0])
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
    for isa in (-1, 1, 0):
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
    original = screened.lm_head.argmax
    screened.lm_head.argmax = lambda *a, **k: calls.append(1) or original(*a, **k)
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
                   GenerateConfig(max_new_tokens=10, temperature=0.8, top_k=50, seed=3)):
        got = generate_ids(screened, prompts, config)
        want = generate_ids(unscreened, prompts, config)
        assert [c[0].token_ids for c in got] == [c[0].token_ids for c in want]
    assert not calls


@pytest.mark.usefixtures("needs_amx")
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


# ---- sampling through the screen ------------------------------------------------------------------------
def draws(layer: PackedLinear, x: torch.Tensor, temperature: float, calls: int, suppress: int = -1) -> torch.Tensor:
    """Counts of ``calls`` x rows(x) draws for one input row repeated, each draw with its own seed."""
    rows = x.shape[0]
    counts = torch.zeros(layer.out_features, dtype=torch.float64)
    for c in range(calls):
        seeds = torch.arange(c * rows, (c + 1) * rows, dtype=torch.long) * 7919 + 11
        tokens = layer.sample(x, torch.full((rows,), temperature, dtype=torch.float64), seeds,
                              torch.full((rows,), suppress, dtype=torch.long))
        counts += torch.bincount(tokens, minlength=layer.out_features).double()
    return counts


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    expected = probs * counts.sum()
    keep = expected >= 5
    assert counts[~keep].sum() <= max(20.0, 3 * float(expected[~keep].sum()))  # the rare tokens stay rare
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("kernel", SCREEN_KERNELS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@torch.no_grad()
def test_screened_sampling_draws_from_the_layers_softmax(kernel, temperature):
    # Each output's weights hold an outlier of its own size where the input is 0: int8 steps, hence bounds,
    # of very different widths with no say in the outputs. So the proposal (from the upper ends) is far from
    # the softmax (20,000 draws from it would give a chi-square of about 12,000), and only the acceptance
    # step makes the draws right.
    torch.manual_seed(5)
    n, k = 48, 64
    weight = torch.randn(n, k) * 0.1
    weight[:, 0] = torch.logspace(-1, 1.5, n)[torch.randperm(n)]
    layer = screened_layer(weight, kernel)
    x = torch.randn(1, k) * 0.5 * temperature
    x[0, 0] = 0.0
    x = x.repeat(400, 1)
    probs = (layer(x[:1]).double()[0] / temperature).softmax(-1)
    assert float(probs.max()) < 0.5 and int((probs * 20000 >= 5).sum()) >= 20  # a spread distribution
    counts = draws(layer, x, temperature, 50)  # 20,000 draws
    stat, dof = chi_square(counts, probs)
    assert stat < dof + 6 * (2 * dof) ** 0.5, (stat, dof)
    assert layer._screen.last_proposals >= 400


@torch.no_grad()
def test_screened_sampling_respects_suppress_and_falls_back_exactly():
    torch.manual_seed(6)
    n, k = 40, 24
    layer = screened_layer(torch.randn(n, k) * 0.3)
    x = torch.randn(1, k).repeat(500, 1)
    logits = layer(x[:1]).double()[0]
    top = int(logits.argmax())
    counts = draws(layer, x, 1.0, 20, suppress=top)
    assert counts[top] == 0
    probs = logits.index_fill(0, torch.tensor([top]), float("-inf")).softmax(-1)
    stat, dof = chi_square(counts, probs)
    assert stat < dof + 6 * (2 * dof) ** 0.5
    # No proposal allowed: every row is drawn from the full layer, with a generator seeded by its seed.
    layer._screen.max_tries = 0
    counts = draws(layer, x, 1.0, 20, suppress=top)
    assert counts[top] == 0 and layer._screen.last_proposals == 0
    stat, dof = chi_square(counts, probs)
    assert stat < dof + 6 * (2 * dof) ** 0.5
    # A temperature so low against the bounds that proposals are nearly always rejected: the full layer
    # takes over after max_tries proposals a row, and the draw is still the softmax's (here its argmax).
    layer._screen.max_tries = 64
    cold = layer.sample(x[:8], torch.full((8,), 1e-4, dtype=torch.float64), torch.arange(8), torch.full((8,), -1))
    assert torch.equal(cold, logits.argmax().repeat(8)) and layer._screen.last_proposals <= 8 * 64
    seeds = torch.tensor([3, 4, 3])
    t = torch.ones(3, dtype=torch.float64)
    a = layer.sample(x[:3], t, seeds, torch.full((3,), -1))
    assert torch.equal(a, layer.sample(x[:3], t, seeds, torch.full((3,), -1))) and a[0] == a[2]


@pytest.mark.parametrize("dense", [False, True])
@torch.no_grad()
def test_screened_sampling_is_row_independent_and_the_same_in_scalar_code(dense):
    torch.manual_seed(7)
    n, k = 3001, 64  # 47 blocks of 64 and a partial one
    layer = screened_layer(torch.randn(n, k) * 0.05, dense=dense)
    x = torch.randn(9, k) * 3
    x[4, 0] = float("inf")  # a non-finite row: drawn from the full layer; the others unaffected
    t = torch.tensor([0.3, 0.7, 1.0, 1.5, 1.0, 1.0, 2.0, 0.9, 1.1], dtype=torch.float64)
    seeds = torch.arange(9) * 1000003 + 17
    suppress = torch.tensor([-1, 5, -1, -1, -1, 3000, -1, 0, -1])
    got = layer.sample(x, t, seeds, suppress)
    assert 0 <= int(got.min()) and int(got.max()) < n
    for r in range(9):
        assert layer.sample(x[r:r + 1], t[r:r + 1], seeds[r:r + 1], suppress[r:r + 1])[0] == got[r]
    for isa in (1, 0):  # AVX2 at most, and the scalar code: the same weights and sums, the same draws
        layer._screen.isa = isa
        assert torch.equal(layer.sample(x, t, seeds, suppress), got)
    layer._screen.isa = -1
    other = layer.sample(x, t, seeds + 1, suppress)
    assert not torch.equal(other, got)  # the seed decides


@torch.no_grad()
def test_engine_samples_through_the_screen_reproducibly(monkeypatch):
    plain = gpt(3)
    screened = prepare_for_inference(copy.deepcopy(plain))
    calls = []
    original = PackedLinear.sample
    monkeypatch.setattr(PackedLinear, "sample", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    prompts = [[5, 17, 2], [9, 8, 7, 6, 5, 4, 3]]
    config = GenerateConfig(max_new_tokens=30, temperature=0.9, seed=5, num_return_sequences=3)
    first = generate_ids(screened, prompts, config, eos_id=1)
    assert len(calls) >= 30
    assert [[c.token_ids for c in p] for p in first] == [[c.token_ids for c in p]
                                                         for p in generate_ids(screened, prompts, config, eos_id=1)]
    # Asking for log-probabilities forms the logits besides, and changes no token.
    logged = generate_ids(screened, prompts, dataclasses.replace(config, logprobs=2), eos_id=1)
    assert [[c.token_ids for c in p] for p in logged] == [[c.token_ids for c in p] for p in first]
    assert all(len(c.logprobs) == len(c.token_ids) for p in logged for c in p)
    # Row i of a seeded request draws with seed + i whatever else runs: row 1 of seed 5 is row 0 of seed 6.
    alone = generate_ids(screened, prompts[:1], GenerateConfig(max_new_tokens=30, temperature=0.9, seed=6), eos_id=1)
    assert alone[0][0].token_ids == first[0][1].token_ids
    # min_new_tokens bans end-of-text through the screen too.
    banned = GenerateConfig(max_new_tokens=20, min_new_tokens=20, temperature=5.0, seed=1)
    for row in generate_ids(screened, prompts, banned, eos_id=1):
        assert len(row[0].token_ids) == 20 and 1 not in row[0].token_ids
    # Warpers need the logits: no screened draw.
    calls.clear()
    generate_ids(screened, prompts, GenerateConfig(max_new_tokens=5, temperature=0.9, top_p=0.9, seed=5))
    assert not calls
