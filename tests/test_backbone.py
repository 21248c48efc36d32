"""Tests for sta_model.backbone: torchvision layout, strides, pretrained loading."""
import json
import math
from pathlib import Path

import pytest
import torch

from sta_model.backbone import build_trunk, read_state_dict

DATA = Path(__file__).parent / "data"
STATS = ("running_mean", "running_var", "num_batches_tracked")


def _layout(name):
    # Fixture: torchvision's resnet state_dict (key -> shape), fc and BN buffers included,
    # enumerated from the architecture table independently of sta_model.
    return json.loads((DATA / f"{name}_keys.json").read_text())


@pytest.mark.parametrize("name, n_keys, n_params", [("resnet50", 320, 25_557_032), ("resnet18", 122, 11_689_512)])
def test_fixture_matches_published_counts(name, n_keys, n_params):
    lay = _layout(name)
    assert len(lay) == n_keys
    assert sum(math.prod(s) for k, s in lay.items() if not k.endswith(STATS)) == n_params


@pytest.mark.parametrize("name", ["resnet50", "resnet18"])
def test_state_dict_layout_is_torchvisions(name):
    lay = _layout(name)
    trunk = build_trunk(name)
    got = {k: list(v.shape) for k, v in trunk.state_dict().items()}
    want = {k: s for k, s in lay.items() if not k.startswith("fc.")}
    assert got == want


@pytest.mark.parametrize("name", ["resnet50", "resnet18"])
def test_pretrained_file_loads_with_fc_and_module_prefix(tmp_path, name):
    gen = torch.Generator().manual_seed(0)
    sd = {k: (torch.randint(0, 100, s, generator=gen) if k.endswith("num_batches_tracked") and s
              else torch.tensor(7) if k.endswith("num_batches_tracked")
              else torch.randn(s, generator=gen)) for k, s in _layout(name).items()}
    plain = tmp_path / "plain.pth"
    torch.save(sd, plain)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, wrapped)
    for path in (str(plain), "file://" + str(wrapped)):
        trunk = build_trunk(name, pretrained=path)
        for k, v in trunk.state_dict().items():
            assert torch.equal(v, sd[k]), k


def test_pretrained_missing_or_mismatched_keys_fail(tmp_path):
    sd = build_trunk("resnet18").state_dict()
    del sd["layer4.1.bn2.weight"]
    p = tmp_path / "bad.pth"
    torch.save(sd, p)
    with pytest.raises(RuntimeError):
        build_trunk("resnet18", pretrained=str(p))
    with pytest.raises(FileNotFoundError):
        build_trunk("resnet18", pretrained=str(tmp_path / "nope.pth"))


def test_read_state_dict_unwraps(tmp_path):
    p = tmp_path / "m.pt"
    torch.save({"model": {"module.a": torch.ones(1)}}, p)
    assert list(read_state_dict(str(p))) == ["a"]


@pytest.mark.parametrize("name, last_stride, C, stride", [
    ("resnet18", 1, 512, 16), ("resnet18", 2, 512, 32), ("tiny", 1, 64, 8), ("tiny", 2, 64, 16)])
def test_output_shape_and_stride(name, last_stride, C, stride):
    trunk = build_trunk(name, last_stride=last_stride).eval()
    assert trunk.out_channels == C and trunk.stride == stride
    with torch.no_grad():
        out = trunk(torch.rand(2, 3, 64, 32))
    assert out.shape == (2, C, 64 // stride, 32 // stride)


@pytest.mark.slow
def test_resnet50_output_shape():
    trunk = build_trunk("resnet50").eval()
    assert trunk.out_channels == 2048 and trunk.stride == 16
    with torch.no_grad():
        assert trunk(torch.rand(1, 3, 256, 128)).shape == (1, 2048, 16, 8)


def test_resnet50_attributes_without_forward():
    trunk = build_trunk("resnet50", last_stride=1)
    assert trunk.out_channels == 2048 and trunk.stride == 16
    assert trunk.layer4[0].conv2.stride == (1, 1) and trunk.layer4[0].downsample[0].stride == (1, 1)
    assert build_trunk("resnet50", last_stride=2).layer4[0].conv2.stride == (2, 2)


def test_unknown_trunk_and_bad_stride():
    with pytest.raises(ValueError):
        build_trunk("vgg16")
    with pytest.raises(ValueError):
        build_trunk("tiny", last_stride=3)
