"""Writing an explanation: one self-contained HTML page (inline CSS and script, the heatmaps embedded as
``data:`` PNGs; it loads nothing, so it opens from disk), the same PNGs beside it, and optionally the data
as JSON. The folder is written aside and moved into place when complete."""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
from pathlib import Path
from typing import Any, Optional

from ..fsutil import check_output_dir, json_safe, publish_folder

REPORT_FILE = "report.html"
JSON_FILE = "report.json"


def _label(text: str) -> str:
    """A token as an axis label: whitespace made visible, matplotlib's mathtext ($) escaped."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)  # \n, \t, \x07 as escapes
    shown = shown.replace(" ", "\u2423").replace("$", r"\$")
    return shown if len(shown) <= 12 else shown[:11] + "\u2026"


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _heatmap_figure(maps: list[tuple[str, list[list[float]]]], tokens: list[str], title: str):
    from matplotlib.figure import Figure

    T = len(tokens)
    n = len(maps)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    side = max(3.0, min(7.0, 0.22 * T + 1.5))
    fig = Figure(figsize=(side * cols, side * rows + 0.4), layout="constrained")
    fig.suptitle(title)
    labels = [_label(t) for t in tokens]
    for k, (name, matrix) in enumerate(maps):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(name, fontsize=9)
        if T <= 48:
            ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(T), labels, fontsize=7)
        ax.set_xlabel("key (attended to)", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
    return fig


def _attribution_figure(data: dict[str, Any]):
    from matplotlib.figure import Figure

    methods = list(data["attributions"])
    tokens = [_label(t["text"]) for t in data["attributions"][methods[0]]["tokens"]]
    T = len(tokens)
    fig = Figure(figsize=(max(5.0, min(16.0, 0.35 * T + 2)), 2.4 * len(methods) + 0.4), layout="constrained")
    fig.suptitle(f"token attributions to {data['label']!r} (its probability)")
    for k, method in enumerate(methods):
        values = [t["attribution"] for t in data["attributions"][method]["tokens"]]
        ax = fig.add_subplot(len(methods), 1, k + 1)
        ax.bar(range(T), values, color=["#2a9d5c" if v >= 0 else "#d1495b" for v in values])
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(_METHOD_NAMES[method], fontsize=9)
        ax.set_xticks(range(T), tokens, rotation=90 if T > 12 else 0, fontsize=7)
    return fig


_METHOD_NAMES = {"ig": "integrated gradients", "occlusion": "occlusion (token replaced by padding)"}


def figures(data: dict[str, Any]) -> dict[str, bytes]:
    """The report's PNGs by file name: one heatmap grid per chosen layer (its chosen heads, and their mean when
    every head is shown), the attention rollout, and for a classifier the attribution bars."""
    att = data["attention"]
    pngs: dict[str, bytes] = {}
    every_head = len(att["heads"]) > 1
    for layer in att["layers"]:
        maps = [(f"head {h}", att["maps"][str(layer)][str(h)]) for h in att["heads"]]
        if every_head:
            maps.append(("mean of heads", att["head_mean"][str(layer)]))
        pngs[f"attention_layer{layer}.png"] = _png(_heatmap_figure(maps, att["tokens"], f"layer {layer} attention"))
    pngs["attention_rollout.png"] = _png(_heatmap_figure([("rollout", att["rollout"])], att["tokens"],
                                                         "attention rollout (all layers)"))
    if data["kind"] == "classify":
        pngs["attributions.png"] = _png(_attribution_figure(data))
    return pngs


# --------------------------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 70rem; color: #222; padding: 0 1rem; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.text { line-height: 2.1; font-family: ui-monospace, monospace; font-size: 0.95rem; white-space: pre-wrap;
        border: 1px solid #ddd; padding: 0.6rem; border-radius: 4px; }
.tok { position: relative; border-radius: 3px; padding: 1px 0; cursor: default; outline: none; }
.tok.generated { text-decoration: underline dotted #555; }
.tok.focus { box-shadow: 0 0 0 2px #333; }
.tok .tip { display: none; position: absolute; left: 0; top: 1.8em; z-index: 10; background: #fff;
            border: 1px solid #888; border-radius: 4px; padding: 0.4rem 0.6rem; white-space: nowrap;
            font-size: 0.8rem; line-height: 1.4; box-shadow: 0 2px 6px rgba(0,0,0,.2); }
.tok:hover .tip, .tok:focus .tip { display: block; }
.tip table { border-collapse: collapse; } .tip td { padding: 0 0.4rem; }
table.probs td, table.probs th { padding: 0.15rem 0.6rem; text-align: left; }
.legend { font-size: 0.85rem; color: #555; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #555; font-size: 0.9rem; }
"""

_SCRIPT = """
(function () {
  var tokens = document.querySelectorAll('.tok');
  tokens.forEach(function (t) {
    t.addEventListener('mouseenter', function () { t.classList.add('focus'); });
    t.addEventListener('mouseleave', function () { t.classList.remove('focus'); });
  });
  document.body.dataset.tokens = String(tokens.length);
  document.body.dataset.ready = '1';
})();
"""


def _show(text: str) -> str:
    """A token's text for the page: escaped, a newline shown as a visible mark before the line break."""
    return html.escape(text).replace("\n", "\u21b5\n")


def _prob_colour(p: Optional[float]) -> str:
    if p is None:
        return "#eee"
    return f"hsl({120 * p:.0f}, 70%, 80%)"  # red (unsure) to green (sure)


def _attr_colour(a: float, scale: float) -> str:
    strength = min(1.0, abs(a) / scale) if scale > 0 else 0.0
    rgb = "42, 157, 92" if a >= 0 else "209, 73, 91"
    return f"rgba({rgb}, {0.08 + 0.72 * strength:.2f})"


def _lm_tokens_html(data: dict[str, Any]) -> str:
    spans = []
    for t in data["tokens"]:
        if "prob" in t:
            rows = "".join(f"<tr><td>{html.escape(repr(a['text']))}</td><td>{a['prob']:.4f}</td></tr>"
                           for a in t["alternatives"])
            tip = (f"<b>{html.escape(repr(t['text']))}</b> p = {t['prob']:.4f} (rank {t['rank']})<br>"
                   f"entropy {t['entropy']:.3f} nats<br>top {len(t['alternatives'])}:<table>{rows}</table>")
        else:
            tip = f"<b>{html.escape(repr(t['text']))}</b> first token: no prediction"
        cls = "tok generated" if t["generated"] else "tok"
        spans.append(f'<span class="{cls}" tabindex="0" data-index="{t["index"]}" data-prob="{t.get("prob", "")}" '
                     f'style="background:{_prob_colour(t.get("prob"))}">{_show(t["text"])}'
                     f'<span class="tip">{tip}</span></span>')
    return "".join(spans)


def _sure_html(data: dict[str, Any]) -> str:
    by_index = {t["index"]: t for t in data["tokens"]}

    def items(indices):
        return "".join(f"<li>{html.escape(repr(by_index[i]['text']))} at token {i}: p = {by_index[i]['prob']:.4f}, "
                       f"entropy {by_index[i]['entropy']:.3f}</li>" for i in indices)
    return (f"<h3>Most sure</h3><ul id=\"most-sure\">{items(data['most_sure'])}</ul>"
            f"<h3>Least sure</h3><ul id=\"least-sure\">{items(data['least_sure'])}</ul>")


def _probabilities_html(probabilities: dict[str, float], label: str) -> str:
    rows = "".join(f"<tr><td>{'<b>' if name == label else ''}{html.escape(name)}{'</b>' if name == label else ''}"
                   f"</td><td>{p:.4f}</td></tr>" for name, p in probabilities.items())
    return f'<table class="probs" id="probabilities"><tr><th>label</th><th>probability</th></tr>{rows}</table>'


def _attributions_html(data: dict[str, Any]) -> str:
    parts = []
    for method, a in data["attributions"].items():
        scale = max((abs(t["attribution"]) for t in a["tokens"]), default=0.0)
        spans = "".join(
            f'<span class="tok" tabindex="0" data-index="{t["index"]}" data-attribution="{t["attribution"]:.6g}" '
            f'style="background:{_attr_colour(t["attribution"], scale)}">{_show(t["text"])}'
            f'<span class="tip"><b>{html.escape(repr(t["text"]))}</b> attribution {t["attribution"]:+.4f}</span></span>'
            for t in a["tokens"])
        total = sum(t["attribution"] for t in a["tokens"])
        difference = data["probabilities"][data["label"]] - data["baseline_prob"]
        extra = ""
        if a["delta"] is not None:
            extra = (f"; they sum to {total:+.4f}, F(text) - F(baseline) = {difference:+.4f} (completeness gap "
                     f"{a['delta']:+.2e})")
            if abs(a["delta"]) > 0.05 * max(abs(difference), 0.01):
                extra += (". <b class=\"warning\">The gap is large: the model changes sharply on the path from the "
                          "baseline; raise --ig-steps for attributions that add up</b>")
        parts.append(f'<h3>{_METHOD_NAMES[method]}</h3><div class="text" id="attr-{method}">{spans}</div>'
                     f'<p class="legend">green: pushes towards {html.escape(data["label"])!s}, red: away from it; '
                     f"attributions in units of its probability{extra}</p>")
    return "".join(parts)


def _img(name: str, png: bytes) -> str:
    return (f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            f"<figcaption class=\"note\">{html.escape(name)}</figcaption></figure>")


def render_html(data: dict[str, Any], pngs: dict[str, bytes]) -> str:
    """The self-contained report page for ``data`` (:mod:`.core`) with ``pngs`` (:func:`figures`) embedded."""
    att = data["attention"]
    sections = []
    if data["kind"] == "lm":
        title = "Why the model said it"
        n_gen = sum(t["generated"] for t in data["tokens"])
        source = (f"The prompt, then {n_gen} token(s) generated greedily (dotted underline)." if data["prompt"] is not None
                  else "The text as given.")
        sections.append(
            f"<h2>Tokens</h2><p class=\"legend\">Each token coloured by the probability the model gave it "
            f"(red: unsure, green: sure); hover or focus a token for its top {data['top_k']} alternatives and the "
            f"entropy. {source}</p>"
            f'<div class="text" id="tokens">{_lm_tokens_html(data)}</div>{_sure_html(data)}')
    else:
        title = "Why the classifier chose its label"
        sections.append(f"<h2>Prediction: {html.escape(data['label'])}</h2>"
                        f"{_probabilities_html(data['probabilities'], data['label'])}"
                        f"<h2>Token attributions</h2>{_attributions_html(data)}")
    images = "".join(_img(name, png) for name, png in pngs.items() if name.startswith("attention_layer"))
    prefix = (f"<p class=\"note\">This model is prefix-tuned: {att['prefix_keys']} learned prefix keys are left out "
              f"of the maps, so a row sums to the share of attention its tokens got.</p>" if att["prefix_keys"] else "")
    sections.append(f'<h2>Attention</h2>{prefix}<div id="attention">{images}</div>'
                    f"<h2>Attention rollout</h2><p class=\"legend\">Abnar &amp; Zuidema (2020): per layer the heads' mean "
                    f"plus the identity (the residual), rows normalised, multiplied through the layers.</p>"
                    f"<div id=\"rollout\">{_img('attention_rollout.png', pngs['attention_rollout.png'])}</div>")
    if "attributions.png" in pngs:
        sections.append(f"<h2>Attribution chart</h2>{_img('attributions.png', pngs['attributions.png'])}")
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>gptforge explain: {html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p class=\"note\">checkpoint {html.escape(str(data.get('checkpoint', '')))}"
            f"</p>{''.join(sections)}<script>{_SCRIPT}</script></body></html>\n")


def write_report(data: dict[str, Any], out: str | Path, *, write_json: bool = False) -> Path:
    """Write ``report.html``, the PNGs and (``write_json``) ``report.json`` into the folder ``out``, which
    must be new, empty or an earlier report; returns the HTML's path."""
    out = Path(out)
    check_output_dir(out, replaceable=(out / REPORT_FILE).is_file(), what="an explain report")
    pngs = figures(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, png in pngs.items():
            (tmp / name).write_bytes(png)
        (tmp / REPORT_FILE).write_text(render_html(data, pngs), encoding="utf-8")
        if write_json:
            (tmp / JSON_FILE).write_text(json.dumps(json_safe(data), indent=1, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / REPORT_FILE


__all__ = ["JSON_FILE", "REPORT_FILE", "figures", "render_html", "write_report"]
