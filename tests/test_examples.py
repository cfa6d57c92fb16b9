"""Every shipped example and study file is a valid spec (or sweep) whose data is found."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.spec import load_spec_file
from contract.sweep import expand, load_sweep
from workers.engine.data import locate_dataset

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted((REPO / "examples").rglob("*.yaml"))
SWEEPS = sorted((REPO / "experiments").rglob("*.yaml"))


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(REPO)))
def test_example_spec_is_valid_and_its_data_is_there(path, monkeypatch, tmp_path):
    monkeypatch.delenv("BULWARK_DATA_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./data: found in the repository's own data/
    spec = load_spec_file(str(path))
    assert "nowhere" not in locate_dataset(spec.dataset)
    assert not spec.dataset.download, "examples never download"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: str(p.relative_to(REPO)))
def test_study_sweep_expands(path):
    children = expand(load_sweep(path))
    assert children and len({c.name for c in children}) == len(children)


def test_the_quick_start_pair_differs_only_in_the_recipe():
    a = load_spec_file(str(REPO / "examples/quickstart/mnist-fgsm.yaml")).model_dump()
    b = load_spec_file(str(REPO / "examples/quickstart/mnist-n-aaer.yaml")).model_dump()
    assert {k for k in a if a[k] != b[k]} == {"name", "recipe"}
