"""Published models as anchors: a Wong et al. 2020 MNIST state dict (their ``mnist_net``, an
``nn.Sequential``) converted by experiments/anchors/import_wong_mnist.py gives the same logits
in Bulwark's ``mnist_net`` with ``model.normalization: none``; the runner honours that field."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bulwark.contract.spec import JobSpec
from bulwark.workers.engine.checkpoint import load_model, weights_metadata
from bulwark.workers.engine.runner import run_job

REPO = Path(__file__).resolve().parents[1]


def _importer():
    path = REPO / "experiments" / "anchors" / "import_wong_mnist.py"
    spec = importlib.util.spec_from_file_location("import_wong_mnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _their_net() -> nn.Module:
    """Their MNIST/mnist_net.py, layer for layer (Flatten at index 4)."""
    return nn.Sequential(nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, 10))


def test_a_wong_mnist_state_dict_gives_the_same_logits_in_bulwark(tmp_path):
    torch.manual_seed(0)
    theirs = _their_net().eval()
    src = tmp_path / "fgsm.pth"
    torch.save(theirs.state_dict(), src)  # a plain state dict, as their train_mnist.py saves
    dst = tmp_path / "wong.safetensors"
    meta = _importer().convert(src, dst)
    assert meta["arch"] == "mnist_net" and json.loads(meta["std"]) == [1.0]
    assert weights_metadata(dst)["mean"] == "[0.0]"
    ours = load_model(dst)
    assert torch.equal(ours.normalize.mean, torch.zeros(1, 1, 1, 1))
    x = torch.rand(16, 1, 28, 28)
    x[:, :, :3] = 0.0  # MNIST's black borders: the zero padding must see raw 0, not 0.1307
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)


def test_a_state_dict_of_another_network_is_refused(tmp_path):
    src = tmp_path / "other.pth"
    torch.save(nn.Sequential(nn.Identity(), nn.Linear(4, 2)).state_dict(), src)  # key "1.*"
    with pytest.raises(ValueError, match="not a mnist_net state dict"):
        _importer().convert(src, tmp_path / "x.safetensors")
    torch.save(nn.Sequential(nn.Linear(4, 2)).state_dict(), src)  # key "0.*", wrong shape
    with pytest.raises(RuntimeError, match="size mismatch|Missing key"):
        _importer().convert(src, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_normalization_none_trains_on_raw_pixels(tmp_path):
    spec = JobSpec.model_validate({
        "dataset": {"name": "digits", "val_size": 100, "train_limit": 600},
        "model": {"arch": "mnist_net", "normalization": "none"},
        "threat": {"epsilon": "8/255"}, "recipe": "fgsm-rs",
        "schedule": {"epochs": 1, "batch_size": 50},
        "evaluation": {"monitor": {"size": 50, "pgd_steps": 2},
                       "final": {"n": 50, "pgd": {"steps": 2}, "autoattack": None}}})
    run_job(spec, tmp_path, device="cpu", progress=False)
    meta = weights_metadata(tmp_path / "model.safetensors")
    assert (json.loads(meta["mean"]), json.loads(meta["std"])) == ([0.0], [1.0])
    model = load_model(tmp_path / "model.safetensors")
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), model.net(x)), "no normalization in front of the network"
