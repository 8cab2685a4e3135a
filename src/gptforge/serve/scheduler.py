"""Continuous batching: one thread runs the model; sequences join and leave the batch at every step.

A request becomes one :class:`Sequence` per returned choice. Waiting sequences sit in a bounded queue
(:class:`QueueFull` when it would overflow, which the app answers with 503 + Retry-After). Every turn of the
scheduler thread:

1. drops sequences whose client went away or whose deadline passed (their batch row is free at once);
2. admits waiting sequences while the batch has room: each prompt is prefilled *alone*, with exactly the
   call :class:`~gptforge.generate.batch.PromptBatch` makes for a single prompt, and its keys/values are
   copied into the shared cache;
3. runs one decode forward for every running sequence together, then hands its last position to the
   decode engine (:class:`~gptforge.generate.engine.Decoder`), which chooses and records each row's next
   token under that sequence's own parameters, history and random generator, exactly as for a lone
   prompt (through a screened LM head's argmax screen where it can), and says when a sequence ends.

The scheduler owns admission, the cache layout and the batching policy; the engine owns everything about
tokens. Finish reasons are the engine's (:class:`~gptforge.generate.FinishReason`), reported in OpenAI's
names (an end-of-text token is "stop") plus "cancelled" and "error".

The shared cache keeps the model's one-length-for-all-rows :class:`~gptforge.model.KVCache` (no model
change; a step runs on a :meth:`~gptforge.model.KVCache.view` of it): every row's tokens end at the shared
length ``L`` and start at its own ``start``; earlier positions are masked, position ids count the row's
real tokens. A prompt longer than ``L`` shifts the cache right; when ``L`` reaches the context, the cache
is shifted left past the columns no row uses.

Identical results. Float matmuls are usually not batch-invariant: BLAS runs a GEMM over 16 rows with
other kernels and another summation order than a GEMV over one, so a batched step can move a logit by
an ulp and flip a near-tie argmax. By default (``batch_invariant``) the decode step avoids that:

* when every linear layer is batch-invariant (the float32 CPU layers that
  :func:`~gptforge.backends.prepare_for_inference` prepacks, whose kernel reduces each output in the
  same order for any row count, or int8 on the amx or panel kernel or fbgemm), one forward runs all rows
  together and attention computes each row on its own keys (the shared cache from the row's start: no
  padding, no mask) as the engine does for a lone prompt: on CPU in float32 the native decode
  attention, one call for all rows that computes each (row, head) alone; otherwise one SDPA call a row;
* otherwise each row runs alone, one forward per row, with exactly the engine's arguments.

Either way a greedy answer equals ``gptforge generate`` for the same prompt bit for bit however many
requests share the batch. ``batch_invariant=False`` runs one batched forward over the padded rows with
per-row masks and position ids: fastest where plain matmuls are wide (GPUs), equal to the engine only
up to float rounding. Left unset (None), it is on for a model on the CPU (where it is free) and off on a
GPU (where one forward per row would cost throughput).
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
from ..backends import decode_session, linears_batch_invariant
from ..generate import Decoder, FinishReason, SequenceState
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
    finish_reason: Optional[str] = None  # OpenAI's "stop" | "length", or "cancelled" | "error"


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
        self.cancel_reason = _reported(FinishReason.CANCELLED)
        # Scheduler-thread state.
        self.state: Optional[SequenceState] = None  # the engine's, from the prefill on
        self.pending: Optional[int] = None  # the sampled token not yet fed to the model
        self.slot = -1
        self.start = 0  # first cache column holding this sequence's tokens

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the scheduler to drop this sequence (safe from any thread); its row is freed next step.
        ``reason`` is its last event's finish reason: "cancelled" (client gone, timeout, shutdown; counted as
        cancelled) or the reason of whoever stopped it (moderation's "content_filter")."""
        self.cancel_reason = reason
        self.cancelled = True

    @property
    def finished(self) -> bool:
        return self.state is not None and self.state.done

    @property
    def length(self) -> int:
        """Tokens of this sequence in the cache."""
        return len(self.prompt_ids) + self.state.steps - (1 if self.pending is not None else 0)


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
def _reported(reason: FinishReason) -> str:
    """OpenAI's name for why a choice ended: an end-of-text token is "stop" there too."""
    return "stop" if reason is FinishReason.EOS else str(reason)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _uses_prefix(model: torch.nn.Module) -> bool:
    return any(getattr(m, "prefix", None) is not None for m in model.modules())


# --------------------------------------------------------------------------------------------------
class Scheduler:
    """Owns the model on one background thread; see the module docstring."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, max_batch_size: int = 16, max_queue: int = 64,
                 batch_invariant: Optional[bool] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        if batch_invariant is None:  # free on CPU; on a GPU it would cost one forward per row
            batch_invariant = _device(model).type == "cpu"
        self.batch_invariant = batch_invariant
        if batch_invariant and _uses_prefix(model):
            log.warning("prefix-tuned model: decoding with plain batched attention (not batch-invariant)")
            self.batch_invariant = False
        # With batch-invariant linear layers (prepacked float32 or int8 on CPU), one batched forward with
        # row-by-row attention gives every row the bits it gets alone; otherwise each row runs alone.
        self._ragged = linears_batch_invariant(model)
        self._decoder = Decoder(model)
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
        self.after_step: Optional[Callable[[], None]] = None
        """Called on the scheduler thread after every step (the server's moderation checks the text of the
        sequences it holds back here, and may cancel them before the next step)."""

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
                    if self.after_step is not None:
                        self._after_step()
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

    def _after_step(self) -> None:
        try:
            self.after_step()
        except Exception:  # a bug there must not stop the batch
            log.exception("after-step hook failed")

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
            self._emit(seq, TokenEvent(seq.index, "", finish_reason=_reported(FinishReason.CANCELLED)))
        for _, future in jobs:
            future.cancel()

    def _step(self) -> None:
        now = time.monotonic()
        self._drop_cancelled(now)
        self._admit(now)
        if self._running:
            try:
                self._decode()
            except Exception:  # e.g. out of memory: fail the rows of this step, keep serving the next requests
                log.exception("decode step failed")
                self._fail_running()

    def _fail_running(self) -> None:
        """End every running sequence with "error" and empty the batch (their cache rows may be half-written)."""
        rows, self._running = self._running, []
        self.stats.running = 0
        self._length = 0
        for seq in rows:
            seq.slot = -1
            self._emit(seq, TokenEvent(seq.index, "", finish_reason=_reported(FinishReason.ERROR)))

    def _drop_cancelled(self, now: float) -> None:
        for seq in list(self._running):
            if seq.cancelled or (seq.deadline is not None and now > seq.deadline):
                self._remove(seq)
                self._drop(seq)

    def _drop(self, seq: Sequence) -> None:
        reason = seq.cancel_reason if seq.cancelled else _reported(FinishReason.CANCELLED)
        if reason == _reported(FinishReason.CANCELLED):
            self.stats.cancelled += 1
        self._emit(seq, TokenEvent(seq.index, "", finish_reason=reason))

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
                self._drop(seq)
                continue
            try:
                last = self._prefill(seq)
                self._choose([seq], last)
            except Exception:  # e.g. out of memory: fail this sequence, keep serving the rest
                log.exception("prefill failed")
                self._emit(seq, TokenEvent(seq.index, "", finish_reason=_reported(FinishReason.ERROR)))
                self._discard_cache_row(seq)
                continue
            if seq.finished:
                self._discard_cache_row(seq)

    def _prefill(self, seq: Sequence) -> torch.Tensor:
        """Run the prompt alone, exactly as PromptBatch does for one prompt; copy its keys/values in. Returns
        what the decoder's step takes for the first new token (:meth:`Decoder.forward`: (1, V) logits, or
        under a screened head the (1, C) final hidden state). A sequence of the group whose prefill was the
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
            last = self._decoder.forward(idx, kv_cache=cache, attention_mask=None)
            self.stats.prompt_tokens += P
            self._group_prefill = (key, cache, last.clone()) if seq.prefill_group is not None else None
        seq.state = SequenceState(seq.prompt_ids, config, model, eos_id=self.tokenizer.eos_id,
                                  tokenizer=self.tokenizer, seed=seq.seed)
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
        forward = self._decoder.forward
        if self.batch_invariant and self._ragged:
            # One forward for all rows: the linear layers are batch-invariant, and attention runs row by row
            # on each row's own keys (no padding, no mask), as in a lone prompt's decode step.
            view = self._cache.view(slice(0, n), 0, L, row_starts=[seq.start for seq in rows])
            out = forward(tokens, kv_cache=view, attention_mask=None, position_ids=positions)
        elif self.batch_invariant:
            # Each row alone, with exactly the call the engine makes for a lone prompt's decode step: its
            # own keys (a view of the shared cache, no padding), no mask, its own position.
            out = torch.cat([
                forward(tokens[i:i + 1], kv_cache=self._cache.view(slice(i, i + 1), seq.start, L - seq.start),
                        attention_mask=None, position_ids=positions[i:i + 1])
                for i, seq in enumerate(rows)])
        else:
            starts = torch.tensor([seq.start for seq in rows], device=device)
            mask = (torch.arange(L + 1, device=device).unsqueeze(0) >= starts.unsqueeze(1)).long()  # (n, L + 1)
            out = forward(tokens, kv_cache=self._cache.view(slice(0, n), 0, L), attention_mask=mask,
                          position_ids=positions)
        self._length = L + 1
        self.stats.steps += 1
        rows = list(rows)
        for seq in rows:
            seq.pending = None
        self._choose(rows, out)
        for seq in [s for s in rows if s.finished]:
            self._remove(seq)

    def _choose(self, rows: list[Sequence], out: torch.Tensor) -> None:
        """The engine's step on the forward's last position ``out`` (n, ·): each row's next token, recorded;
        emit what each decides."""
        for seq, choice in zip(rows, self._decoder.step([seq.state for seq in rows], out)):
            self.stats.generated_tokens += 1
            if choice.finish_reason is None:
                seq.pending = choice.token_id
            else:
                self.stats.finished += 1
            self._emit(seq, TokenEvent(seq.index, choice.text, choice.token_id, choice.logprob, choice.top_logprobs,
                                       None if choice.finish_reason is None else _reported(choice.finish_reason)))

    @staticmethod
    def _emit(seq: Sequence, event: TokenEvent) -> None:
        try:
            seq.sink(event)
        except Exception:  # a client's callback must never stop the batch
            log.exception("could not deliver a token event")
