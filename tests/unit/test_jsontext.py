"""db.jsontext: orjson's text where it reads back to the value, the standard library's everywhere else."""

from __future__ import annotations

import json
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from db.jsontext import dumps, dumps_plain

_SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text()
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
                       | st.dictionaries(st.text(max_size=5) | st.integers(-3, 3), inner, max_size=4), max_leaves=20)


def _same(a, b) -> bool:
    """Equal, with NaN equal to NaN (what reading either text back gives)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@settings(max_examples=400, deadline=None)
@given(_VALUES)
def test_the_text_reads_back_as_the_standard_librarys_does(value):
    assert _same(json.loads(dumps(value)), json.loads(json.dumps(value)))
    out = dumps_plain(value)
    if out is not None:
        assert _same(json.loads(out), value)


def test_what_orjson_would_write_otherwise_is_left_to_the_standard_library():
    result = {"request_id": "q-1", "verdict": "benign", "fired": [], "scores": {"c1": 3.2, "c2": 1e-05, "combined": 0.5},
              "topk": {"ids": [2**40, 7], "distances": [0, 3]}, "image_id": None, "worker": "detect@h"}
    assert json.loads(dumps_plain(result)) == result
    text = dumps(result)
    assert json.loads(text) == result and text != json.dumps(result)
    assert ", " not in text and '": ' not in text  # orjson's compact text, not the standard library's
    for odd in ({"c1": float("nan")}, {"c1": float("inf")}, {1: "a"}, (1, 2), [np.float64(0.5)], 2**64 + 1,
                {"s": "\ud800"}, {"x": [1, {"y": -float("inf")}]}, {"client": "ünï"}, ["détect@h", "\u2028"]):
        assert dumps_plain(odd) is None, odd
        assert dumps(odd) == json.dumps(odd)
    assert "\\u00fc" in dumps({"client": "ünï"})  # escaped, as it always was: ASCII text for any column
