"""`/v1/classify` with ``explain: true``: each input's token attributions beside the usual answer, over real HTTP."""

from __future__ import annotations

import httpx
import pytest

from gptforge.config import ServeConfig
from gptforge.explain import attribute
from tests.explain.explain_utils import LABELS, train_z_classifier
from tests.serve.serve_utils import serving
from tests.serve.test_server import assert_error

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    path = train_z_classifier(tmp_path_factory.mktemp("explain-serve") / "z", steps=200)
    config = ServeConfig(checkpoint=str(path), device="cpu")
    with serving(config) as server:
        yield server


def post(live, body):
    return httpx.post(live.url + "/v1/classify", json=body, timeout=120)


def test_explain_returns_each_inputs_attributions(live):
    texts = ["abczefgh", "abcdefgh"]
    plain = post(live, {"input": texts})
    assert plain.status_code == 200, plain.text
    assert all("attributions" not in d for d in plain.json()["data"])  # only when asked
    r = post(live, {"input": texts, "explain": True})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["label"] for d in data] == [d["label"] for d in plain.json()["data"]] == ["has_z", "no_z"]
    for d, p in zip(data, plain.json()["data"]):
        assert d["probabilities"] == pytest.approx(p["probabilities"], abs=1e-5)
    for text, d in zip(texts, data):
        a = d["attributions"]
        assert a["method"] == "ig" and a["target"] == d["label"]  # integrated gradients by default
        assert [t["text"] for t in a["tokens"]] == list(text)
        ref = attribute(live.state.model, live.state.tokenizer, text, LABELS, method="ig")
        assert [t["attribution"] for t in a["tokens"]] == pytest.approx([t["attribution"] for t in ref["tokens"]],
                                                                        abs=1e-5)
        assert a["delta"] == pytest.approx(ref["delta"], abs=1e-5)
    one = post(live, {"input": "abczefgh", "explain": True, "explain_method": "occlusion"}).json()["data"][0]
    occlusion = one["attributions"]
    assert occlusion["method"] == "occlusion" and occlusion["delta"] is None
    scores = [t["attribution"] for t in occlusion["tokens"]]
    assert max(range(8), key=scores.__getitem__) == 3  # the z decides


@pytest.mark.parametrize("body, param, message", [
    ({"input": "abc", "explain": "yes"}, "explain", "boolean"),
    ({"input": "abc", "explain": True, "explain_method": "shap"}, "explain_method", "'ig' or 'occlusion'"),
    ({"input": "abc", "explain_method": "ig"}, "explain_method", "explain_method applies only with explain: true"),
    ({"input": ["abc", ""], "explain": True}, "input", "is empty"),
])
def test_bad_explain_values_are_one_clear_400(live, body, param, message):
    assert_error(post(live, body), 400, param, message=message)
