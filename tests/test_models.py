"""Models: reproducible stub weights, safe loading, path confinement."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from bales_stream.errors import ModelLoadError
from bales_stream.models import STUB_SEEDS, builtin_stub, load_stub_file, stub_state_dict
from bales_stream.registry import confine

from .conftest import ROOT


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
    v1 = [r["label"] for r in builtin_stub("stub_v1").predict(batch)]
    v2 = [r["label"] for r in builtin_stub("stub_v2").predict(batch)]
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
