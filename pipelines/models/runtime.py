"""How a loaded model runs: on the CPU, the DLA voxel classifier runs in ONNX Runtime.

Why: ``python -m bench.inference_cpu`` measured ``dla_resnet`` (the rotational_dla
model) 4.9x faster in ONNX Runtime than in eager PyTorch in the same run with the
2 cores shared with other work (load 2), with identical labels and probabilities
within 1e-6; channels-last weights gained 1.5x, ``torch.compile`` 3.4x after a
compilation per worker and input size. On an idle machine ONNX Runtime's lead
shrinks to 1.1x (channels-last 1.5x, compile 1.6x): eager PyTorch's two threads
suffer most when the cores are busy, as a worker's are.
Only architectures with the class attribute ``onnx_on_cpu`` are converted. The
other plain CNNs were faster in ONNX Runtime too (``ce_net_3d2d`` 3.5x,
``ica_unet`` 3.2x) but did not meet the equality rule at clinical sizes (CE-Net's
probabilities differed from eager by up to 2e-3 on a 512² cine, the ICA U-Net's
argmax changed on near-tied pixels), so they stay in PyTorch. The recurrent
sequence models (``st_unet``, ``vss_net``) stay in PyTorch: their loop over a
run's frames would be unrolled into a graph for one frame count.

The model is exported once per worker process, when its package is loaded
(``pipelines.models.package``), with dynamic batch, height and width, and checked
against PyTorch on a probe input before it is used; any failure falls back to
PyTorch with a warning, so the result never depends on ONNX Runtime being there.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

# Largest difference between ONNX Runtime and PyTorch on the probe input.
PROBE_TOLERANCE = 1e-4


class OrtModel(nn.Module):
    """An ONNX Runtime session behind a module call: (N, C, H, W) float32 in, logits out.

    Carries the attributes the pipelines read from the model it replaces
    (``multiple``, ``neighbours``)."""

    def __init__(self, session: Any, source: nn.Module) -> None:
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.architecture = type(source).__name__
        for name in ("multiple", "neighbours"):
            if hasattr(source, name):
                setattr(self, name, getattr(source, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        (y,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(y)

    def extra_repr(self) -> str:
        return f"onnxruntime session of {self.architecture}"


def channels_last_2d(model: nn.Module) -> nn.Module:
    """The weights of every 2D convolution in channels-last order (in place; returns ``model``).

    oneDNN's convolutions run in that order, and a channels-last weight makes the
    output channels-last too. Only 4D weights change (``Module.to(memory_format=...)``
    refuses models with a 3D convolution). Measured in ``bench.inference_cpu``;
    no pipeline uses it now.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                module.weight.data = module.weight.data.contiguous(
                    memory_format=torch.channels_last
                )
    return model


def probe_input(model: nn.Module) -> torch.Tensor:
    """A seeded input of the model's declared ``onnx_probe_shape`` (two samples, so the
    batch axis is exported as a variable) and scale."""
    shape = tuple(model.onnx_probe_shape)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=generator) * float(getattr(model, "onnx_probe_scale", 1.0))


def onnx_runtime(model: nn.Module, threads: int | None = None) -> OrtModel:
    """``model`` exported to ONNX (in memory) and loaded in an ONNX Runtime session.

    Raises ImportError without onnx/onnxruntime and RuntimeError when the session's
    answer on the probe input differs from PyTorch's by more than PROBE_TOLERANCE.
    """
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    # ONNX Runtime's own exceptions derive from Exception, not RuntimeError.
    refusals = tuple(
        getattr(ort_state, name)
        for name in ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NotImplemented")
        if hasattr(ort_state, name)
    )
    model = model.eval()
    probe = probe_input(model)
    buffer = io.BytesIO()
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated in favour of the
        # dynamo one, which needs onnxscript and has no dynamic axes here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (probe,),
            buffer,  # type: ignore[arg-type]
            dynamo=False,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": axes, "logits": axes},
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(
            buffer.getvalue(), options, providers=["CPUExecutionProvider"]
        )
        wrapped = OrtModel(session, model)
        with torch.inference_mode():
            expected = model(probe).float()
            got = wrapped(probe)
    except refusals as exc:
        raise RuntimeError(f"ONNX Runtime refused the exported model: {exc}") from exc
    diff = float((expected - got).abs().max())
    if got.shape != expected.shape or not diff <= PROBE_TOLERANCE:
        raise RuntimeError(
            f"ONNX Runtime differs from PyTorch on the probe input "
            f"(shape {tuple(got.shape)} vs {tuple(expected.shape)}, largest difference {diff:.2e})"
        )
    return wrapped


def prepare_model(model: nn.Module, device: torch.device, onnx: bool = True) -> nn.Module:
    """The model ready for inference on ``device``: eval mode, and on the CPU an ONNX
    Runtime session for the architectures marked ``onnx_on_cpu`` (``onnx=False``
    keeps PyTorch). Falls back to the PyTorch model if the export or its check fails."""
    model = model.to(device).eval()
    if not (onnx and device.type == "cpu" and getattr(model, "onnx_on_cpu", False)):
        return model
    try:
        return onnx_runtime(model)
    except (ImportError, RuntimeError, ValueError) as exc:  # exporter and session errors too
        log.warning(
            "%s runs in PyTorch on the CPU: ONNX Runtime not used (%s)", type(model).__name__, exc
        )
        return model
