"""Decoding request entries: every valid shape accepted, every malformed one rejected clearly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from bales_producer import KeySpace, wire
from hypothesis import given, settings
from hypothesis import strategies as st

from bales_stream.errors import RequestRejected, Unanswerable
from bales_stream.protocol import Limits, ModelSpec, decode_request, entry_time_ms, read_envelope

pytestmark = pytest.mark.unit  # no redis-server: the unit tier (make test-unit)

KEYS = KeySpace()
SPEC = ModelSpec("stub_v1", "classification", (128,))
GRID = ModelSpec("grid", "classification", (2, 3))
LIMITS = Limits(default_timeout_ms=5000, max_input_bytes=4096)
ENTRY_ID = "1700000000000-3"
NOW_MS = 1_700_000_000_500.0  # Redis's clock when the entry is read


def lookup(model_id: str) -> ModelSpec | None:
    return {"stub_v1": SPEC, "grid": GRID}.get(model_id)


def fields(**values: str | bytes) -> dict[bytes, bytes]:
    base: dict[str, str | bytes] = {
        "request_id": "r1",
        "model_id": "stub_v1",
        "input": json.dumps([0.5] * 128),
    }
    base.update(values)
    return {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in base.items()}


def decode(entry: dict[bytes, bytes]):
    envelope = read_envelope(ENTRY_ID, entry, 1, KEYS)
    return decode_request(envelope, entry, lookup, LIMITS, NOW_MS)


def rejection(entry: dict[bytes, bytes]) -> RequestRejected:
    with pytest.raises(RequestRejected) as caught:
        decode(entry)
    return caught.value


def test_a_json_request_decodes_with_defaults() -> None:
    request = decode(fields())
    assert request.request_id == "r1"
    assert request.inputs["input"].dtype == np.float32 and request.inputs["input"].shape == (128,)
    assert request.enqueued_ms == 1700000000000
    assert request.deadline_ms == 1700000000000 + 5000
    assert request.priority == 1 and request.reply_to is None


def test_an_f32_request_decodes_to_the_same_values() -> None:
    values = np.linspace(-1, 1, 128, dtype=np.float32)
    request = decode(fields(input=values.astype("<f4").tobytes(), encoding="f32"))
    np.testing.assert_array_equal(request.inputs["input"], values)


def test_nested_json_matches_a_multi_dimensional_model() -> None:
    request = decode(fields(model_id="grid", input="[[1,2,3],[4,5,6]]"))
    assert request.inputs["input"].shape == (2, 3)


def test_timeout_and_reply_to_are_honoured() -> None:
    request = decode(fields(timeout_ms="250", reply_to="bales:inbox:abc"))
    assert request.deadline_ms == 1700000000000 + 250
    assert request.reply_to == "bales:inbox:abc"


def test_unknown_fields_are_ignored() -> None:
    assert decode(fields(traceparent="00-abc", future_field="x")).request_id == "r1"


def test_the_wrong_length_names_both_counts() -> None:
    error = rejection(fields(input=json.dumps([1.0] * 12)))
    assert error.code == wire.ERROR_INVALID_REQUEST
    assert error.message == "input has 12 values; stub_v1 expects 128"


def test_the_wrong_shape_names_both_shapes() -> None:
    error = rejection(fields(model_id="grid", input="[[1,2],[3,4],[5,6]]"))
    assert "shape [3, 2]" in error.message and "expects shape [2, 3]" in error.message


@pytest.mark.parametrize(
    ("overrides", "expected_code", "expected_words"),
    [
        ({"model_id": "nope"}, "unknown_model", "'nope' is not served"),
        ({"model_id": ""}, "invalid_request", "missing field model_id"),
        ({"model_type": "regression"}, "invalid_request", "classification"),
        ({"input": "[1, 2"}, "invalid_request", "not valid JSON"),
        ({"input": '{"a": 1}'}, "invalid_request", "JSON object"),
        ({"input": json.dumps(["x"] * 128)}, "invalid_request", "non-numbers"),
        ({"input": "[[1,2],[3]]"}, "invalid_request", "ragged"),
        ({"input": "[NaN" + ",1" * 127 + "]"}, "invalid_request", "not valid JSON"),
        ({"input": "[1e400" + ",1" * 127 + "]"}, "invalid_request", "infinity"),
        ({"input": "[1e39" + ",1" * 127 + "]"}, "invalid_request", "float32 range"),
        ({"input": b"\x00\x00\x80", "encoding": "f32"}, "invalid_request", "multiple of 4"),
        ({"input": b"\x00" * 16, "encoding": "f32"}, "invalid_request", "4 values"),
        (
            {"encoding": "msgpack"},
            "invalid_request",
            "expected one of json, f32, safetensors, text",
        ),
        ({"timeout_ms": "-5"}, "invalid_request", "timeout_ms"),
        ({"timeout_ms": "soon"}, "invalid_request", "timeout_ms"),
        ({"timeout_ms": "²"}, "invalid_request", "timeout_ms"),
        ({"timeout_ms": "٣٠٠٠"}, "invalid_request", "timeout_ms"),
        ({"input": "[" + "1," * 900 + "1]"}, "invalid_request", "at least 901 values"),
        ({"input": "[" + ",".join(["1.0"] * 2000) + "]"}, "invalid_request", "the limit is"),
        ({"reply_to": "somebody:else"}, "invalid_request", "reply_to"),
        ({"model_type": b"\xff"}, "invalid_request", "UTF-8"),
    ],
)
def test_each_malformed_entry_gets_a_clear_rejection(
    overrides: dict[str, str | bytes], expected_code: str, expected_words: str
) -> None:
    error = rejection(fields(**overrides))
    assert error.code == expected_code
    assert expected_words in error.message


def test_a_missing_input_field_is_rejected() -> None:
    entry = fields()
    del entry[b"input"]
    assert "missing field input" in rejection(entry).message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_infinity_anywhere_in_f32_is_rejected(bad: float) -> None:
    for position in range(128):
        values = np.zeros(128, dtype="<f4")
        values[position] = bad
        assert "NaN" in rejection(fields(input=values.tobytes(), encoding="f32")).message


def test_the_largest_finite_f32_values_are_accepted() -> None:
    largest = np.finfo(np.float32).max
    values = np.array([largest, -largest] * 64, dtype="<f4")
    request = decode(fields(input=values.tobytes(), encoding="f32"))
    assert np.array_equal(request.inputs["input"], values)


@pytest.mark.parametrize(
    "entry",
    [
        None,
        {},
        {b"model_id": b"stub_v1"},
        {b"request_id": b"has space"},
        {b"request_id": b""},
        {b"request_id": b"x" * 129},
        {b"request_id": "é".encode()},
    ],
)
def test_entries_without_a_usable_request_id_are_unanswerable(entry) -> None:
    with pytest.raises(Unanswerable):
        read_envelope(ENTRY_ID, entry, 0, KEYS)


def test_entry_time_is_the_id_millisecond_part() -> None:
    assert entry_time_ms("1700000000123-7") == 1700000000123


field_values = st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode))
field_names = st.sampled_from(
    [
        b"request_id",
        b"model_id",
        b"input",
        b"encoding",
        b"model_type",
        b"timeout_ms",
        b"reply_to",
        b"other",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(field_names, field_values, max_size=8))
def test_any_entry_is_decoded_or_rejected_never_crashes(entry: dict[bytes, bytes]) -> None:
    try:
        envelope = read_envelope(ENTRY_ID, entry, 2, KEYS)
    except Unanswerable as exc:
        assert exc.reason
        return
    try:
        request = decode_request(envelope, entry, lookup, LIMITS, NOW_MS)
    except RequestRejected as exc:
        assert exc.code in wire.ERROR_CODES and exc.message
        return
    assert request.inputs["input"].shape == lookup(request.model_id).input_shape  # type: ignore[union-attr]
    assert all(math.isfinite(v) for v in request.inputs["input"].ravel().tolist())


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=128, max_size=128)
)
def test_any_finite_json_vector_round_trips(values: list[float]) -> None:
    request = decode(fields(input=json.dumps(values)))
    np.testing.assert_array_equal(request.inputs["input"], np.array(values, dtype=np.float32))
