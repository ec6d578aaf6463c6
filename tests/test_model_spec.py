"""The models declared as data (config/models.yaml, models/spec.py): the shipped file, the fixed
input vector, the schema hash, and the refusals."""
from __future__ import annotations

import copy
import math

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from models.spec import MODELS_FILE, ModelSpecError, load_models

SHIPPED = yaml.safe_load(MODELS_FILE.read_text())


def test_the_shipped_models_are_the_three_of_the_spec_with_their_horizons():
    specs = load_models()
    # read off the file by hand: name -> (score field, horizon in ms, what is the positive)
    assert {n: (s.score_field, s.horizon_ms, s.label_rule.positive) for n, s in specs.items()} == {
        "purchase_propensity": ("p_purchase_24h", 24 * 3600 * 1000, "target"),
        "ctr": ("p_click_30m", 30 * 60 * 1000, "target"),
        "churn_risk": ("p_churn_30d", 30 * 24 * 3600 * 1000, "timeout"),
    }
    assert specs["churn_risk"].label_rule.hits("page_view")  # any event ends a silence
    assert specs["ctr"].label_rule.hits("push_opened") and not specs["ctr"].label_rule.hits("order_completed")
    assert specs["ctr"].by_event == ("ad_impression", "push_sent", "sms_sent", "email_sent")


def test_every_input_is_a_numeric_feature_of_the_registry_file():
    # the registry read as plain YAML, expanded by hand: name_window for windowed entries
    doc = yaml.safe_load((MODELS_FILE.parent / "features.yaml").read_text())
    numeric = {"count", "sum", "ratio", "days_since"}
    names = set()
    for e in doc["features"]:
        if e["aggregation"] in numeric:
            windows = e.get("windows")
            names |= {f"{e['name']}_{w}" for w in windows} if windows else {e["name"]}
    for m in SHIPPED["models"]:
        for i in m["inputs"]:
            assert i["name"] in names, (m["name"], i["name"])


inputs = st.sampled_from(["views_1h", "orders_30d", "days_since_last_order", "revenue_30d",
                          "add_to_cart_24h", "unrelated"])
values = st.dictionaries(inputs, st.one_of(st.none(), st.integers(0, 10**6),
                                           st.floats(0, 1e6, allow_nan=False)))


@settings(deadline=None)
@given(values, st.sampled_from(["page_view", "order_completed"]))
def test_the_vector_always_has_the_declared_keys_defaults_and_indicators(vals, event):
    spec = load_models()["purchase_propensity"]
    logged = {i["name"] for m in SHIPPED["models"] if m["name"] == "purchase_propensity"
              for i in m["inputs"] if i.get("log")}
    assert logged  # the shipped file takes logs of the counts
    x = spec.vector(vals, event)
    assert tuple(x) == spec.input_names
    for name, default, missing in spec.inputs:
        given_value = vals.get(name)
        value = default if given_value is None else float(given_value)
        assert x[name] == (math.log1p(value) if name in logged else value)
        if missing:
            assert x[f"{name}_missing"] == (1.0 if given_value is None else 0.0)
    assert "unrelated" not in x
    assert spec.vector(vals, event) == x  # nothing kept between calls
    # the scoring path's form: the values in the inputs' order
    assert spec.vector_of([vals.get(name) for name, _, _ in spec.inputs], event) == x


def _doc_with(**changes):
    doc = copy.deepcopy(SHIPPED)
    m = doc["models"][0]
    for key, value in changes.items():
        m[key] = value
    return doc


def test_the_schema_hash_follows_the_inputs_not_the_learner():
    base = load_models()["purchase_propensity"].schema_hash
    same = load_models(doc=_doc_with(learner={"learning_rate": 0.5}))["purchase_propensity"]
    assert same.schema_hash == base
    inputs = copy.deepcopy(SHIPPED["models"][0]["inputs"])
    for change in (lambda i: i[0].update(default=1),
                   lambda i: i[0].update(missing=True),
                   lambda i: i.reverse(),
                   lambda i: i.pop()):
        changed = copy.deepcopy(inputs)
        change(changed)
        assert load_models(doc=_doc_with(inputs=changed))["purchase_propensity"].schema_hash != base


def test_bad_files_are_refused_with_each_problem_named():
    doc = copy.deepcopy(SHIPPED)
    doc["models"][1]["score_field"] = doc["models"][0]["score_field"]
    doc["models"][2]["name"] = doc["models"][0]["name"]
    doc["models"].append({**copy.deepcopy(doc["models"][1]), "name": "ctr2", "score_field": "p2",
                          "predict_on": ["*"]})
    with pytest.raises(ModelSpecError) as err:
        load_models(doc=doc)
    text = str(err.value)
    assert "ctr: score_field 'p_purchase_24h' is also purchase_propensity's" in text
    assert "purchase_propensity: declared twice" in text
    assert "ctr2: by_event needs the predict_on events named" in text
    with pytest.raises(ModelSpecError, match="once_per"):
        load_models(doc=_doc_with(once_per="hour"))
    with pytest.raises(ModelSpecError, match="cannot read"):
        load_models(path=MODELS_FILE.parent / "no-such-file.yaml")
