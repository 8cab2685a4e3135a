"""Continuous batching: one thread runs the model; sequences join and leave the batch at every step.

A request becomes one :class:`Sequence` per returned choice. Waiting sequences sit in a bounded queue
(:class:`QueueFull` when it would overflow, which the app answers with 503 + Retry-After). Every turn of the
scheduler thread:

1. drops sequences whose client went away or whose deadline passed (their batch row is free at once);
2. admits waiting sequences while the batch has room: each prompt is prefilled *alone*, with exactly the
   call :class:`~gptforge.generate.batch.PromptBatch` makes for a single prompt, and its keys/values are
   copied into the shared cache;
3. runs one decode step for every running sequence together, then picks each row's next token with the
   ``generate`` processors and sampling functions under that sequence's own parameters, history and
   random generator. On a prepared float32 model the LM head's argmax screen
   (:class:`~gptforge.inference.ArgmaxScreen`) chooses the plain rows without forming their logits, as
   the engine does for a lone prompt: plain greedy rows (no log-probabilities, no penalties) get the same
   argmax, plain sampled rows (no top-k / top-p / min-p either) a draw from the same softmax; only the
   other rows' logits are computed.

The shared cache keeps the model's one-length-for-all-rows :class:`~gptforge.model.KVCache` (no model
change): every row's tokens end at the shared length ``L`` and start at its own ``start``; earlier
positions are masked, position ids count the row's real tokens. A prompt longer than ``L`` shifts the
cache right; when ``L`` reaches the context, the cache is shifted left past the columns no row uses.

Identical results. Float matmuls are usually not batch-invariant: BLAS runs a GEMM over 16 rows with
other kernels and another summation order than a GEMV over one, so a batched step can move a logit by
an ulp and flip a near-tie argmax. By default (``batch_invariant``) the decode step avoids that:

* when every linear layer is batch-invariant (the float32 CPU layers that
  :func:`~gptforge.inference.prepare_for_inference` prepacks, whose kernel reduces each output in the
  same order for any row count, or int8 on the amx or panel kernel or fbgemm), one forward runs all rows
  together and attention computes each row on its own keys (the shared cache from the row's start: no
  padding, no mask) as the engine does for a lone prompt: on CPU in float32 gptforge.native's decode
  attention, one call for all rows that computes each (row, head) alone; otherwise one SDPA call a row;
* otherwise each row runs alone, one forward per row, with exactly the engine's arguments.

Either way a greedy answer equals ``gptforge generate`` for the same prompt bit for bit however many
requests share the batch. ``batch_invariant=False`` runs one batched forward over the padded rows with
per-row masks and position ids: fastest where plain matmuls are wide (GPUs), equal to the engine only
up to float rounding.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence as Seq

import torch

from ..config import GenerateConfig
from ..generate.processors import TokenHistory, argmax_only, process_logits, sample_only
from ..generate.sampling import choose_tokens, make_generators, token_logprobs
from ..generate.stopping import TextTracker
from ..backends import decode_session, linears_batch_invariant
from ..model import GPT, KVCache
from ..runtime import release_thread_pool
from ..tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = ["QueueFull", "SchedulerStopped", "Scheduler", "Sequence", "TokenEvent"]


class QueueFull(Exception):
    """The waiting queue has no room for the request's sequences."""


class SchedulerStopped(Exception):
    """The scheduler is shutting down and takes no new work."""


@dataclass
class TokenEvent:
    """What one step decided for one sequence; ``finish_reason`` is set on its last event."""

    index: int
    text: str
    token_id: Optional[int] = None
    logprob: Optional[float] = None
    top_logprobs: Optional[list[tuple[int, float]]] = None
    finish_reason: Optional[str] = None  # "stop" | "length" | "cancelled"


class Sequence:
    """One generated sequence: a prompt, its decoding parameters, and where its events go.

    ``sink(event)`` is called on the scheduler thread (the app hands it a thread-safe callback).
    ``seed`` seeds this sequence's own generator (None: the global RNG). ``prefill_group``: sequences
    submitted together with the same group, prompt and ``max_new_tokens`` (the ``n`` choices of one
    request) share one prefill: the prompt runs once and each gets a copy of its keys and values (the same
    bits it would compute alone).
    """

    def __init__(self, prompt_ids: Seq[int], config: GenerateConfig, sink: Callable[[TokenEvent], None], *,
                 index: int = 0, seed: Optional[int] = None, deadline: Optional[float] = None,
                 prefill_group: Optional[object] = None):
        self.prompt_ids = list(prompt_ids)
        self.config = config
        self.prefill_group = prefill_group
        self.sink = sink
        self.index = index
        self.seed = seed
        self.deadline = deadline
        self.cancelled = False
        # Scheduler-thread state.
        self.generated = 0
        self.pending: Optional[int] = None  # the sampled token not yet fed to the model
        self.slot = -1
        self.start = 0  # first cache column holding this sequence's tokens
        self.history: Optional[TokenHistory] = None
        self.generators: Optional[list[torch.Generator]] = None
        self.text: Optional[TextTracker] = None
        self.eos_id: Optional[int] = None
        self.finished = False

    def cancel(self) -> None:
        """Ask the scheduler to drop this sequence (safe from any thread); its row is freed next step."""
        self.cancelled = True

    @property
    def length(self) -> int:
        """Tokens of this sequence in the cache."""
        return len(self.prompt_ids) + self.generated - (1 if self.pending is not None else 0)


@dataclass
class SchedulerStats:
    queue_length: int = 0
    running: int = 0
    peak_running: int = 0
    steps: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    cancelled: int = 0
    finished: int = 0


# --------------------------------------------------------------------------------------------------
def _cache_view(cache: KVCache, rows: slice, start: int, length: int) -> KVCache:
    """A KVCache over ``rows`` of ``cache`` and its columns from ``start`` on, holding ``length`` filled
    positions; it shares the storage, so the model's writes land in ``cache``."""
    view = KVCache.__new__(KVCache)
    view.k, view.v = cache.k[:, rows, :, start:], cache.v[:, rows, :, start:]
    view.max_length = cache.max_length - start
    view.length = length
    return view


def _eos_banned(seq: Sequence) -> bool:
    """Whether end-of-text may not come next (before min_new_tokens)."""
    return seq.eos_id is not None and seq.generated < seq.config.min_new_tokens


def _screen_kind(seq: Sequence) -> Optional[str]:
    """How a screened LM head chooses ``seq``'s next token without its logits: "argmax" (plain greedy, no
    log-probabilities, no end-of-text ban pending), "sample" (a plain draw from the softmax, log-probabilities
    or not; an end-of-text ban is passed on), or None (the token comes from the logits: penalties, bans,
    warpers; greedy with log-probabilities)."""
    if argmax_only(seq.config, seq.history) and not _eos_banned(seq):
        return "argmax"
    if sample_only(seq.config, seq.history):
        return "sample"
    return None


def _uses_prefix(model: torch.nn.Module) -> bool:
    return any(getattr(m, "prefix", None) is not None for m in model.modules())


# --------------------------------------------------------------------------------------------------
class Scheduler:
    """Owns the model on one background thread; see the module docstring."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, max_batch_size: int = 16, max_queue: int = 64,
                 batch_invariant: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_invariant = batch_invariant
        if batch_invariant and _uses_prefix(model):
            log.warning("prefix-tuned model: decoding with plain batched attention (not batch-invariant)")
            self.batch_invariant = False
        # With batch-invariant linear layers (prepacked float32 or int8 on CPU), one batched forward with
        # row-by-row attention gives every row the bits it gets alone; otherwise each row runs alone.
        self._ragged = linears_batch_invariant(model)
        # A prepared float32 LM head's argmax screen (gptforge.inference.ArgmaxScreen): plain greedy and
        # plain sampled rows are chosen without forming their logits (see _choose_hidden).
        self._screened = bool(getattr(getattr(model, "lm_head", None), "screened", False))
        self.stats = SchedulerStats()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._jobs: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._running: list[Sequence] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._cache: Optional[KVCache] = None
        self._length = 0  # L: columns filled in the shared cache
        # The last prefill of a prefill group, while more of its sequences wait: (key, cache, output).
        self._group_prefill: Optional[tuple[tuple, KVCache, torch.Tensor]] = None
        self._thread = threading.Thread(target=self._loop, name="gptforge-scheduler", daemon=True)

    # ------------------------------------------------------------------------------------------------
    # Any thread
    def start(self) -> "Scheduler":
        """Start the scheduler thread. Also ends the calling thread's idle OpenMP workers (it usually loaded
        the model): with them alive the scheduler thread's own workers would sleep between parallel ops
        instead of spinning (gptforge.runtime.release_thread_pool)."""
        release_thread_pool()
        self._thread.start()
        return self

    def stop(self, timeout: Optional[float] = None) -> None:
        """Finish nothing more: cancel what is waiting or running and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue all of ``sequences`` or none (:class:`QueueFull`)."""
        with self._cond:
            if self._stopping:
                raise SchedulerStopped("the server is shutting down")
            if len(self._waiting) + len(sequences) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} sequences are already waiting (the queue holds "
                                f"{self.max_queue})")
            self._waiting.extend(sequences)
            self.stats.queue_length = len(self._waiting)
            self._cond.notify_all()

    def run_job(self, job: Callable[[], Any]) -> Future:
        """Run ``job()`` on the scheduler thread between decode steps (other uses of the model, e.g. a
        classifier); its result or exception arrives in the returned future."""
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise SchedulerStopped("the server is shutting down")
            self._jobs.append((job, future))
            self._cond.notify_all()
        return future

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------------------------------------------
    # Scheduler thread
    def _loop(self) -> None:
        try:
            with torch.inference_mode(), decode_session(self.model):
                while True:
                    with self._cond:
                        while not (self._stopping or self._waiting or self._running or self._jobs):
                            self._cond.wait()
                        if self._stopping:
                            break
                        jobs = list(self._jobs)
                        self._jobs.clear()
                    for job, future in jobs:
                        self._run_job(job, future)
                    self._step()
        except BaseException:  # a bug here must not leave clients waiting forever
            log.exception("scheduler thread failed")
        finally:
            self._shutdown()

    def _run_job(self, job, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(job())
        except BaseException as exc:
            future.set_exception(exc)

    def _shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            leftovers = list(self._waiting) + self._running
            self._waiting.clear()
            self._running = []
            self.stats.running = 0
            jobs = list(self._jobs)
            self._jobs.clear()
        for seq in leftovers:
            self._emit(seq, TokenEvent(seq.index, "", finish_reason="cancelled"))
        for _, future in jobs:
            future.cancel()

    def _step(self) -> None:
        now = time.monotonic()
        self._drop_cancelled(now)
        self._admit(now)
        if self._running:
            self._decode()

    def _drop_cancelled(self, now: float) -> None:
        for seq in list(self._running):
            if seq.cancelled or (seq.deadline is not None and now > seq.deadline):
                self._remove(seq)
                self.stats.cancelled += 1
                self._emit(seq, TokenEvent(seq.index, "", finish_reason="cancelled"))

    def _admit(self, now: float) -> None:
        self._admit_waiting(now)
        with self._cond:  # a group's prefill stays only while the next waiting sequence shares it
            if self._group_prefill is not None and not (
                    self._waiting and self._waiting[0].prefill_group is self._group_prefill[0][0]):
                self._group_prefill = None

    def _admit_waiting(self, now: float) -> None:
        while len(self._running) < self.max_batch_size:
            with self._cond:
                if not self._waiting:
                    break
                seq = self._waiting.popleft()
                self.stats.queue_length = len(self._waiting)
            if seq.cancelled or (seq.deadline is not None and now > seq.deadline):
                self.stats.cancelled += 1
                self._emit(seq, TokenEvent(seq.index, "", finish_reason="cancelled"))
                continue
            try:
                last = self._prefill(seq)
            except Exception:  # e.g. out of memory: fail this sequence, keep serving the rest
                log.exception("prefill failed")
                self._emit(seq, TokenEvent(seq.index, "", finish_reason="error"))
                self._discard_cache_row(seq)
                continue
            self._choose_from([seq], last)
            if seq.finished:
                self._discard_cache_row(seq)

    def _prefill(self, seq: Sequence) -> torch.Tensor:
        """Run the prompt alone, exactly as PromptBatch does for one prompt; copy its keys/values in. Returns
        what :meth:`_choose_from` takes: the (1, 1, V) logits of the first new token, or with a screened
        head the (1, 1, C) final hidden state they come from. A sequence of the group whose prefill was the
        last one (another choice of the same request) reuses it; any other prefill replaces it."""
        model, config = self.model, seq.config
        device = model.wte.weight.device
        P = len(seq.prompt_ids)
        key = (seq.prefill_group, tuple(seq.prompt_ids), P + config.max_new_tokens)
        shared = self._group_prefill
        if seq.prefill_group is not None and shared is not None and shared[0] == key:
            cache, last = shared[1], shared[2].clone()  # the group's prefill: the same computation, done once
        else:
            # Same cache size (hence the same tensor strides) as the engine allocates for this prompt.
            cache = model.new_kv_cache(1, P + config.max_new_tokens)
            idx = torch.tensor([seq.prompt_ids], dtype=torch.long, device=device)
            if self._screened:
                last = model.hidden_states(idx, kv_cache=cache, attention_mask=None)[:, -1:]  # (1, 1, C)
            else:
                last = model(idx, kv_cache=cache, attention_mask=None, last_only=True)  # (1, 1, V)
            self.stats.prompt_tokens += P
            self._group_prefill = (key, cache, last.clone()) if seq.prefill_group is not None else None
        seq.eos_id = None if config.ignore_eos else self.tokenizer.eos_id
        seq.history = TokenHistory([seq.prompt_ids], model.config.vocab_size, config, device)
        seq.generators = make_generators(seq.seed, 1, device)
        seq.text = TextTracker(self.tokenizer, seq.prompt_ids, config.stop)
        self._place(seq, cache, P)
        return last

    def _place(self, seq: Sequence, cache: KVCache, P: int) -> None:
        """Give ``seq`` the next free row; its P cached positions end at the shared length."""
        if self._cache is None:
            self._cache = self.model.new_kv_cache(self.max_batch_size, self.model.config.block_size)
        big = self._cache
        if P > self._length:  # shift every row right so that the new prompt fits before L
            d = P - self._length
            if self._length:
                big.k[:, :, :, d:P] = big.k[:, :, :, :self._length].clone()
                big.v[:, :, :, d:P] = big.v[:, :, :, :self._length].clone()
            for other in self._running:
                other.start += d
            self._length = P
        seq.slot = len(self._running)
        seq.start = self._length - P
        big.k[:, seq.slot, :, seq.start:self._length] = cache.k[:, 0, :, :P]
        big.v[:, seq.slot, :, seq.start:self._length] = cache.v[:, 0, :, :P]
        self._running.append(seq)
        # The gauge changes with the list itself (here and in _remove), so /metrics never lags a token.
        self.stats.running = len(self._running)
        self.stats.peak_running = max(self.stats.peak_running, len(self._running))

    def _remove(self, seq: Sequence) -> None:
        """Free ``seq``'s row: the last row moves into it so that running rows stay 0..n-1."""
        last = self._running[-1]
        if last is not seq:  # its filled columns only (the rest is written before it is read)
            used = slice(last.start, self._length)
            self._cache.k[:, seq.slot, :, used] = self._cache.k[:, last.slot, :, used]
            self._cache.v[:, seq.slot, :, used] = self._cache.v[:, last.slot, :, used]
            last.slot = seq.slot
            self._running[seq.slot] = last
        self._running.pop()
        self.stats.running = len(self._running)
        seq.slot = -1
        if not self._running:
            self._length = 0

    def _discard_cache_row(self, seq: Sequence) -> None:
        if seq.slot >= 0:
            self._remove(seq)

    def _make_room(self) -> None:
        """Before a step at full context: drop the leading columns no running row uses."""
        if self._length < self._cache.max_length:
            return
        m = min(seq.start for seq in self._running)
        big = self._cache
        big.k[:, :, :, :self._length - m] = big.k[:, :, :, m:self._length].clone()
        big.v[:, :, :, :self._length - m] = big.v[:, :, :, m:self._length].clone()
        for seq in self._running:
            seq.start -= m
        self._length -= m

    def _decode(self) -> None:
        self._make_room()
        rows = self._running
        n, L = len(rows), self._length
        device = self._cache.k.device
        tokens = torch.tensor([[seq.pending] for seq in rows], dtype=torch.long, device=device)  # (n, 1)
        positions = torch.tensor([[seq.length] for seq in rows], dtype=torch.long, device=device)  # (n, 1)
        # The forward's output goes to _choose_from: hidden states under a screened head, else logits.
        run = self.model.hidden_states if self._screened else self.model
        if self.batch_invariant and self._ragged:
            # One forward for all rows: the linear layers are batch-invariant, and attention runs row by row
            # on each row's own keys (no padding, no mask), as in a lone prompt's decode step.
            view = _cache_view(self._cache, slice(0, n), 0, L)
            view.row_starts = [seq.start for seq in rows]
            out = run(tokens, kv_cache=view, attention_mask=None, position_ids=positions)
        elif self.batch_invariant:
            # Each row alone, with exactly the call the engine makes for a lone prompt's decode step: its
            # own keys (a view of the shared cache, no padding), no mask, its own position.
            out = torch.cat([
                run(tokens[i:i + 1], kv_cache=_cache_view(self._cache, slice(i, i + 1), seq.start, L - seq.start),
                    attention_mask=None, position_ids=positions[i:i + 1])
                for i, seq in enumerate(rows)])
        else:
            starts = torch.tensor([seq.start for seq in rows], device=device)
            mask = (torch.arange(L + 1, device=device).unsqueeze(0) >= starts.unsqueeze(1)).long()  # (n, L + 1)
            out = run(tokens, kv_cache=_cache_view(self._cache, slice(0, n), 0, L), attention_mask=mask,
                      position_ids=positions)
        self._length = L + 1
        self.stats.steps += 1
        rows = list(rows)
        for i, seq in enumerate(rows):
            seq.history.append(tokens[i], [seq.pending])
            seq.pending = None
        self._choose_from(rows, out)
        for seq in [s for s in rows if s.finished]:
            self._remove(seq)

    def _choose_from(self, rows: list[Sequence], out: torch.Tensor) -> None:
        """Pick and emit each row's next token from the forward's last position, ``out`` (n, 1, ·): final
        hidden states under a screened head (:meth:`_choose_hidden`), else logits (:meth:`_choose_rows`)."""
        if self._screened:
            self._choose_hidden(rows, out)
        else:
            self._choose_rows(rows, out[:, -1].float())  # (n, V)

    def _choose_hidden(self, rows: list[Sequence], hidden: torch.Tensor) -> None:
        """Pick each row's next token from its final hidden state, ``hidden`` (n, 1, C), under a screened LM
        head, as the engine does for each alone: plain greedy rows through the head's argmax screen, plain
        sampled rows drawn through it (``GPT.sample_tokens``, with the row's own generator), and the rest from
        their logits (:meth:`_choose_rows`). Emit what each decides."""
        kinds = [_screen_kind(seq) for seq in rows]
        chosen: list[Optional[torch.Tensor]] = [None] * len(rows)
        logits_of: list[Optional[torch.Tensor]] = [None] * len(rows)
        greedy = [i for i, kind in enumerate(kinds) if kind == "argmax"]
        if greedy:
            tokens = self.model.greedy_tokens(hidden[greedy, -1])
            for j, i in enumerate(greedy):
                chosen[i] = tokens[j:j + 1]
        drawn = [i for i, kind in enumerate(kinds) if kind == "sample"]
        if drawn:
            seqs = [rows[i] for i in drawn]
            tokens = self.model.sample_tokens(
                hidden[drawn, -1], [seq.config.temperature for seq in seqs],
                [seq.generators[0] if seq.generators else None for seq in seqs],
                [seq.eos_id if _eos_banned(seq) else None for seq in seqs])
            for j, i in enumerate(drawn):
                chosen[i] = tokens[j:j + 1]
        rest = [i for i, kind in enumerate(kinds) if kind is None]
        need = [i for i, kind in enumerate(kinds) if kind is None or rows[i].config.logprobs]
        if need:
            logits = self.model.logits(hidden[need]).float()[:, -1]  # (r, V): the forward's own head call
            for j, i in enumerate(need):
                logits_of[i] = logits[j:j + 1]
        if rest:
            tokens, views = self._pick_rows([rows[i] for i in rest], torch.cat([logits_of[i] for i in rest]))
            for j, i in enumerate(rest):
                chosen[i], logits_of[i] = tokens[j], views[j]
        for i, seq in enumerate(rows):
            self._take(seq, chosen[i], logits_of[i])

    def _choose_rows(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        """:meth:`_pick_rows`, then emit what each row decides."""
        tokens, views = self._pick_rows(rows, logits)
        for i, seq in enumerate(rows):
            self._take(seq, tokens[i], views[i])

    def _pick_rows(self, rows: list[Sequence], logits: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Pick each row's next token from ``logits`` (n, V) float, each with its own parameters, history and
        generator, exactly as each would alone; returns each row's token, (1,), and logits, (1, V).

        Greedy rows, and seeded rows whose distributions are warped alike (same temperature, top-k, top-p,
        min-p), are chosen in one batched call each: the warpers, softmax, running sum, search and argmax
        all work row by row, so every row gets the bits it gets alone (tests/serve/test_server.py), and a
        16-row step spends ~0.5 ms here instead of ~3 ms of per-row calls. Unseeded rows draw from the
        global generator one by one, as before.
        """
        views = [logits[i:i + 1] for i in range(len(rows))]
        scores = [process_logits(views[i], seq.history, seq.config, step=seq.generated, eos_id=seq.eos_id)
                  for i, seq in enumerate(rows)]
        groups: dict[tuple, list[int]] = {}
        for i, seq in enumerate(rows):
            c = seq.config
            if c.temperature == 0:
                key: tuple = ("greedy",)
            elif seq.generators is not None:
                key = ("sample", c.temperature, c.top_k, c.top_p, c.min_p)
            else:
                key = ("alone", i)
            groups.setdefault(key, []).append(i)
        chosen: list[Optional[torch.Tensor]] = [None] * len(rows)
        for key, members in groups.items():
            if len(members) == 1:
                batch = scores[members[0]]
            elif len(members) == len(rows) and all(scores[i] is views[i] for i in members):
                batch = logits  # no penalty changed any row: the rows as they came
            else:
                batch = torch.cat([scores[i] for i in members])
            generators = [g for i in members for g in rows[i].generators] if key[0] == "sample" else None
            picked = choose_tokens(batch, rows[members[0]].config, generators)  # (len(members),)
            for j, i in enumerate(members):
                chosen[i] = picked[j:j + 1]
        return chosen, views

    def _take(self, seq: Sequence, token_t: torch.Tensor, logits: Optional[torch.Tensor]) -> None:
        """Record ``seq``'s chosen token (a (1,) tensor; its logits (1, V), needed for log-probabilities) and
        emit the event it makes."""
        config = seq.config
        token = int(token_t.item())
        logprob = top = None
        if config.logprobs:
            chosen, top_ids, top_logp = token_logprobs(logits, token_t, config.logprobs)
            logprob = float(chosen[0])
            top = list(zip(top_ids[0].tolist(), top_logp[0].tolist()))
        seq.generated += 1
        self.stats.generated_tokens += 1
        finish = None
        if token == seq.eos_id:
            piece, finish = seq.text.finish(), "stop"
        else:
            piece = seq.text.push(token)
            if seq.text.stopped:
                finish = "stop"
            elif seq.generated >= config.max_new_tokens:
                piece, finish = piece + seq.text.finish(), "length"
        if finish is None:
            seq.pending = token
        else:
            seq.finished = True
            self.stats.finished += 1
        self._emit(seq, TokenEvent(seq.index, piece, token, logprob, top, finish))

    @staticmethod
    def _emit(seq: Sequence, event: TokenEvent) -> None:
        try:
            seq.sink(event)
        except Exception:  # a client's callback must never stop the batch
            log.exception("could not deliver a token event")
