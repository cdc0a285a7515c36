"""Model types (post-processing) and the models file: valid configs load, bad ones are
refused with a message that says what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bales_stream.errors import ModelLoadError
from bales_stream.model_config import load_models_file
from bales_stream.model_types import Classification, Embedding, Regression, make_model_type
from bales_stream.tensors import Batch, ModelOutputs

pytestmark = pytest.mark.unit  # no redis-server: the unit tier (make test-unit)


class Doubler:
    """A user's own model type, plugged in by import path."""

    name = "doubler"

    def __init__(self, factor: float = 2.0) -> None:
        self.factor = factor

    def postprocess(self, outputs: torch.Tensor) -> list[dict]:
        return [{"doubled": row} for row in (outputs * self.factor).tolist()]


def test_classification_gives_label_confidence_and_top_k() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    results = Classification(top_k=2).postprocess(logits)
    assert [r["label"] for r in results] == [1, 0]
    assert results[0]["confidence"] == pytest.approx(torch.softmax(logits[0], 0)[1].item())
    assert [t["label"] for t in results[0]["top_k"]] == [1, 2]
    assert "top_k" not in Classification().postprocess(logits)[0]


def test_regression_returns_the_raw_vector() -> None:
    assert Regression().postprocess(torch.tensor([[1.5, -2.0]])) == [{"values": [1.5, -2.0]}]


def outputs_of(tensor: torch.Tensor) -> ModelOutputs:
    return ModelOutputs({"output": tensor}, Batch({}))


def test_embedding_is_l2_normalised_unless_told_otherwise() -> None:
    [result] = Embedding().postprocess(outputs_of(torch.tensor([[3.0, 4.0]])))
    assert result["embedding"].tolist() == pytest.approx([0.6, 0.8])
    [raw] = Embedding(normalize=False).postprocess(outputs_of(torch.tensor([[3.0, 4.0]])))
    assert raw["embedding"].tolist() == [3.0, 4.0]


def test_a_user_type_is_plugged_in_by_import_path() -> None:
    kind = make_model_type("tests.test_model_types:Doubler", {"factor": 3.0})
    assert kind.postprocess(torch.tensor([[1.0]])) == [{"doubled": [3.0]}]


@pytest.mark.parametrize(
    ("name", "options", "words"),
    [
        ("ranking", {}, "unknown: expected one of classification, embedding, regression, tensor"),
        ("no.such.module:Type", {}, "cannot import"),
        ("classification", {"top_k": 0}, "top_k must be >= 1"),
        ("regression", {"bins": 3}, "does not take options"),
    ],
)
def test_bad_model_types_are_refused(name: str, options: dict, words: str) -> None:
    with pytest.raises(ModelLoadError, match=words):
        make_model_type(name, options)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_the_shipped_models_file_is_valid() -> None:
    configs = load_models_file(Path(__file__).parent.parent / "weights" / "models.toml")
    assert [c.model_id for c in configs] == [
        "stub_v1",
        "digits_v1",
        "text_embed_demo",
        "text_cls_demo",
        "digits_cnn",
    ]
    assert configs[1].max_batch_size == 64 and configs[1].options == {"top_k": 3}
    assert all(c.sha256 for c in configs if c.format == "export")  # archives that run code


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[[models]]\nmodel_id = 'a'\nfile = 'a.pt'\ninput_shape = [4]", "format"),
        ("[[models]]\nmodel_id = 'a'\nformat = 'onnx'\nfile = 'a.pt'\ninput_shape = [4]", "format"),
        (
            "[[models]]\nmodel_id = 'a'\nformat = 'state_dict'\nfile = 'a.pt'\ninput_shape = [4]",
            "architecture",
        ),
        (
            "[[models]]\nmodel_id = 'a b'\nformat = 'torchscript'\n"
            "file = 'a.pt'\ninput_shape = [4]",
            "model_id",
        ),
        (
            "[[models]]\nmodel_id = 'a'\nformat = 'torchscript'\nfile = 'a.pt'\ninput_shape = [0]",
            "input_shape",
        ),
        (
            "[[models]]\nmodel_id = 'a'\nformat = 'torchscript'\nfile = 'a.pt'\ninput_shape = [4]\n"
            "[[models]]\nmodel_id = 'a'\nformat = 'torchscript'\nfile = 'b.pt'\ninput_shape = [4]",
            "more than once",
        ),
        (
            "[[models]]\nmodel_id = 'a'\nformat = 'torchscript'\nfile = 'a.pt'\ninput_shape = [4]\n"
            "colour = 'blue'",
            "colour",
        ),
        ("models = [", "not valid TOML"),
        ("", "models"),
    ],
)
def test_bad_models_files_are_refused_with_the_reason(tmp_path: Path, text: str, words: str):
    with pytest.raises(ModelLoadError, match=words):
        load_models_file(write(tmp_path, text))


def test_a_missing_models_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_models_file(tmp_path / "nope.toml")


def padded_outputs(logits: torch.Tensor, lengths: list[int]) -> ModelOutputs:
    longest = logits.shape[1]
    mask = torch.tensor([[1] * n + [0] * (longest - n) for n in lengths])
    batch = Batch({"attention_mask": mask}, {"seq": torch.tensor(lengths)})
    return ModelOutputs({"logits": logits}, batch, {"logits": ("seq", logits.shape[2])})


def test_token_classification_labels_each_real_token_only() -> None:
    logits = torch.tensor(
        [[[5.0, 0.0], [0.0, 5.0], [9.0, 0.0]], [[0.0, 5.0], [9.0, 9.0], [9.0, 9.0]]]
    )
    kind = make_model_type("token-classification", {"labels": ["O", "NAME"]})
    first, second = kind.postprocess(padded_outputs(logits, [2, 1]))
    assert first["labels"] == ["O", "NAME"] and second["labels"] == ["NAME"]
    assert first["scores"].shape == (2,) and second["scores"].shape == (1,)
    assert first["scores"][0] == pytest.approx(torch.softmax(logits[0, 0], 0)[0].item())


def test_embedding_pools_the_mean_over_the_mask_or_takes_the_first_position() -> None:
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])
    outputs = padded_outputs(hidden, [2])
    [mean] = Embedding(pooling="mean", normalize=False).postprocess(outputs)
    [cls] = Embedding(pooling="cls", normalize=False).postprocess(outputs)
    assert mean["embedding"].tolist() == [2.0, 1.0]  # the padded position is left out
    assert cls["embedding"].tolist() == [1.0, 0.0]


def test_tensor_outputs_cut_each_request_to_its_own_length() -> None:
    hidden = torch.arange(12.0).reshape(2, 3, 2)
    first, second = make_model_type("tensor").postprocess(padded_outputs(hidden, [3, 1]))
    assert first["logits"].tolist() == hidden[0].tolist()
    assert second["logits"].tolist() == [[6.0, 7.0]]
