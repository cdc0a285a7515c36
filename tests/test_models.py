"""Models: reproducible stub weights, safe loading, path confinement, sha256 pins."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bales_stream.errors import ModelLoadError
from bales_stream.model_config import load_models_file, stub_config
from bales_stream.models import (
    STUB_SEEDS,
    builtin_stub,
    load_model,
    load_stub_file,
    stub_state_dict,
)
from bales_stream.registry import confine

from .conftest import ROOT
from .test_service import service_env


@pytest.mark.parametrize("name", sorted(STUB_SEEDS))
def test_shipped_weights_are_the_reproducible_ones(name: str) -> None:
    shipped = torch.load(ROOT / "weights" / f"{name}.pt", weights_only=True)
    regenerated = stub_state_dict(STUB_SEEDS[name])
    assert shipped.keys() == regenerated.keys()
    for key in shipped:
        torch.testing.assert_close(shipped[key], regenerated[key], rtol=0, atol=0)


def test_file_and_builtin_weights_have_the_same_version() -> None:
    from_file = load_stub_file("stub_v1", ROOT / "weights" / "stub_v1.pt")
    assert from_file.version == builtin_stub("stub_v1").version
    assert from_file.version != load_stub_file("stub_v1", ROOT / "weights" / "stub_v2.pt").version


def test_the_two_versions_answer_differently() -> None:
    batch = np.random.default_rng(3).standard_normal((256, 128)).astype(np.float32)
    v1 = [r["label"] for r in builtin_stub("stub_v1").predict_array(batch)]
    v2 = [r["label"] for r in builtin_stub("stub_v2").predict_array(batch)]
    assert v1 != v2


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_objects_are_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"hidden.weight": Evil()}, path, pickle_module=pickle)
    with pytest.raises(ModelLoadError, match="does not load"):
        load_stub_file("stub_v1", path)


def test_wrong_shapes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "small.pt"
    torch.save({"hidden.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_stub_file("stub_v1", path)


def test_confine_accepts_paths_inside_and_refuses_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "w"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.pt").write_bytes(b"x")
    (tmp_path / "secret.pt").write_bytes(b"x")
    (root / "link.pt").symlink_to(tmp_path / "secret.pt")
    assert confine(root, "sub/a.pt") == (root / "sub" / "a.pt").resolve()
    assert confine(root, str(root / "sub" / "a.pt")) == (root / "sub" / "a.pt").resolve()
    for bad in ("../secret.pt", str(tmp_path / "secret.pt"), "link.pt", "", "sub/../../secret.pt"):
        with pytest.raises(ModelLoadError):
            confine(root, bad)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


STUB_V1 = ROOT / "weights" / "stub_v1.pt"
STUB_V2 = ROOT / "weights" / "stub_v2.pt"


def pinned(sha256: str):
    return stub_config("stub_v1").model_copy(update={"sha256": sha256})


def test_a_pinned_file_loads_when_its_sha256_matches() -> None:
    model = load_model(pinned(sha256_of(STUB_V1)), STUB_V1)
    assert model.version == builtin_stub("stub_v1").version


def test_a_file_whose_sha256_differs_from_the_pin_is_refused_naming_both() -> None:
    pin = sha256_of(STUB_V1)
    with pytest.raises(ModelLoadError) as refused:
        load_model(pinned(pin), STUB_V2)
    message = refused.value.message
    assert refused.value.http_status == 409
    assert "stub_v2.pt" in message and pin in message and sha256_of(STUB_V2) in message


def test_a_sha256_given_with_a_reload_replaces_the_pin() -> None:
    config = pinned(sha256_of(STUB_V1))
    assert load_model(config, STUB_V2, sha256_of(STUB_V2)).version.startswith("stub_v2-")
    with pytest.raises(ModelLoadError, match="the reload request expects"):
        load_model(config, STUB_V1, sha256_of(STUB_V2))


def test_a_pinned_torchscript_file_is_checked_before_torch_reads_it(tmp_path: Path) -> None:
    """TorchScript can run code when loaded: a file that is not the pinned one never reaches
    torch (the refusal is the hash's, not torch's "does not load")."""
    path = tmp_path / "model.pt"
    path.write_bytes(b"not what was pinned")
    config = pinned("0" * 64).model_copy(update={"format": "torchscript", "architecture": None})
    with pytest.raises(ModelLoadError, match="has sha256"):
        load_model(config, path)


@pytest.mark.parametrize("bad", ["A" * 64, "a" * 63, "a" * 65, "z" * 64, ""])
def test_the_models_file_refuses_a_malformed_sha256(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        '[[models]]\nmodel_id = "m"\nformat = "state_dict"\narchitecture = "stub"\n'
        f'file = "stub_v1.pt"\ninput_shape = [128]\nsha256 = "{bad}"\n'
    )
    with pytest.raises(ModelLoadError, match="sha256 must be 64 lowercase hex"):
        load_models_file(path)


def test_a_consumer_whose_pinned_file_changed_does_not_start(tmp_path: Path, redis_url) -> None:
    """The real service: a models file pinning stub_v1.pt to another hash stops start-up
    with a message naming the file and both hashes."""
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "stub_v1.pt").write_bytes(STUB_V2.read_bytes())  # the file was swapped
    models = weights / "models.toml"
    pin = sha256_of(STUB_V1)
    models.write_text(
        '[[models]]\nmodel_id = "stub_v1"\nformat = "state_dict"\narchitecture = "stub"\n'
        f'file = "stub_v1.pt"\ninput_shape = [128]\nsha256 = "{pin}"\n'
    )
    env = service_env(
        redis_url,
        f"pin{os.getpid()}",
        WEIGHTS_DIR=str(weights),
        MODELS_CONFIG=str(models),
        PORT="0",
    )
    result = subprocess.run(
        [sys.executable, "-m", "bales_stream", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "stub_v1.pt has sha256" in result.stderr
    assert pin in result.stderr and sha256_of(STUB_V2) in result.stderr
