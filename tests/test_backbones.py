"""Pretrained backbones against timm's own logits (fixtures written by scripts/write_timm_fixtures.py).

The fixtures hold random timm weights with randomised batch-norm statistics, norm
affines and layer scales, and timm's eval-mode logits for fixed 3-, 1- and 5-plane
inputs (1 and 5 through timm's own `in_chans` adaptation). No torch, no timm here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cnnpipe import backbones
from cnnpipe.models.weights import WeightsError, read_state_dict

FIXTURES = Path(__file__).parent / "fixtures" / "timm"
ARCHS = ("test_resnet", "test_convnext")


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("planes", [3, 1, 5])
def test_logits_equal_timms(arch, planes):
    ref = np.load(FIXTURES / f"{arch}.npz")
    model = backbones.load(arch, FIXTURES / f"{arch}.safetensors", in_channels=planes)
    x = ref[f"x{planes}"].transpose(0, 2, 3, 1)   # timm's NCHW -> NHWC
    assert x.shape[1:3] == (45, 37)               # odd sides: PyTorch's paddings and ceil pooling
    assert rel_err(np.asarray(model(x)), ref[f"logits{planes}"]) < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_a_new_head_keeps_the_backbone(arch):
    ref = np.load(FIXTURES / f"{arch}.npz")
    x = ref["x3"].transpose(0, 2, 3, 1)
    same = backbones.load(arch, FIXTURES / f"{arch}.safetensors")
    new = backbones.load(arch, FIXTURES / f"{arch}.safetensors", num_classes=3)
    assert same.num_classes == 7 and new.num_classes == 3 and new(x).shape == (2, 3)
    pooled = "head_norm" if arch == "test_convnext" else "global_pool"
    a, b = same.features(x, [pooled])[1][pooled], new.features(x, [pooled])[1][pooled]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fresh_backbones_build_for_every_listed_architecture():
    from flax import nnx

    for name in backbones.BACKBONES:   # shapes only: initialising resnet50 eagerly takes seconds
        model = nnx.eval_shape(lambda: backbones.create(name, in_channels=2, num_classes=4, bit_depth=16,
                                                        input_size=(32, 32), mean=[1000.0, 2000.0], std=[50.0, 60.0]))
        assert model.feature_layer_names[-1] in ("layer4", "stages.3")
        assert model.layer_kinds[-1] == "dense"


def _torchvision_names(sd: dict) -> dict:
    """timm ConvNeXt keys -> torchvision's (features.N..., block.K, layer_scale (C, 1, 1), classifier.K)."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "stem":
            k = f"features.0.{parts[1]}.{parts[2]}"
        elif parts[0] == "head":
            k = {"norm": "classifier.0", "fc": "classifier.2"}[parts[1]] + "." + parts[2]
        elif parts[2] == "downsample":
            k = f"features.{2 * int(parts[1])}.{parts[3]}.{parts[4]}"
        else:
            layer = {"conv_dw": "block.0", "norm": "block.2", "mlp.fc1": "block.3", "mlp.fc2": "block.5",
                     "gamma": "layer_scale"}[".".join(parts[4:-1]) or parts[4]]
            tail = "" if parts[4] == "gamma" else "." + parts[-1]
            k = f"features.{2 * int(parts[1]) + 1}.{parts[3]}.{layer}{tail}"
            v = v.reshape(-1, 1, 1) if parts[4] == "gamma" else v
        out[k] = v
    return out


def test_torchvision_convnext_names_load_too(tmp_path):
    from safetensors.numpy import save_file

    sd = read_state_dict(FIXTURES / "test_convnext.safetensors")
    tv = _torchvision_names(sd)
    assert "features.1.0.block.0.weight" in tv and tv["features.1.0.layer_scale"].shape == (24, 1, 1)
    save_file(tv, str(tmp_path / "tv.safetensors"))
    ref = np.load(FIXTURES / "test_convnext.npz")
    model = backbones.load("test_convnext", tmp_path / "tv.safetensors")
    assert rel_err(np.asarray(model(ref["x3"].transpose(0, 2, 3, 1))), ref["logits3"]) < 1e-4


@given(st.integers(1, 12), st.integers(1, 4), st.sampled_from([1, 3, 5]))
def test_adapt_input_conv_is_timms_rule(planes, out, k):
    w = np.random.default_rng(planes * 100 + out).standard_normal((out, 3, k, k)).astype(np.float32)
    got = backbones.adapt_input_conv(planes, w)
    assert got.shape == (out, planes, k, k)
    if planes == 1:
        np.testing.assert_allclose(got[:, 0], w.sum(axis=1), rtol=1e-6)
    elif planes == 3:
        assert got is w
    else:   # repeated R, G, B, R, ... and scaled by 3 / N
        for i in range(planes):
            np.testing.assert_allclose(got[:, i], w[:, i % 3] * 3 / planes, rtol=1e-6)


def test_weights_of_another_architecture_are_named(tmp_path):
    with pytest.raises(WeightsError, match=r"key 'conv1.0.weight' is missing") as info:
        backbones.load("test_resnet", FIXTURES / "test_convnext.safetensors")
    assert "\n" not in str(info.value)
    with pytest.raises(WeightsError, match="not found"):
        backbones.load("test_resnet", tmp_path / "nope.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(WeightsError, match="unknown weights format '.npz'"):
        backbones.load("test_resnet", tmp_path / "w.npz")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(WeightsError, match="bad.safetensors: cannot read weights"):
        backbones.load("test_resnet", tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'"):
        backbones.load("resnet19")


def test_pth_without_torch_and_hub_offline_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "w.pth").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "torch", None)   # as if torch were not installed
    with pytest.raises(WeightsError, match=r"w.pth: reading .pth weights needs torch"):
        backbones.load("test_resnet", tmp_path / "w.pth")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsError) as info:
        backbones.load("resnet18", "hf-hub:timm/resnet18.a1_in1k")
    msg = str(info.value)
    assert "\n" not in msg and "https://huggingface.co/timm/resnet18.a1_in1k" in msg
    with pytest.raises(WeightsError, match="expected hf-hub:<owner>/<name>"):
        backbones.load("resnet18", "hf-hub:resnet18")


def test_weights_config_reads_timms_pretrained_cfg_and_names_a_bad_one(tmp_path):
    from cnnpipe.models.weights import weights_config

    w = tmp_path / "w.safetensors"
    assert weights_config(w, "resnet18")["mean"] == backbones.IMAGENET_MEAN
    assert weights_config(w, "test_resnet")["mean"] == (0.5, 0.5, 0.5)
    (tmp_path / "config.json").write_text('{"pretrained_cfg": {"mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]}}')
    assert weights_config(w, "resnet18") == {"mean": (0.1, 0.2, 0.3), "std": (1.0, 1.0, 1.0), "from": "config.json"}
    (tmp_path / "config.json").write_text('{"pretrained_cfg": {"mean": null, "std": null}}')
    with pytest.raises(WeightsError, match=r"config.json: pretrained_cfg mean/std must be 3 finite numbers"):
        weights_config(w, "resnet18")
    (tmp_path / "config.json").write_text("not json")   # another tool's file: ignored
    assert weights_config(w, "resnet18")["from"] == "ImageNet defaults"


def test_damaged_or_headless_weights_and_small_convnext_inputs_are_named(tmp_path):
    from safetensors.numpy import save_file

    sd = read_state_dict(FIXTURES / "test_resnet.safetensors")
    save_file({**sd, "layer1.0.conv1.weight": sd["layer1.0.conv1.weight"] * np.nan}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(WeightsError, match="layer1.0.conv1.weight holds non-finite values"):
        backbones.load("test_resnet", tmp_path / "nan.safetensors")
    save_file({k: v for k, v in sd.items() if not k.startswith("fc.")}, str(tmp_path / "headless.safetensors"))
    with pytest.raises(WeightsError, match="holds no classifier .*pass num_classes"):
        backbones.load("test_resnet", tmp_path / "headless.safetensors")
    assert backbones.load("test_resnet", tmp_path / "headless.safetensors", num_classes=4).num_classes == 4
    with pytest.raises(WeightsError, match="cannot adapt a 5-plane first convolution to 1 plane"):
        backbones.adapt_input_conv(1, np.zeros((4, 5, 3, 3), np.float32))
    model = backbones.load("test_convnext", FIXTURES / "test_convnext.safetensors")
    with pytest.raises(ValueError, match="input 16x16 is too small; ConvNeXt needs at least 32x32"):
        model(np.zeros((1, 16, 16, 3), np.float32))
