"""The CPU inference the pipelines now use (ONNX Runtime for the DLA voxel classifier,
from ``pipelines.models.runtime.prepare_model``) gives the same labels as eager PyTorch
and probabilities within 1e-4, through the pipeline's own inference function; the other
models stay as they are."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


@pytest.mark.parametrize(
    ("arch", "config"),
    [("ce_net_3d2d", {"width": 8, "blocks": [1, 1, 1, 1]}), ("ica_unet", {"width": 4})],
)
def test_other_cnns_stay_in_pytorch(arch: str, config: dict) -> None:
    """Faster in ONNX Runtime but not equal enough to eager at clinical sizes
    (bench.inference_cpu), so prepare_model keeps them as they are."""
    model = build(arch, config)
    assert prepare_model(model, CPU) is model


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
