"""The ``gptforge`` command: maps subcommands to library calls and decides what a person sees.

Library code logs and raises :class:`~gptforge.errors.GptforgeError` for user errors; here those become
one ``error: ...`` line on stderr and a non-zero exit, never a traceback. Heavy modules (torch) are
imported lazily so ``gptforge --help`` and config errors answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from .config import (CHAT_DEFAULTS, CHAT_OPTIONS, GenerateConfig, GroundingConfig, IndexConfig, InferenceConfig,
                     ModerationConfig, ScoreConfig, ServeConfig)
from .errors import ConfigError, GptforgeError, InvalidTextError

log = logging.getLogger("gptforge")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
FINETUNE_GROUNDING_OPTIONS = ("knowledge", "passages", "min_score", "query_turns")
"""The grounding flags of `gptforge finetune` (a refusal is an inference matter)."""


# --------------------------------------------------------------------------------------------------
# Subcommands
def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.prepare import prepare_corpus

    tokenizer_from = args.tokenizer_from
    if tokenizer_from is not None and (Path(tokenizer_from) / "checkpoints").is_dir():
        from .checkpoint import resolve_checkpoint

        tokenizer_from = resolve_checkpoint(tokenizer_from)  # a run folder: its latest checkpoint
    meta = prepare_corpus(args.corpus, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                          val_fraction=args.val_fraction, tokenizer_from=tokenizer_from,
                          progress=not args.quiet)
    tok = meta["tokenizer"]
    print(f"prepared {args.out}: {meta['train']['tokens']:,} train tokens, {meta['val']['tokens']:,} val tokens "
          f"({tok['kind']} tokenizer, vocab {tok['vocab_size']:,}, {meta['dtype']})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .config import describe_config, load_run_config

    if args.help_config:
        print(describe_config())
        return 0
    config = load_run_config(args.config, args.overrides)
    from .train import pretrain

    result = pretrain(config, resume=args.resume, progress=not args.quiet, handle_signals=True)
    if os.environ.get("RANK", "0") != "0":
        return _stop_exit_code(result.stopped_by)  # under torchrun, rank 0 reports for everyone
    if result.stopped_by is not None:
        return _report_signal_stop(result.stopped_by, result.steps, result.checkpoint)
    print(f"step {result.steps}: val loss {result.val_loss:.4f} | perplexity {result.val_ppl:.2f} | "
          f"bits/byte {result.val_bpb:.4f}")
    print(f"checkpoint: {result.checkpoint}")
    return 0


def _stop_exit_code(stopped_by: Optional[str]) -> int:
    """128 + the signal's number (143 for SIGTERM, 130 for SIGINT), as a shell reports a process a signal
    ended: the run did not reach its end, so a script must not take it for finished; 0 when none."""
    import signal

    return 128 + signal.Signals[stopped_by].value if stopped_by else 0


def _report_signal_stop(stopped_by: str, steps: int, checkpoint: Path) -> int:
    print(f"stopped by {stopped_by} at step {steps}; saved {checkpoint}; resume with --resume")
    return _stop_exit_code(stopped_by)


def generate_config_from_args(args: argparse.Namespace) -> GenerateConfig:
    """Every decoding flag → a validated GenerateConfig (with the phrases of --ban-file added to --ban)."""
    gen = config_from_flags(GenerateConfig, args)
    if getattr(args, "ban_file", None) is not None:
        phrases = [line for line in _read_lines(Path(args.ban_file), "--ban-file") if line.strip()]
        gen = dataclasses.replace(gen, bad_words=gen.bad_words + phrases).validate()
    return gen


def _add_ban_file_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ban-file", metavar="FILE", default=None,
                   help="banned phrases, one a line (taken as written; blank lines skipped), added to --ban")


def cmd_generate(args: argparse.Namespace) -> int:
    gen = generate_config_from_args(args)
    prompts = _read_prompts(args)
    if args.draft_checkpoint is not None:
        _check_speculative_args(gen, prompts, args)
    ckpt = _load_for_inference(config_from_flags(InferenceConfig, args))
    if args.draft_checkpoint is not None:
        return _generate_speculative(args, gen, prompts[0], ckpt)

    from .generate import encode_prompt, generate, stream_ids

    out = sys.stdout
    if args.json:
        results = generate(ckpt.model, ckpt.tokenizer, prompts, gen)
        for prompt, completions in zip(prompts, results):
            record = {"prompt": prompt, "completions": [c.to_dict() for c in completions]}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    elif len(prompts) == 1 and gen.num_return_sequences == 1 and gen.num_beams == 1:
        # Everything that can fail (the prompt's length against the context, the options) fails here, so
        # that a failing command prints its error line only.
        pieces = stream_ids(ckpt.model, ckpt.tokenizer, encode_prompt(ckpt.tokenizer, prompts[0]), gen)
        out.write(prompts[0])
        out.flush()
        for piece in pieces:
            out.write(piece)
            out.flush()
        out.write("\n")
    else:
        results = generate(ckpt.model, ckpt.tokenizer, prompts, gen)
        for p, (prompt, completions) in enumerate(zip(prompts, results), 1):
            for i, completion in enumerate(completions, 1):
                header = f"prompt {p}, " if len(prompts) > 1 else ""
                out.write(f"--- {header}sample {i} ---\n{prompt}{completion.text}\n")
    out.flush()
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .fsutil import read_utf8
    from .generate.score import format_scores, read_candidates, score, score_report
    from .tokenizer import check_text

    settings = config_from_flags(ScoreConfig, args)
    if args.context_file is not None:
        context = read_utf8(Path(args.context_file), "context file", ConfigError)
    else:
        context = check_text(args.context, "--context")
    candidates = read_candidates(args.candidates)  # every input error before the model loads
    ckpt = _load_for_inference(config_from_flags(InferenceConfig, args))
    results = score(ckpt.model, ckpt.tokenizer, context, candidates, normalize=settings.normalize,
                    top_logprobs=settings.top_logprobs, batch_size=settings.batch_size)
    if args.json:
        print(json.dumps(score_report(results, context=context, normalize=settings.normalize), ensure_ascii=False,
                         allow_nan=False))
    else:
        print(format_scores(results, ckpt.tokenizer))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .tokenizer import check_text

    gen = generate_config_from_args(args)
    system = check_text(_unescape(args.system), "--system") if args.system else None
    grounding = _load_grounding(config_from_flags(GroundingConfig, args))  # a bad index fails before the model loads
    inference = config_from_flags(InferenceConfig, args)
    moderator = _load_moderator(config_from_flags(ModerationConfig, args), inference.device)
    ckpt = _load_for_inference(inference)
    if grounding is not None:
        grounding.check_tokenizer(ckpt.tokenizer)
    gen.check_vocab(ckpt.model.config.vocab_size)  # a bad --logit-bias id fails before the first message
    from .chat import ChatSession, chat_template_of

    session = ChatSession(ckpt.model, ckpt.tokenizer, gen, system=system, template=chat_template_of(ckpt.config),
                          grounding=grounding, moderator=moderator)
    # A typed line with bytes that are not UTF-8 becomes text with lone surrogates, which the tokenizer refuses
    # with one error line (the chat goes on), rather than a decoding error that ends the command.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty()
    out = sys.stdout
    if interactive:
        print("chatting: /reset clears the history, /exit (or Ctrl-D) leaves")
    warned = False
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:  # Ctrl-C at the prompt leaves, as in a shell
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            print("(history cleared)")
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}: /reset clears the history, /exit leaves")
            continue
        dropped = session.dropped_turns
        try:
            check_text(text, "the message")
            session.prompt_ids(text)  # drops old turns if need be; a message too long fails before any output
        except GptforgeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        if session.dropped_turns > dropped and not warned:
            print("(the conversation no longer fits the model's context: dropping the oldest turns)")
            warned = True
        out.write("assistant> " if interactive else "")
        out.flush()
        try:
            for piece in session.send(text):
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:  # stops this reply only; the turn is forgotten
            out.write(" [stopped]")
            session.sources = []
        if session.moderated is not None and session.moderated.side == "output":
            out.write(f"\n(moderation: the rest of the reply was withheld: {_verdict(session.moderated)})")
        elif session.moderated is not None:
            out.write(f"\n(moderation: the message was not sent to the model: {_verdict(session.moderated)})")
        out.write("\n")
        if grounding is not None:
            out.write(_format_sources(session.sources))
        out.flush()
    if interactive:
        out.write("\n")
    return 0


def _load_moderator(config: ModerationConfig, device: str):
    """The moderation classifier of ``--moderation`` (None without it), loaded before the model so that a
    bad label fails at once."""
    if config.moderation is None:
        return None
    from .moderation import Moderator

    return Moderator.load(config, device)


def _verdict(verdict) -> str:
    return f"{verdict.label} {verdict.probability:.2f}"


def _load_grounding(config: GroundingConfig):
    """The knowledge base of ``--knowledge`` (None without it); its tokenizer check waits for the model."""
    if config.knowledge is None:
        return None
    from .knowledge.grounding import Grounding

    return Grounding.load(config)


def _format_sources(hits) -> str:
    """The sources line(s) printed after a grounded reply: id, title and score of each passage in the prompt."""
    if not hits:
        return "sources: none\n"
    lines = [f"  [{i}] {hit.passage.id} | {hit.passage.title} | score {hit.score:.2f}" for i, hit in enumerate(hits, 1)]
    return "sources:\n" + "\n".join(lines) + "\n"


def _check_speculative_args(gen, prompts: list[str], args: argparse.Namespace) -> None:
    plain = GenerateConfig()
    unsupported = [name for name in ("min_new_tokens", "min_p", "repetition_penalty", "presence_penalty",
                                     "frequency_penalty", "no_repeat_ngram_size", "num_beams", "stop", "logprobs",
                                     "logit_bias", "bad_words")
                   if getattr(gen, name) != getattr(plain, name)]
    if len(prompts) != 1 or gen.num_return_sequences != 1:
        unsupported.append("several prompts or sequences")
    if args.json:
        unsupported.append("--json")
    if unsupported:
        raise ConfigError("speculative decoding (--draft-checkpoint) supports temperature, top-k, top-p, seed and "
                          f"max-new-tokens only; drop: {', '.join(unsupported)}")


def _generate_speculative(args: argparse.Namespace, gen, prompt: str, ckpt) -> int:
    import torch

    from .generate import encode_prompt
    from .generate.speculative import speculative_generate

    draft = _load_for_inference(dataclasses.replace(config_from_flags(InferenceConfig, args),
                                                    checkpoint=args.draft_checkpoint))
    if draft.tokenizer.fingerprint != ckpt.tokenizer.fingerprint:
        raise ConfigError(f"the draft model's tokenizer ({draft.tokenizer.fingerprint}) differs from the "
                          f"target's ({ckpt.tokenizer.fingerprint}); speculative decoding needs the same tokenizer")
    generator = None
    if gen.seed is not None:
        generator = torch.Generator(device=ckpt.model.wte.weight.device).manual_seed(gen.seed)
    eos = None if gen.ignore_eos else ckpt.tokenizer.eos_id
    tokens, stats = speculative_generate(
        ckpt.model, draft.model, encode_prompt(ckpt.tokenizer, prompt), max_new_tokens=gen.max_new_tokens,
        num_draft_tokens=args.num_draft_tokens, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
        generator=generator, eos_id=eos)
    sys.stdout.write(prompt + ckpt.tokenizer.decode(tokens) + "\n")
    log.info("speculative decoding: %d of %d drafted tokens accepted (%.0f%%)", stats["accepted"],
             stats["drafted"], 100 * stats["acceptance_rate"])
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import convert_from_hf, convert_to_hf

    if args.from_hf:
        path = convert_from_hf(args.from_hf, args.out)
        print(f"wrote gptforge checkpoint {path}")
    else:
        path = convert_to_hf(args.to_hf, args.out)
        print(f"wrote Hugging Face GPT-2 folder {path}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .config import FinetuneConfig, load_finetune_config

    if args.help_config:
        print(_describe_fields(FinetuneConfig, "finetune"))
        return 0
    values = {"task": args.task, "checkpoint": args.checkpoint, "train_file": args.train, "val_file": args.val,
              "out_dir": args.out, "strategy": args.strategy, "train_on_prompt": args.train_on_prompt or None,
              "merge": args.merge or None}
    config = load_finetune_config(args.config, args.overrides, values)
    grounding = config_from_flags(GroundingConfig, args)
    retrieve = None
    if grounding.knowledge is not None:
        if config.task != "lm":
            raise ConfigError(f"--knowledge grounds --task lm examples; it does not apply to --task {config.task}")
        from .knowledge.grounding import context_retriever

        retrieve = context_retriever(_load_grounding(grounding).retriever, grounding)
    from .finetune import finetune

    result = finetune(config, resume=args.resume, progress=not args.quiet, handle_signals=True, retrieve=retrieve)
    if result.stopped_by is not None:
        return _report_signal_stop(result.stopped_by, result.steps, result.last_checkpoint)
    _print_before_after(result.task, result.before, result.after)
    share = 100 * result.trainable_parameters / max(result.total_parameters, 1)
    print(f"trained {result.trainable_parameters:,} of {result.total_parameters:,} parameters ({share:.2f}%, "
          f"{result.strategy}) for {result.steps} steps" + (" (stopped early)" if result.stopped_early else "")
          + f"; best {result.metric} {result.best_value:.4f} at step {result.best_step}")
    print(f"best: {result.best_checkpoint}")
    if result.merged_checkpoint is not None:
        print(f"merged: {result.merged_checkpoint}")
    print(f"report: {result.out_dir / 'report.json'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.knowledge is not None and args.task not in KNOWLEDGE_TASKS:
        raise ConfigError(f"--knowledge is for --task {' or '.join(KNOWLEDGE_TASKS)}")
    if args.task == "grounded":
        return _evaluate_grounded(args)
    _refuse_grounded_flags(args)
    if args.task == "retrieval":
        return _evaluate_retrieval(args)
    if args.task == "choice":
        return _evaluate_choice(args)
    if args.checkpoint is None:
        raise ConfigError("--checkpoint is required (a checkpoint or adapter folder to evaluate)")
    from .evaluate.tasks import HEADLINE, evaluate_checkpoint
    from .finetune.report import format_task_report

    try:
        result = evaluate_checkpoint(args.checkpoint, args.data, task=args.task, device=args.device,
                                     batch_size=args.batch_size)
    except InvalidTextError as exc:  # a JSON "\udcff" escape, say: name the file it is in
        raise InvalidTextError(f"data file {args.data}: {exc}", exc.position) from None
    task = result["task"]
    print("  ".join(f"{name} {_fmt(result['metrics'].get(name))}" for name in HEADLINE[task]))
    if task != "lm":
        print(format_task_report(task, result["report"]))
    _write_json_report(args.json, result)
    return 0


# The evaluate tasks that read a knowledge base (--knowledge).
KNOWLEDGE_TASKS = ("retrieval", "grounded")
EVALUATE_GROUNDING_OPTIONS = ("passages", "min_score", "knowledge_only", "refusal")
"""The grounding flags of `gptforge evaluate --task grounded` (--knowledge is the command's own)."""


def _evaluate_retrieval(args: argparse.Namespace) -> int:
    if args.knowledge is None:
        raise ConfigError("--task retrieval needs --knowledge KB (a folder built by gptforge index)")
    if args.checkpoint is not None:
        raise ConfigError("--task retrieval evaluates the knowledge base alone; drop --checkpoint")
    from .evaluate.retrieval import HEADLINE, format_retrieval_report
    from .knowledge.index import evaluate_knowledge_base

    result = evaluate_knowledge_base(args.knowledge, args.data)
    print("  ".join(f"{name} {_fmt(result['metrics'][name])}" for name in HEADLINE))
    print(format_retrieval_report(result["report"]))
    _write_json_report(args.json, result)
    return 0


def _evaluate_choice(args: argparse.Namespace) -> int:
    if args.checkpoint is None:
        raise ConfigError("--task choice needs --checkpoint (the language model that scores the choices)")
    from .evaluate.choice import HEADLINE, evaluate_choice_checkpoint, format_choice_report

    result = evaluate_choice_checkpoint(args.checkpoint, args.data, device=args.device, batch_size=args.batch_size)
    print("  ".join(f"{name} {_fmt(result['metrics'][name])}" for name in HEADLINE))
    print(format_choice_report(result["report"]))
    _write_json_report(args.json, result)
    return 0


def _refuse_grounded_flags(args: argparse.Namespace) -> None:
    """The grounding flags and --max-new-tokens answer --task grounded only; elsewhere they would do nothing."""
    defaults = {f.name: f.default for f in dataclasses.fields(GroundingConfig)}
    given = ["--" + name.replace("_", "-") for name in EVALUATE_GROUNDING_OPTIONS
             if getattr(args, name) != defaults[name]]
    if args.max_new_tokens is not None:
        given.append("--max-new-tokens")
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise ConfigError(f"{', '.join(given)} only {verb} to --task grounded")


def _evaluate_grounded(args: argparse.Namespace) -> int:
    if args.checkpoint is None:
        raise ConfigError("--task grounded needs --checkpoint (the model that answers)")
    from .evaluate.grounded import HEADLINE
    from .knowledge.grounded_eval import DEFAULT_ANSWER_TOKENS, evaluate_grounded

    grounding = config_from_flags(GroundingConfig, args)  # grounding flags without --knowledge are an error
    result = evaluate_grounded(args.checkpoint, args.data, grounding=grounding, device=args.device,
                               max_new_tokens=args.max_new_tokens or DEFAULT_ANSWER_TOKENS,
                               batch_size=args.batch_size)
    print("  ".join(f"{name} {_fmt(result['metrics'][name])}" for name in HEADLINE)
          + (f"  (refused {result['report']['refused']})" if result["report"]["refused"] else ""))
    _write_json_report(args.json, result)
    return 0


def _write_json_report(path: Optional[str], result: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")


def cmd_index(args: argparse.Namespace) -> int:
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(IndexConfig)
                if getattr(args, f.name) is not None}
    if args.query is not None:
        return _search_index(args, settings)
    if args.docs is None:
        raise ConfigError("give --docs PATH --out KB to build a knowledge base, or --query TEXT KB to search one")
    if args.knowledge is not None and args.out is not None and Path(args.knowledge) != Path(args.out):
        raise ConfigError(f"two knowledge base folders given ({args.knowledge} and --out {args.out}); give one")
    out = args.out or args.knowledge
    if out is None:
        raise ConfigError("--docs needs --out KB: the knowledge base folder to write")
    if args.k is not None or args.json:
        raise ConfigError("-k and --json are for --query")
    from .knowledge.index import build_knowledge_base

    result = build_knowledge_base(args.docs, out, settings, checkpoint=args.checkpoint, add=args.add)
    kb = result.knowledge_base
    splitting = kb.meta["splitting"]
    counted = splitting["tokenizer"]["kind"]
    budget = (f"at most {splitting['max_passage_tokens']} tokens a passage, "
              + ("estimated from the words" if counted == "estimate" else f"counted by the {counted} tokenizer"))
    holds = f"{_count(len(kb.passages), 'passage')} from {_count(kb.meta['documents'], 'document')}"
    if args.add:
        replaced = f", replacing {_count(result.replaced_documents, 'document')}" if result.replaced_documents else ""
        print(f"added {_count(result.added_passages, 'passage')} from {_count(result.documents, 'document')} to "
              f"{result.path}{replaced}; it holds {holds} ({budget}); {result.seconds:.2f} s")
    else:
        print(f"wrote {result.path}: {holds} ({budget}); {result.seconds:.2f} s")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _search_index(args: argparse.Namespace, settings: dict) -> int:
    from .tokenizer import check_text

    given = [flag for flag, value in (("--docs", args.docs), ("--out", args.out), ("--checkpoint", args.checkpoint))
             if value is not None] + (["--add"] if args.add else []) \
        + ["--" + name.replace("_", "-") for name in settings]
    if given:
        verb, them = ("are", "them") if len(given) > 1 else ("is", "it")
        raise ConfigError(f"--query searches an existing knowledge base; {', '.join(given)} {verb} for building "
                          f"one (drop {them})")
    if args.knowledge is None:
        raise ConfigError("--query needs the knowledge base folder: gptforge index --query TEXT KB")
    query = check_text(args.query, "--query")
    from .knowledge.index import KnowledgeBase

    kb = KnowledgeBase.load(args.knowledge)
    hits = kb.search(query, k=args.k or 5)
    if args.json:
        print(json.dumps({"query": query, "knowledge": str(kb.path), "hits": [h.to_source() for h in hits]},
                         ensure_ascii=False))
        return 0
    if not hits:
        print(f"no passage of {kb.path} shares a word with the query")
    for rank, hit in enumerate(hits, 1):
        print(f"{rank}. {hit.passage.id}  score {hit.score:.4f}  {hit.passage.title}")
        print("   " + hit.passage.text.replace("\n", "\n   "))
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from .evaluate.predict import classify_texts, load_for_task

    texts = _read_texts(args)
    ckpt = load_for_task(args.checkpoint, "classify", args.device)
    for result in classify_texts(ckpt.model, ckpt.tokenizer, texts, ckpt.config["task"]["labels"]):
        if args.json:
            print(json.dumps(result, ensure_ascii=False))
        else:
            probs = "  ".join(f"{label} {p:.3f}" for label, p in result["probabilities"].items())
            print(f"{result['label']}\t{probs}\t{result['text']}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .config import ExplainConfig
    from .explain import explain_checkpoint, write_report

    config = config_from_flags(ExplainConfig, args)
    data = explain_checkpoint(args.checkpoint, prompt=args.prompt, text=args.text, config=config, device=args.device)
    path = write_report(data, args.out, write_json=args.json)
    print(f"wrote {path}" + (f" and {path.with_name('report.json')}" if args.json else ""))
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    from .evaluate.predict import load_for_task, tag_texts

    texts = _read_texts(args)
    ckpt = load_for_task(args.checkpoint, "tokens", args.device)
    for result in tag_texts(ckpt.model, ckpt.tokenizer, texts, ckpt.config["task"]["labels"]):
        if args.json:
            print(json.dumps(result, ensure_ascii=False))
            continue
        print(" ".join(f"{w}/{t}" for w, t in zip(result["words"], result["tags"])))
        for entity in result["entities"]:
            print(f"  {entity['type']}: {entity['text']}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from .config import load_finetune_config, load_tune_config

    values = {"out_dir": args.out}
    config = load_finetune_config(args.config, args.overrides, values)
    space = load_tune_config(args.config)
    from .finetune.tune import tune

    result = tune(config, space, trials=args.trials, progress=not args.quiet)
    print(result.summary)
    print(f"best config: {result.best_config_path}")
    print(f"trials: {result.trials_path}")
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    from .config import MonitorConfig
    from .monitor import run_monitor
    from .train.signals import StopSignals, signal_name

    config = config_from_flags(MonitorConfig, args)
    with StopSignals() as signals:
        summary = run_monitor(config, should_stop=lambda: signals.signum is not None,
                              on_alert=lambda alert: print(alert.describe(), file=sys.stderr, flush=True))
    stopped_by = signal_name(signals.signum) if signals.signum is not None else None
    print((f"stopped by {stopped_by}; " if stopped_by else "") + summary.describe()
          + ("; run the same command to resume" if stopped_by else ""))
    return _stop_exit_code(stopped_by)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.api_key is None:
        args.api_key = os.environ.get("GPTFORGE_API_KEY") or None
    config = config_from_flags(ServeConfig, args)
    grounding = _load_grounding(config_from_flags(GroundingConfig, args))  # checked against the model in create_app
    moderator = _load_moderator(config_from_flags(ModerationConfig, args), config.device)
    from .serve import create_app, run_server

    app = create_app(config, grounding=grounding, moderator=moderator)
    log.info("listening on http://%s:%d (Ctrl-C or SIGTERM to stop)", config.host, config.port)
    run_server(config, app, log_level="warning" if args.quiet else "info")
    if app.state.server.aborting:
        # A second signal means "stop now": every open request has had its error event; skip the interpreter's
        # teardown of torch (about a second here), which is all that is left to do.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _print_before_after(task: str, before, after) -> None:
    from .finetune.report import format_before_after, format_task_report

    print(format_before_after(before["metrics"] if before else None, after["metrics"], task))
    if task == "classify" and before is not None:
        from .evaluate.classification import format_side_by_side

        print(format_side_by_side(before["report"], after["report"]))
    elif task != "lm":
        print(format_task_report(task, after["report"]))


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _read_lines(path: Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file; one error naming the file, the line and the byte otherwise."""
    from .fsutil import read_utf8

    return read_utf8(path, what, ConfigError).splitlines()

def _read_texts(args: argparse.Namespace) -> list[str]:
    """Texts from --text (repeatable) or one per non-empty line of --file."""
    from .tokenizer import check_text

    if args.file is None:
        return [check_text(text, "--text") for text in args.text]
    path = Path(args.file)
    texts = [line.strip() for line in _read_lines(path, "text file") if line.strip()]
    if not texts:
        raise ConfigError(f"text file {path} has no texts (one per line)")
    return texts


def _describe_fields(cls, section: str) -> str:
    import dataclasses

    from .config import field_docs

    docs = field_docs(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{f.name}={default!r}" + (f"\n      {docs[f.name]}" if f.name in docs else ""))
    return f"[{section}]\n" + "\n".join(lines)


# --------------------------------------------------------------------------------------------------
def _unescape(text: str) -> str:
    r"""``\n`` and ``\t`` typed on a command line or in a prompt file mean a newline and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """One prompt from --prompt, or one per non-empty line of --prompt-file (generated as a batch)."""
    from .tokenizer import check_text

    if args.prompt_file is None:
        return [check_text(args.prompt, "--prompt")]  # bytes that are not UTF-8: one line, before loading
    path = Path(args.prompt_file)
    prompts = [_unescape(line) for line in _read_lines(path, "prompt file") if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt file {path} has no prompts (one per line)")
    return prompts


def _load_for_inference(config: InferenceConfig):
    from .checkpoint import load_for_inference

    return load_for_inference(config)  # the loader logs (INFO, on stderr) which folder it loaded


# --------------------------------------------------------------------------------------------------
# Flags derived from config dataclasses: each option's name, type, default, help and allowed values are
# stated once, on its field (see gptforge.config.flag); ranges are checked by the dataclass's validate().
def add_config_flags(p: argparse.ArgumentParser, cls: type, *, only: Optional[Sequence[str]] = None,
                     defaults: Optional[dict] = None) -> None:
    """One flag per field of the config dataclass ``cls`` (or per field named in ``only``, in that order):
    ``--field-name`` and the aliases its metadata declares, with the field's docstring as help and its
    default (or the one in ``defaults``, for a command whose default differs)."""
    import typing

    from .config import field_docs, flag_spec

    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in only or list(fields):
        f, spec = fields[name], flag_spec(fields[name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if defaults and name in defaults:
            default = defaults[name]
        hint = _without_none(hints[name])
        flags = ["--" + name.replace("_", "-"), *spec.aliases]
        help_text = docs.get(name, "").replace("%", "%%")
        kwargs: dict = dict(dest=name, default=default)
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            help_text += " (on by default)" if default else ""
        else:
            if typing.get_origin(hint) is list:
                kwargs["action"] = "append"
                kwargs["default"] = None  # argparse appends to a given default; the dataclass fills it in
                hint = typing.get_args(hint)[0]
                help_text += " Repeatable."
            elif default is not None and not spec.required:
                help_text += f" (default: {default})"
            kwargs["type"] = _flag_type(hint, escapes=spec.escapes)
            if spec.escapes:
                help_text += r" \n and \t mean a newline and a tab."
            if spec.choices:
                kwargs["choices"] = list(spec.choices)
            if spec.metavar:
                kwargs["metavar"] = spec.metavar
            if spec.required:
                kwargs["required"] = True
        p.add_argument(*flags, help=help_text, **kwargs)


def config_from_flags(cls: type, args: argparse.Namespace):
    """The validated config dataclass ``cls`` from the flags :func:`add_config_flags` added for it."""
    from .config import config_from_dict

    # None from a flag whose field defaults to something else (a repeatable flag never given) keeps that default.
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if hasattr(args, f.name) and (getattr(args, f.name) is not None or f.default is None)}
    return config_from_dict(cls, values, cls.__name__.removesuffix("Config").lower()).validate()


def _without_none(hint):
    import types
    import typing

    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _flag_type(hint, *, escapes: bool = False):
    """An argparse type: the text as ``hint`` (converted as config files are), one-line message on failure."""
    from .config import coerce_value

    def parse(text: str):
        try:
            value = coerce_value(_unescape(text) if escapes else text, hint, "")
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc).strip()) from None
        return value

    parse.__name__ = getattr(hint, "__name__", "value")
    return parse


def _int_at_least(minimum: int):
    """An argparse type: an integer >= minimum, with the one-line message argparse shows."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in the same one-line style as everything else."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def build_parser() -> argparse.ArgumentParser:
    def add_output_flags(p: argparse.ArgumentParser, default) -> None:
        p.add_argument("-v", "--verbose", action="store_true", default=default, help="show debug logs")
        p.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="no progress bars: only warnings, errors and results")

    # -v / -q work before or after the subcommand; SUPPRESS keeps a subcommand's unset flag from
    # overwriting one given before it (each parser needs its own actions for that).
    common = argparse.ArgumentParser(add_help=False)
    add_output_flags(common, argparse.SUPPRESS)
    parser = _Parser(prog="gptforge", description="From raw text to a trained, served GPT.")
    add_output_flags(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _add = sub.add_parser

    def add_parser(name, **kw):
        return _add(name, parents=[common], **kw)

    sub.add_parser = add_parser  # every subcommand takes -v / -q

    p = sub.add_parser("prepare", help="tokenize a corpus into train/val token files")
    p.add_argument("--corpus", default="shakespeare",
                   help="'shakespeare' (the bundled default), a .txt file, a folder of text files, or a .jsonl file with a 'text' field")
    p.add_argument("--tokenizer", choices=["bpe", "char"], default="bpe", help="tokenizer to train (default: bpe)")
    p.add_argument("--vocab-size", type=_positive_int, default=4096, help="BPE vocabulary size (default: 4096)")
    p.add_argument("--val-fraction", type=_float, default=0.1, help="share of the corpus held out for validation")
    p.add_argument("--tokenizer-from", default=None, metavar="DIR",
                   help="reuse the tokenizer of a checkpoint, run, prepared-data or Hugging Face folder instead of training one")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="pretrain a GPT from a YAML config",
                       description="Pretrain a GPT. Any config key can be overridden as --section.key=value "
                                   "(e.g. --train.max_steps=200); --help-config lists them all.")
    p.add_argument("--config", default=None, help="YAML config file, or the name of a packaged preset (demo, gpt2-124m)")
    p.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its latest checkpoint")
    p.add_argument("--help-config", action="store_true", help="list every config key with its type, default and meaning")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate text from a checkpoint or Hugging Face model",
                       description="Generate text. Temperature 0 is greedy; --num-beams > 1 is beam search.")
    add_config_flags(p, InferenceConfig)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="", help="text to continue (default: start from end-of-text)")
    src.add_argument("--prompt-file", default=None,
                     help="one prompt per line, generated as a batch (write \\n for a newline inside a prompt)")
    add_config_flags(p, GenerateConfig)
    _add_ban_file_flag(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON line per prompt: tokens, text, log-probs, finish reason")
    p.add_argument("--draft-checkpoint", default=None, help="speculative decoding with this smaller model (same tokenizer)")
    p.add_argument("--num-draft-tokens", type=_positive_int, default=4, help="tokens the draft proposes per step")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("score", help="score and rank candidate texts by their log-probability after a context",
                       description="Score each candidate after the context (prefilled once) and rank them; "
                                   "see docs/scoring.md.")
    add_config_flags(p, InferenceConfig)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--context", default=None, metavar="TEXT", help="the text the candidates follow (may be empty)")
    src.add_argument("--context-file", default=None, metavar="FILE", help="the context: this file's whole text")
    p.add_argument("--candidates", required=True, metavar="FILE",
                   help="one candidate per line, or JSON lines with \"text\"")
    add_config_flags(p, ScoreConfig)
    p.add_argument("--json", action="store_true", help="print one JSON object: the candidates best first, with "
                   "per-token log-probabilities")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("chat", help="talk with a model in the terminal, with history",
                       description="A multi-turn chat: each line you type is a user message, the reply streams back. "
                                   "/reset clears the history (the system prompt stays); /exit or Ctrl-D leaves.")
    add_config_flags(p, InferenceConfig)
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt, kept for the whole conversation")
    add_config_flags(p, GenerateConfig, only=CHAT_OPTIONS, defaults=CHAT_DEFAULTS)
    _add_ban_file_flag(p)
    add_config_flags(p, GroundingConfig)
    add_config_flags(p, ModerationConfig)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("convert", help="convert between Hugging Face GPT-2 folders and gptforge checkpoints")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="DIR_OR_ID", help="Hugging Face GPT-2 folder or hub id to import")
    way.add_argument("--to-hf", metavar="CKPT", help="gptforge checkpoint (or run folder) to export")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_convert)

    # The shortcuts of the finetune command take their choices and defaults from FinetuneConfig.
    from .config import FINETUNE_STRATEGIES, FINETUNE_TASKS, FinetuneConfig

    p = sub.add_parser("finetune", help="fine-tune a model for a task (lm, classify, tokens)",
                       description="Fine-tune a pretrained model. Any fine-tuning key can also be given as "
                                   "--key=value (e.g. --learning_rate=1e-3 --patience=3); --help-config lists them.")
    p.add_argument("--task", choices=FINETUNE_TASKS, default=None,
                   help=f"lm (instruction/chat data), classify (text → label), tokens (word → tag) "
                        f"(default: {FinetuneConfig.task})")
    p.add_argument("--checkpoint", default=None, help="model to start from: checkpoint, run folder, HF folder or hub id")
    p.add_argument("--train", default=None, metavar="FILE", help="training examples (JSONL, CSV or CoNLL)")
    p.add_argument("--val", default=None, metavar="FILE", help="validation examples (default: hold out val_fraction of --train)")
    p.add_argument("--config", default=None, help="YAML file of fine-tuning keys")
    p.add_argument("--out", default=None, metavar="DIR", help=f"run folder (default: {FinetuneConfig.out_dir})")
    p.add_argument("--strategy", choices=FINETUNE_STRATEGIES, default=None,
                   help=f"which weights train (default: {FinetuneConfig.strategy})")
    p.add_argument("--train-on-prompt", action="store_true", help="lm: also learn the prompt tokens")
    p.add_argument("--merge", action="store_true", help="lora: also write a full checkpoint with the update merged in")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--help-config", action="store_true", help="list every fine-tuning key with its default and meaning")
    add_config_flags(p, GroundingConfig, only=FINETUNE_GROUNDING_OPTIONS)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="evaluate a (fine-tuned) checkpoint or a knowledge base on a data file")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint or adapter folder (or any model, for --task lm); required but for --task retrieval")
    p.add_argument("--data", required=True, metavar="FILE",
                   help="examples in the task's fine-tuning format; for retrieval, JSON lines with question and "
                        "passage_id (or doc_id)")
    p.add_argument("--task", choices=["lm", "classify", "tokens", "retrieval", "grounded", "choice"], default=None,
                   help="default: the checkpoint's task; retrieval: recall@1/5/10 and MRR of --knowledge; "
                        "grounded: exact match, token F1 and source hits of the checkpoint's answers from --knowledge; "
                        "choice: multiple-choice accuracy (acc, acc_norm) of JSON lines with context, choices, answer")
    p.add_argument("--knowledge", default=None, metavar="KB", help="knowledge base folder (gptforge index)")
    add_config_flags(p, GroundingConfig, only=EVALUATE_GROUNDING_OPTIONS)
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="grounded: most tokens of each answer (default: 32)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the full report to this JSON file")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_evaluate)

    for name, what in (("classify", "label texts with a fine-tuned classifier"),
                       ("tag", "tag the words of texts with a fine-tuned token tagger")):
        p = sub.add_parser(name, help=what)
        p.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint or adapter folder")
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--text", action="append", help="a text (repeatable)")
        src.add_argument("--file", default=None, help="one text per line")
        p.add_argument("--json", action="store_true", help="one JSON line per text")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
        p.set_defaults(func=cmd_classify if name == "classify" else cmd_tag)

    p = sub.add_parser("explain", help="explain a model's tokens and attention, or a classifier's label, in an HTML "
                                       "report", description="Writes DIR/report.html (self-contained), its PNGs "
                                       "and with --json DIR/report.json. See docs/explain.md.")
    p.add_argument("--checkpoint", required=True, help="language model or fine-tuned classifier")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", default=None, help="language model: continue this greedily, then explain it all")
    src.add_argument("--text", default=None, help="explain this text as given (a classifier: its label)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the report (new, empty or an earlier report)")
    from .config import ExplainConfig

    add_config_flags(p, ExplainConfig)
    p.add_argument("--json", action="store_true", help="also write the report's data to DIR/report.json")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("tune", help="search fine-tuning hyperparameters with Optuna",
                       description="Run --trials fine-tuning runs with hyperparameters drawn from the config's "
                                   "tune: section; bad trials are pruned early. Writes the best config and a summary.")
    p.add_argument("--config", required=True, help="YAML fine-tuning config with a tune: section")
    p.add_argument("--trials", type=_positive_int, default=None, help="number of trials (default: tune.trials)")
    p.add_argument("--out", default=None, metavar="DIR", help="folder for the trials, best config and summary")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("index", help="build, extend or search a knowledge base of your documents (BM25)",
                       description="Build a knowledge base: gptforge index --docs PATH --out KB [--add] "
                                   "[--checkpoint MODEL]. Search it: gptforge index --query TEXT KB [-k 5] [--json]. "
                                   "PATH is a folder of .md/.txt files or a .jsonl file of documents "
                                   "(id, title, text) or FAQ pairs (question, answer). See docs/knowledge.md.")
    p.add_argument("knowledge", nargs="?", default=None, metavar="KB",
                   help="the knowledge base folder to search with --query (or to build, like --out)")
    p.add_argument("--docs", default=None, metavar="PATH", help="documents to index: a folder of .md/.txt files, "
                   "one such file, or a .jsonl file")
    p.add_argument("--out", default=None, metavar="KB", help="knowledge base folder to write (replaced whole)")
    p.add_argument("--add", action="store_true",
                   help="add --docs to the knowledge base at --out, replacing documents given again")
    p.add_argument("--checkpoint", default=None, metavar="MODEL",
                   help="count passage tokens with this model's tokenizer (default: estimate from the words)")
    add_config_flags(p, IndexConfig)
    # Unset options stay None, so that --add can tell them from the knowledge base's own settings.
    p.set_defaults(**{f.name: None for f in dataclasses.fields(IndexConfig)})
    p.add_argument("--query", default=None, metavar="TEXT", help="search the knowledge base KB for TEXT")
    p.add_argument("-k", type=_positive_int, default=None, help="passages to print for --query (default: 5)")
    p.add_argument("--json", action="store_true", help="--query: print the hits as one JSON object")
    p.set_defaults(func=cmd_index)

    from .config import MonitorConfig

    p = sub.add_parser("monitor", help="classify a stream of JSON lines, alert on sentiment shifts, draw the trend",
                       description="Classify JSON lines (text, optional time and key) from a file, a folder of "
                                   "*.jsonl or stdin (-) in batches; keep rolling windows per key, alert when a "
                                   "label's share crosses --alert LABEL:SHARE, draw DIR/trend.png. Rerunning the "
                                   "same command resumes where it stopped. See docs/monitor.md.")
    add_config_flags(p, MonitorConfig)
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API",
                       description="OpenAI-compatible HTTP server with continuous batching: /v1/models, "
                                   "/v1/completions, /v1/chat/completions, /v1/classify, /health, /metrics "
                                   "and a chat page at /. SIGTERM finishes in-flight requests, then exits.")
    add_config_flags(p, ServeConfig)
    add_config_flags(p, GroundingConfig)
    add_config_flags(p, ModerationConfig)
    p.set_defaults(func=cmd_serve)
    return parser


# Subcommands whose config is one flat section: any key can be given as --key=value.
_FLAT_OVERRIDE_COMMANDS = ("finetune", "tune")


def _split_overrides(command: Optional[str], rest: list[str]) -> list[str]:
    """``--train.max_steps=5`` and ``--train.max_steps 5`` become overrides (train); for finetune and tune,
    ``--learning_rate=1e-3`` (any fine-tuning config key)."""
    overrides: list[str] = []
    i = 0
    while i < len(rest):
        item = rest[i]
        key = item[2:].split("=", 1)[0] if item.startswith("--") else ""
        flat = command in _FLAT_OVERRIDE_COMMANDS and key != ""
        if not flat and (command != "train" or "." not in key):
            raise ConfigError(f"unrecognized argument {item!r}" + (
                " (config overrides look like --section.key=value and belong to `gptforge train`)" if "." in key else ""))
        if "=" in item:
            overrides.append(item)
        elif i + 1 < len(rest):
            overrides.append(f"{item}={rest[i + 1]}")
            i += 1
        else:
            raise ConfigError(f"override {item!r} has no value (write {item}=VALUE)")
        i += 1
    return overrides


class _StderrHandler(logging.Handler):
    """Writes each record to whatever sys.stderr is at the time (a test harness may swap it), through
    ``tqdm.write`` so that a message never lands in the middle of a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s" if not verbose else "%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("gptforge")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
    except SystemExit as exc:  # --help, or a usage error already reported by _Parser.error
        return int(exc.code or 0)
    _setup_logging(args.verbose, args.quiet)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        args.overrides = _split_overrides(args.command, rest)
        return func(args)
    except GptforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `gptforge generate ... | head`
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
