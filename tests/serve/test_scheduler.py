"""The scheduler's batched token choice: every row gets what it gets alone, whatever shares the step."""

from __future__ import annotations

import threading

import pytest
import torch

from gptforge.config import GenerateConfig, ModelConfig
from gptforge.backends import prepare_for_inference
from gptforge.backends.cpu import panel_available
from gptforge.model import GPT
from gptforge.serve.scheduler import Scheduler, Sequence
from gptforge.tokenizer import CharTokenizer

CHARS = list("abcdefghijklmnopqrstuvwxyz .,\n")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    tokenizer = CharTokenizer(CHARS)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=96, n_layer=2, n_head=2, n_embd=32)).eval()
    return prepare_for_inference(model), tokenizer


def run(model, tokenizer, jobs: list[tuple[str, GenerateConfig, int | None]], *, batch_invariant: bool = True,
        ragged: bool | None = None) -> list[list[int]]:
    """The tokens each (prompt, config, seed) job gets when all are submitted to one scheduler together
    (``ragged=False``: one forward a row, as where the linear layers are not batch-invariant)."""
    scheduler = Scheduler(model, tokenizer, max_batch_size=16, batch_invariant=batch_invariant)
    if ragged is not None:
        scheduler._ragged = ragged
    scheduler.start()
    return collect(scheduler, lambda sink_for: [Sequence(tokenizer.encode(prompt), config, sink_for(j), seed=seed)
                                                for j, (prompt, config, seed) in enumerate(jobs)])


def collect(scheduler: Scheduler, make) -> list[list[int]]:
    """Submit ``make(sink_for)`` (sequences whose sink j is ``sink_for(j)``) to the started ``scheduler``, wait
    for all to finish, stop it; each sequence's token ids."""
    tokens: list[list[int]] = []
    done = threading.Semaphore(0)

    def sink_for(j):
        tokens.extend([] for _ in range(j + 1 - len(tokens)))

        def sink(event):
            if event.token_id is not None:
                tokens[j].append(event.token_id)
            if event.finish_reason is not None:
                done.release()
        return sink

    try:
        sequences = make(sink_for)
        scheduler.submit(sequences)
        for _ in sequences:
            assert done.acquire(timeout=60)
    finally:
        scheduler.stop(timeout=10)
    return tokens


def test_batched_choice_equals_each_row_alone(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    plain = GenerateConfig(max_new_tokens=12, temperature=1.0, ignore_eos=True)
    jobs = [
        ("the cat", plain, 1), ("a dog ran", plain, 2), ("x", plain, 3),  # one batched group
        ("the cat", GenerateConfig(max_new_tokens=9, temperature=0.7, top_k=5, ignore_eos=True), 4),
        ("sea", GenerateConfig(max_new_tokens=9, temperature=0.7, top_k=5, ignore_eos=True), 5),
        ("hello", GenerateConfig(max_new_tokens=10, temperature=1.3, top_p=0.8, min_p=0.05, ignore_eos=True), 6),
        ("the cat", GenerateConfig(max_new_tokens=12, temperature=1.0, presence_penalty=1.5,
                                   frequency_penalty=0.5, ignore_eos=True), 7),  # penalties: the concatenated path
        ("the cat", GenerateConfig(max_new_tokens=12, temperature=1.0, repetition_penalty=1.3, ignore_eos=True), 8),
        ("abc", GenerateConfig(max_new_tokens=8, temperature=0.0, ignore_eos=True), None),
        ("zzz", GenerateConfig(max_new_tokens=11, temperature=0.0, ignore_eos=True), None),
    ]
    together = run(model, tokenizer, jobs)
    alone = [run(model, tokenizer, [job])[0] for job in jobs]
    assert together == alone
    assert [len(t) for t in together] == [job[1].max_new_tokens for job in jobs]
    assert len({tuple(t) for t in together[:3]}) == 3  # seeds differ, so do the samples


def test_rows_all_alike_take_the_unconcatenated_path(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    config = GenerateConfig(max_new_tokens=10, temperature=0.9, ignore_eos=True)
    jobs = [(prompt, config, seed) for seed, prompt in enumerate(["one", "two two", "three", "four"])]
    assert run(model, tokenizer, jobs) == [run(model, tokenizer, [job])[0] for job in jobs]


@pytest.mark.skipif("not panel_available()", reason="the argmax screen needs the native panel kernel")
def test_all_greedy_steps_read_the_argmax_screen_and_give_the_engines_tokens(model_and_tokenizer, monkeypatch):
    from gptforge.generate import generate

    model, tokenizer = model_and_tokenizer
    assert model.lm_head.screened
    calls = []
    head = type(model.lm_head)
    original = head.argmax
    monkeypatch.setattr(head, "argmax", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    greedy = GenerateConfig(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = ["the cat", "a dog ran far", "x", "hello there", "sea"]
    together = run(model, tokenizer, [(p, greedy, None) for p in prompts])
    assert len(calls) >= 11  # every decode step of the all-greedy batch
    want = [generate(model, tokenizer, p, greedy)[0][0].token_ids for p in prompts]
    assert together == want
    # A mixed batch: the greedy rows still read the screen, a plain sampled row is drawn through it as the
    # engine draws it (the head's sample), and a row that needs its logits (a penalty) gets them; each row
    # gets what it gets alone.
    calls.clear()
    draws = []
    original_sample = head.sample
    monkeypatch.setattr(head, "sample", lambda self, *a, **k: draws.append(1) or original_sample(self, *a, **k))
    sampled = GenerateConfig(max_new_tokens=14, temperature=1.0, ignore_eos=True)
    penalized = GenerateConfig(max_new_tokens=9, temperature=0.0, repetition_penalty=1.3, ignore_eos=True)
    logged = GenerateConfig(max_new_tokens=10, temperature=0.7, logprobs=1, ignore_eos=True)
    mixed = run(model, tokenizer, [(p, greedy, None) for p in prompts]
                + [("zz", sampled, 3), ("qq", penalized, None), ("zz", logged, 3)])
    assert len(calls) >= 11 and len(draws) >= 13
    assert mixed[:5] == want
    seeded = GenerateConfig(max_new_tokens=14, temperature=1.0, ignore_eos=True, seed=3)
    assert mixed[5] == generate(model, tokenizer, "zz", seeded)[0][0].token_ids
    assert mixed[6] == generate(model, tokenizer, "qq", penalized)[0][0].token_ids
    # A sampled row with log-probabilities draws through the screen too (and its logits are formed besides).
    assert mixed[7] == generate(model, tokenizer, "zz", GenerateConfig(max_new_tokens=10, temperature=0.7,
                                                                      ignore_eos=True, seed=3))[0][0].token_ids


def test_event_pump_delivers_every_event_in_order_with_few_wakeups():
    import asyncio

    from gptforge.serve.app import _EventPump

    async def main():
        loop = asyncio.get_running_loop()
        pump = _EventPump.of(loop)
        assert _EventPump.of(loop) is pump
        queues = [asyncio.Queue(), asyncio.Queue()]
        wakeups = 0
        original = loop.call_soon_threadsafe

        def counting(*args, **kwargs):
            nonlocal wakeups
            wakeups += 1
            return original(*args, **kwargs)

        loop.call_soon_threadsafe = counting
        try:
            def producer():
                for i in range(200):
                    pump.put(queues[i % 2], i)

            thread = threading.Thread(target=producer)
            thread.start()
            got = [[], []]
            for _ in range(200):
                for q, out in zip(queues, got):
                    while not q.empty():
                        out.append(q.get_nowait())
                if len(got[0]) + len(got[1]) == 200:
                    break
                await asyncio.sleep(0.005)
            thread.join()
        finally:
            del loop.call_soon_threadsafe
        assert got == [list(range(0, 200, 2)), list(range(1, 200, 2))]
        assert 1 <= wakeups < 200

    asyncio.run(main())


@pytest.mark.skipif("not panel_available()", reason="the argmax screen needs the native panel kernel")
def test_every_decode_path_chooses_through_the_screen_alike(model_and_tokenizer):
    # One forward a row hands the screen its hidden states as the ragged batch does: the same tokens, greedy
    # and seeded samples alike. The padded batch of --no-batch-invariant (equal only up to rounding) runs
    # through it too.
    model, tokenizer = model_and_tokenizer
    jobs = [("the cat", GenerateConfig(max_new_tokens=9, temperature=0.0, ignore_eos=True), None),
            ("a dog ran", GenerateConfig(max_new_tokens=12, temperature=1.0, ignore_eos=True), 4),
            ("x", GenerateConfig(max_new_tokens=7, temperature=0.6, logprobs=1, ignore_eos=True), 5),
            ("sea", GenerateConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, ignore_eos=True), 6)]
    ragged = run(model, tokenizer, jobs)
    assert run(model, tokenizer, jobs, ragged=False) == ragged
    padded = run(model, tokenizer, jobs, batch_invariant=False)
    assert [len(t) for t in padded] == [9, 12, 7, 8]


@pytest.mark.parametrize("config", [GenerateConfig(max_new_tokens=8, temperature=0.0, ignore_eos=True),
                                    GenerateConfig(max_new_tokens=8, temperature=0.9, ignore_eos=True),
                                    GenerateConfig(max_new_tokens=8, temperature=0.9, top_k=5, ignore_eos=True)])
def test_a_requests_choices_share_one_prefill(model_and_tokenizer, monkeypatch, config):
    model, tokenizer = model_and_tokenizer
    prefills = []
    original = type(model).hidden_states
    monkeypatch.setattr(type(model), "hidden_states",
                        lambda self, idx, **k: (prefills.append(idx.shape[1]) if idx.shape[1] > 1 else None)
                        or original(self, idx, **k))
    ids = tokenizer.encode("the quick brown fox")
    alone = [run(model, tokenizer, [("the quick brown fox", config, 10 + i)])[0] for i in range(3)]
    assert len(prefills) == 3
    prefills.clear()
    scheduler = Scheduler(model, tokenizer, max_batch_size=2).start()  # the third choice waits a step
    group = object()
    tokens = collect(scheduler, lambda sink_for: [
        Sequence(ids, config, sink_for(i), index=i, seed=10 + i, prefill_group=group) for i in range(3)]
        + [Sequence(ids, config, sink_for(3), seed=10)])
    assert tokens[:3] == alone and tokens[3] == alone[0]
    assert prefills == [len(ids), len(ids)]  # once for the group (across two admissions), once for the other
    assert scheduler.stats.prompt_tokens == 2 * len(ids) and scheduler._group_prefill is None


def test_start_releases_the_calling_threads_openmp_pool(model_and_tokenizer, monkeypatch):
    # The thread that starts the scheduler usually loaded the model; its idle OpenMP workers would make the
    # scheduler thread's workers sleep between parallel ops (gptforge.runtime.release_thread_pool).
    from gptforge.serve import scheduler as scheduler_module

    model, tokenizer = model_and_tokenizer
    calls = []
    monkeypatch.setattr(scheduler_module, "release_thread_pool", lambda: calls.append(threading.current_thread()) or True)
    scheduler = Scheduler(model, tokenizer)
    scheduler.start()
    scheduler.stop(timeout=10)
    assert calls == [threading.current_thread()]


def test_batch_invariance_is_on_by_default_on_cpu(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    assert Scheduler(model, tokenizer).batch_invariant is True
    assert Scheduler(model, tokenizer, batch_invariant=False).batch_invariant is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_invariance_is_off_by_default_on_a_gpu():
    tokenizer = CharTokenizer(CHARS)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)).cuda()
    assert Scheduler(model, tokenizer).batch_invariant is False
    assert Scheduler(model, tokenizer, batch_invariant=True).batch_invariant is True


def test_a_failing_decode_step_fails_its_rows_and_the_scheduler_serves_on(model_and_tokenizer, monkeypatch):
    """An exception in a decode step (out of memory, say) used to end the scheduler thread: every later request
    got 503 until a restart. Now the rows of that step end with "error" and the next requests are served."""
    model, tokenizer = model_and_tokenizer
    scheduler = Scheduler(model, tokenizer, max_batch_size=4).start()
    config = GenerateConfig(max_new_tokens=6, temperature=0)
    decode = scheduler._decode
    calls = []

    def failing_once():
        calls.append(len(scheduler._running))
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        decode()

    monkeypatch.setattr(scheduler, "_decode", failing_once)
    events: list[list] = [[], []]
    finished = threading.Semaphore(0)

    def sink_for(j):
        def sink(event):
            events[j].append(event)
            if event.finish_reason is not None:
                finished.release()
        return sink

    try:
        scheduler.submit([Sequence(tokenizer.encode("abc"), config, sink_for(0)),
                          Sequence(tokenizer.encode("hello"), config, sink_for(1))])
        assert finished.acquire(timeout=60) and finished.acquire(timeout=60)
        assert [e[-1].finish_reason for e in events] == ["error", "error"]
        assert scheduler.alive and scheduler.stats.running == 0 and scheduler._running == []
        # The next request decodes to the end, with the engine's tokens.
        after = collect(scheduler, lambda sink: [Sequence(tokenizer.encode("abc"), config, sink(0))])
    finally:
        scheduler.stop(timeout=10)
    assert after == run(model, tokenizer, [("abc", config, None)])
