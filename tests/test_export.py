"""Pruned models are ordinary PyTorch modules: torch.compile, torch.export and ONNX take them.

A small ResNet-style CNN and a small ViT from the zoo lose half of every prunable group
(UniformLabelSelector after MagnitudeCriterion or RandomCriterion); the pruned model must
give the eager outputs under ``torch.compile`` (inductor, the default backend), as a
``torch.export`` program, and as an ONNX file (checked by ``onnx.checker``, run by
onnxruntime). The ONNX tests skip when onnx/onnxscript (and onnxruntime) are not installed.

Inductor compiles C++ kernels with gcc: the first compilation in a process pays a fixed
~20-30 s (more on a loaded machine), then ~10-40 s per model with a cold cache
(``/tmp/torchinductor_$USER``), a few seconds with a warm one. That is why the models are
a two-block ResNet and a one-block ViT.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import parameter_count
from pruning_ir import MagnitudeCriterion, PruningIR, RandomCriterion, UniformLabelSelector
from zoo import (BasicBlock, ClassifierHead, ConvBNAct, FusedQKVAttention, VisionTransformer, image_input,
                 seeded_build)


def small_resnet() -> nn.Module:
    """A ResNet in miniature: conv-bn-relu stem, two basic blocks (one with a projection), head."""
    return nn.Sequential(ConvBNAct(3, 16, 3, stride=2), BasicBlock(16, 16), BasicBlock(16, 32, stride=2),
                         ClassifierHead(32, 10))


MODELS: dict[str, tuple[Callable[[], nn.Module], type]] = {
    "resnet": (seeded_build(small_resnet), MagnitudeCriterion),
    "vit": (seeded_build(lambda: VisionTransformer(FusedQKVAttention, depth=1)), RandomCriterion),
}
EXAMPLE_INPUT = image_input(2, 3, 32, 32)
TOLERANCE = dict(atol=1e-4, rtol=1e-4)

# torch's register_module_forward_hook(with_kwargs=True) leaves its id in a global dict after
# handle.remove() (torch 2.13); the tracer avoids it, so tracing must leave no global hook behind
# for torch.compile to warn about.
COMPILE_HOOK_WARNING = "error:Using `torch.compile\\(module\\)` when there are global hooks"


@pytest.fixture(scope="module", params=sorted(MODELS))
def pruned(request) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """(pruned model in eval mode, example inputs), half of every prunable group removed."""
    build, criterion = MODELS[request.param]
    model, inputs = build(), EXAMPLE_INPUT()
    ir = PruningIR(model).infer_labels(*inputs)
    criterion(ir).apply()
    pruned_model = ir.prune(labels=UniformLabelSelector(pruning_ratio=0.5).select(ir)).model.eval()
    assert type(pruned_model) is type(model)
    assert parameter_count(pruned_model) < 0.6 * parameter_count(model)
    return pruned_model, inputs


def eager(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="torch.compile's inductor backend compiles C++ kernels: no C++ compiler found")
@pytest.mark.filterwarnings(COMPILE_HOOK_WARNING)
def test_torch_compile_matches_eager(pruned):
    model, inputs = pruned
    compiled = torch.compile(model)  # the default backend: inductor, C++ kernels on CPU
    with torch.no_grad():
        output = compiled(*inputs)
    torch.testing.assert_close(output, eager(model, inputs), **TOLERANCE)


def test_torch_export_matches_eager(pruned):
    model, inputs = pruned
    program = torch.export.export(model, inputs)
    with torch.no_grad():
        output = program.module()(*inputs)
    torch.testing.assert_close(output, eager(model, inputs), **TOLERANCE)


@pytest.fixture(scope="module")
def onnx_file(pruned, tmp_path_factory) -> Path:
    """The pruned model exported to ONNX with torch's (dynamo) exporter, which needs onnxscript."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    model, inputs = pruned
    path = tmp_path_factory.mktemp("onnx") / "pruned.onnx"
    torch.onnx.export(model, inputs, str(path), input_names=["image"], output_names=["logits"])
    return path


def test_onnx_export_passes_the_checker(onnx_file):
    import onnx

    model = onnx.load(str(onnx_file))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["image"]


def test_onnx_runtime_matches_eager(pruned, onnx_file):
    onnxruntime = pytest.importorskip("onnxruntime")
    model, inputs = pruned
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (output,) = session.run(["logits"], {"image": inputs[0].numpy()})
    torch.testing.assert_close(torch.from_numpy(output), eager(model, inputs), **TOLERANCE)
