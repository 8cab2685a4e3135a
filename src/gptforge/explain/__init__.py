"""Explanations (`gptforge explain`): why a language model said what it said, and why a classifier chose its label.

- :mod:`.tokens`: per-token probability, rank, entropy and top alternatives, from one forward's logits;
- :mod:`.attention`: every layer's and head's attention probabilities through the model's eager recording
  path (:func:`gptforge.model.recording.recording_attention`), and attention rollout;
- :mod:`.attribution`: a classifier's token attributions by integrated gradients and occlusion (captum);
- :mod:`.core`: the report's data for a checkpoint and a prompt or text; :mod:`.report`: the HTML, PNGs, JSON.

An app: it uses the model, the decode engine, evaluate and heads, never serve, chat or the CLI.
"""

from .attention import attention_maps, attention_rollout
from .attribution import attribute, classify_with_attributions
from .core import explain_checkpoint, explain_classifier, explain_language_model
from .report import write_report
from .tokens import sure_and_unsure, token_probabilities

__all__ = ["attention_maps", "attention_rollout", "attribute", "classify_with_attributions", "explain_checkpoint",
           "explain_classifier", "explain_language_model", "sure_and_unsure", "token_probabilities", "write_report"]
