"""The CPU inference the pipelines now use (ONNX Runtime for the plain CNNs, from
``pipelines.models.runtime.prepare_model``) gives the same labels as eager PyTorch and
probabilities within 1e-4, through each pipeline's own inference function."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.coronary import predict_probabilities
from pipelines.models.ica_unet import predict_mask
from pipelines.models.package import build
from pipelines.models.runtime import OrtModel, prepare_model
from pipelines.preprocess import predict_sequence
from pipelines.rotational import classify_dense

CPU = torch.device("cpu")


def _pair(arch: str, config: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    eager = build(arch, config).eval()
    torch.manual_seed(0)
    prepared = prepare_model(build(arch, config), CPU)
    return eager, prepared


def test_rotational_dense_labels_identical() -> None:
    eager, fast = _pair("dla_resnet", {"width": 8})
    assert isinstance(fast, OrtModel)
    rng = np.random.default_rng(0)
    hu = (rng.normal(0, 400, (7, 30, 26)) + 200).astype(np.float32)
    labels = classify_dense(eager, hu, CPU, slab=3)
    assert len(np.unique(labels)) > 1
    np.testing.assert_array_equal(classify_dense(fast, hu, CPU, slab=3), labels)
    x = torch.from_numpy(rng.normal(0, 500, (2, 5, 45, 47)).astype(np.float32))
    with torch.inference_mode():
        assert float((eager(x).softmax(1) - fast(x).softmax(1)).abs().max()) < 1e-4


def test_coronary_probabilities_within_1e4() -> None:
    eager, fast = _pair("ce_net_3d2d", {"width": 8, "blocks": [1, 1, 1, 1]})
    assert isinstance(fast, OrtModel)
    frames = np.random.default_rng(1).normal(0, 1, (5, 70, 90)).astype(np.float32)
    ref = predict_probabilities(eager, frames, 1, CPU, batch=2)
    got = predict_probabilities(fast, frames, 1, CPU, batch=2)
    assert got.shape == ref.shape == frames.shape and got.dtype == np.float32
    assert float(np.abs(got - ref).max()) < 1e-4
    # Labels: identical wherever eager is not within the tolerance of the threshold.
    decided = np.abs(ref - 0.5) > 1e-4
    np.testing.assert_array_equal((got >= 0.5)[decided], (ref >= 0.5)[decided])


def test_ica_mask_identical() -> None:
    eager, fast = _pair("ica_unet", {"width": 4, "levels": 3})
    assert isinstance(fast, OrtModel) and fast.multiple == eager.multiple
    minip = np.random.default_rng(2).normal(1000, 50, (50, 61)).astype(np.float32)
    np.testing.assert_array_equal(predict_mask(fast, minip, CPU), predict_mask(eager, minip, CPU))


@pytest.mark.parametrize("arch", ["st_unet", "vss_net"])
def test_sequence_models_stay_eager_in_float32(arch: str) -> None:
    eager, prepared = _pair(arch, {"widths": [4, 8, 16]})
    assert not isinstance(prepared, OrtModel)
    rng = np.random.default_rng(3)
    frames = rng.normal(100, 5, (6, 40, 36)).astype(np.float32)
    frames[:, 15:20, :] -= 30
    config = {"fps": None, "max_side": 40}
    ref, _ = predict_sequence(eager, frames, np.arange(6.0), None, config, CPU)
    got, _ = predict_sequence(prepared, frames, np.arange(6.0), None, config, CPU)
    assert ref.dtype == np.float32
    np.testing.assert_array_equal(got, ref)


def test_fallback_to_pytorch_when_the_export_fails(caplog: pytest.LogCaptureFixture) -> None:
    model = build("dla_resnet", {"width": 4})
    model.onnx_probe_shape = (2, 5, 3, 3)  # type: ignore[misc]  (too small: the export fails)
    prepared = prepare_model(model, CPU)
    assert prepared is model
    assert "ONNX Runtime not used" in caplog.text
