"""Typed, named inputs without a server: decoding each encoding against a model's declared
inputs (every mismatch refused naming the tensor), and batches padded correctly."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import safetensors.numpy
import torch
from bales_producer import wire
from safetensors.torch import save as save_torch

from bales_stream.errors import RequestRejected
from bales_stream.inputs import decode_inputs, read_reply_encoding
from bales_stream.tensors import ModelSpec, TensorSpec, bucket_of, collate

pytestmark = pytest.mark.unit  # no redis-server: the unit tier (make test-unit)

TEXTLIKE = ModelSpec(
    "enc",
    "tensor",
    inputs=(
        TensorSpec("input_ids", "int64", ("seq",), pad=0),
        TensorSpec("attention_mask", "int64", ("seq",), pad=0),
        TensorSpec("scale", "float16", (2,)),
    ),
    max_dims=(("seq", 16),),
)
IMAGE = ModelSpec("img", "tensor", inputs=(TensorSpec("image", "uint8", (8, 8)),))
FLAGS = ModelSpec(
    "flags",
    "tensor",
    inputs=(TensorSpec("on", "bool", (3,)), TensorSpec("x", "bfloat16", (2,))),
)
LEGACY = ModelSpec("stub_v1", "classification", (4,))


def good_tensors(length: int = 5) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.arange(1, length + 1, dtype=np.int64),
        "attention_mask": np.ones(length, dtype=np.int64),
        "scale": np.array([0.5, 2.0], dtype=np.float16),
    }


def refused(raw: bytes, encoding: str, spec: ModelSpec) -> str:
    with pytest.raises(RequestRejected) as info:
        decode_inputs(raw, encoding, spec)
    assert info.value.code == wire.ERROR_INVALID_REQUEST
    return info.value.message


def test_a_safetensors_request_decodes_to_the_declared_dtypes_and_a_length_bucket() -> None:
    tensors = good_tensors(5)
    decoded = decode_inputs(safetensors.numpy.save(tensors), "safetensors", TEXTLIKE)
    for name, array in tensors.items():
        assert decoded.tensors[name].dtype == array.dtype
        np.testing.assert_array_equal(decoded.tensors[name], array)
    assert decoded.bucket == 8


def test_bfloat16_and_bool_tensors_keep_their_values() -> None:
    x = torch.tensor([1.5, -3.25], dtype=torch.bfloat16)
    raw = save_torch({"on": torch.tensor([True, False, True]), "x": x})
    decoded = decode_inputs(raw, "safetensors", FLAGS)
    assert decoded.tensors["on"].tolist() == [True, False, True]
    assert decoded.tensors["x"].tolist() == [1.5, -3.25]
    batch = collate(FLAGS, [decoded.tensors])
    assert batch.tensors["x"].dtype == torch.bfloat16 and batch.tensors["on"].dtype == torch.bool


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"input_ids": np.arange(5, dtype=np.int32)}, "tensor input_ids is I32: expected"),
        ({"scale": np.zeros(3, np.float16)}, "tensor scale has shape [3]"),
        ({"attention_mask": np.ones(4, np.int64)}, "dimension seq is 5 in another tensor"),
        ({"input_ids": np.ones(17, np.int64), "attention_mask": np.ones(17, np.int64)}, "1 to 16"),
        ({"input_ids": np.ones((1, 5), np.int64)}, "tensor input_ids has shape [1, 5]"),
        ({"extra": np.ones(2, np.float32)}, "tensor 'extra' is not an input of enc"),
        ({"input_ids": np.ones(0, np.int64), "attention_mask": np.ones(0, np.int64)}, "1 to 16"),
        ({"scale": np.array([np.inf, 1], np.float16)}, "tensor scale contains NaN or infinity"),
    ],
)
def test_safetensors_mismatches_are_refused_naming_the_tensor(
    change: dict[str, np.ndarray], words: str
) -> None:
    tensors = {**good_tensors(5), **change}
    assert words in refused(safetensors.numpy.save(tensors), "safetensors", TEXTLIKE)


def test_a_missing_tensor_is_named_with_what_the_model_expects() -> None:
    tensors = good_tensors()
    del tensors["attention_mask"]
    message = refused(safetensors.numpy.save(tensors), "safetensors", TEXTLIKE)
    assert "missing tensor attention_mask" in message
    assert "input_ids int64 [seq], attention_mask int64 [seq], scale float16 [2]" in message


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"garbage",
        b"\xff" * 8 + b"{}",
        (10**6).to_bytes(8, "little") + b"{}",
        (2).to_bytes(8, "little") + b"[]",
        (20).to_bytes(8, "little") + b'{"a":{"dtype":"F32"}}',
        (60).to_bytes(8, "little") + b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}    ',
        "é".encode() * 10,
    ],
)
def test_what_is_not_a_safetensors_document_is_refused(raw: bytes) -> None:
    assert "is not a safetensors document" in refused(raw, "safetensors", TEXTLIKE)


def test_json_objects_are_cast_to_the_declared_dtypes() -> None:
    raw = orjson.dumps({"input_ids": [101, 7, 102], "attention_mask": [1, 1, 1], "scale": [1, 2]})
    decoded = decode_inputs(raw, "json", TEXTLIKE)
    assert decoded.tensors["input_ids"].dtype == np.int64
    assert decoded.tensors["scale"].dtype == np.float16
    flags = decode_inputs(b'{"on": [1, 0, true], "x": [0.5, 2]}', "json", FLAGS)
    assert flags.tensors["on"].tolist() == [True, False, True]


@pytest.mark.parametrize(
    ("document", "words"),
    [
        ({"input_ids": [1.5, 2, 3], "attention_mask": [1, 1, 1]}, "input_ids holds fractions"),
        ({"input_ids": [2**63, 2, 3], "attention_mask": [1, 1, 1]}, "out of int64 range"),
        ({"input_ids": [1, 2], "attention_mask": [1, 1], "scale": [70000, 1]}, "float16 range"),
        ({"input_ids": "hello", "attention_mask": [1]}, "tensor input_ids is a JSON string"),
        ({"input_ids": [[1, 2], [3]], "attention_mask": [1]}, "ragged"),
        ({"input_ids": ["a"], "attention_mask": [1]}, "non-numbers"),
        ({"input_ids": [True], "attention_mask": [1], "scale": [1, 1]}, None),
    ],
)
def test_json_values_that_do_not_fit_their_dtype_are_refused(document: dict, words: str) -> None:
    raw = orjson.dumps({"scale": [1, 1], **document})
    if words is None:  # booleans are integers 0/1 for an integer input
        assert decode_inputs(raw, "json", TEXTLIKE).tensors["input_ids"].tolist() == [1]
        return
    assert words in refused(raw, "json", TEXTLIKE)


def test_json_for_uint8_images_and_bool_values_is_checked() -> None:
    image = np.arange(64).reshape(8, 8).tolist()
    assert decode_inputs(orjson.dumps({"image": image}), "json", IMAGE).tensors["image"].dtype == (
        np.uint8
    )
    assert decode_inputs(orjson.dumps(image), "json", IMAGE).tensors["image"].shape == (8, 8)
    image[0][0] = 256
    assert "out of uint8 range" in refused(orjson.dumps({"image": image}), "json", IMAGE)
    assert "other than true/false" in refused(b'{"on": [2, 0, 1], "x": [1, 1]}', "json", FLAGS)


def test_a_json_array_is_refused_for_a_model_with_several_inputs() -> None:
    assert "has several inputs: expected a JSON object" in refused(b"[1, 2]", "json", TEXTLIKE)


def test_far_too_many_json_values_are_refused_before_decoding() -> None:
    raw = b'{"input_ids": [' + b"1," * 100 + b"1]}"
    assert "more than enc takes (34 values at most in a JSON object" in refused(
        raw, "json", TEXTLIKE
    )


def test_text_and_f32_are_refused_for_models_that_do_not_take_them() -> None:
    assert "does not take text (it declares no tokenizer)" in refused(b"hi", "text", TEXTLIKE)
    assert "encoding f32 is for a model with one fixed-shape float32 input" in refused(
        b"\x00" * 8, "f32", TEXTLIKE
    )
    text_model = ModelSpec("t", "tensor", inputs=TEXTLIKE.inputs[:2], text=True, max_tokens=128)
    assert "not valid UTF-8" in refused(b"\xff\xfe", "text", text_model)
    assert decode_inputs("héllo".encode(), "text", text_model).text == "héllo"
    # texts that are cut to max_length tokens all share the longest bucket
    assert decode_inputs(b"x " * 400, "text", text_model).bucket == 128
    assert decode_inputs(b"x " * 40_000, "text", text_model).bucket == 128


def test_legacy_models_keep_their_messages() -> None:
    assert refused(b"[1, 2]", "json", LEGACY) == "input has 2 values; stub_v1 expects 4"
    assert "input is a JSON object: expected an array of numbers" in refused(
        b'{"input": [1, 2, 3, 4]}', "json", LEGACY
    )
    assert "at least" in refused(b"[" + b"1," * 10 + b"1]", "json", LEGACY)


def test_reply_encoding_is_json_safetensors_or_refused() -> None:
    assert read_reply_encoding(None) == "json"
    assert read_reply_encoding("safetensors") == "safetensors"
    with pytest.raises(RequestRejected, match="reply_encoding 'msgpack' is not supported"):
        read_reply_encoding("msgpack")


def test_a_batch_pads_each_variable_dimension_to_its_longest_request() -> None:
    short, long = good_tensors(2), good_tensors(5)
    batch = collate(TEXTLIKE, [short, long])
    assert batch.tensors["input_ids"].tolist() == [[1, 2, 0, 0, 0], [1, 2, 3, 4, 5]]
    assert batch.tensors["attention_mask"].tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.lengths["seq"].tolist() == [2, 5]
    assert batch.tensors["scale"].dtype == torch.float16
    assert (batch.real_elements, batch.padded_elements) == (2 + 2 + 5 + 5 + 4, 6)


def test_length_buckets_are_powers_of_two_from_eight() -> None:
    assert [bucket_of(n) for n in (1, 8, 9, 16, 17, 100, 128)] == [8, 8, 16, 16, 32, 128, 128]


def test_a_safetensors_request_to_a_single_input_model_is_checked_like_json() -> None:
    good = safetensors.numpy.save({"input": np.ones(4, np.float32)})
    assert decode_inputs(good, "safetensors", LEGACY).tensors["input"].tolist() == [1.0] * 4
    wrong = safetensors.numpy.save({"input": np.ones(5, np.float32)})
    assert "tensor input has shape [5]" in refused(wrong, "safetensors", LEGACY)


MASKED = ModelSpec(
    "masked",
    "tensor",
    inputs=(
        TensorSpec("input_ids", "int64", ("seq",), value_range=(0, 99)),
        TensorSpec("attention_mask", "int64", ("seq",), mask=True),
    ),
)


@pytest.mark.parametrize(
    ("document", "words"),
    [
        ({"input_ids": [1, 2], "attention_mask": [0, 0]}, "attention_mask is all 0"),
        ({"input_ids": [1, 2], "attention_mask": [1, 2]}, "is a mask: expected only 0 and 1"),
        ({"input_ids": [1, 100], "attention_mask": [1, 1]}, "outside 0 to 99 (got 1 to 100)"),
        ({"input_ids": [-1, 5], "attention_mask": [1, 1]}, "outside 0 to 99 (got -1 to 5)"),
    ],
)
def test_masks_and_value_ranges_are_checked(document: dict, words: str) -> None:
    """A mask with no real position would get a result that depends on its batch's padding;
    a token id beyond the vocabulary would make the model raise."""
    assert words in refused(orjson.dumps(document), "json", MASKED)
    safetensors_document = safetensors.numpy.save({k: np.array(v) for k, v in document.items()})
    assert words in refused(safetensors_document, "safetensors", MASKED)


def test_bfloat16_json_values_beyond_its_range_are_refused_not_computed() -> None:
    assert decode_inputs(b'{"on": [1, 0, 1], "x": [3.3e38, 1]}', "json", FLAGS)
    assert "beyond bfloat16 range" in refused(b'{"on": [1, 0, 1], "x": [3.4e38, 1]}', "json", FLAGS)
    assert decode_inputs(b'{"on": [1, 0, 1], "x": [1.00390625, 1]}', "json", FLAGS).tensors[
        "x"
    ].tolist() == [1.0, 1.0]  # rounded to the nearest bfloat16, as the model gets it
