"""Custom modules the tracer cannot (or should not) look into: ``leaf_modules`` and ``soft_tracing``.

    python examples/custom_leaf_module.py

A 1-D CNN + LSTM classifier for 4-channel sensor signals with three awkward parts:

- ``MedianDenoise`` computes a median with numpy: its values leave torch, so they cannot be
  recorded. With ``soft_tracing=True`` (the default) the numpy result becomes a constant and
  the channels feeding it are pinned; with ``soft_tracing=False`` tracing stops with an error
  naming the submodule. Passing the type in ``leaf_modules`` keeps every instance atomic.
- ``Router`` picks a path with Python control flow on tensor *values*: one forward pass only
  records the branch it took. The IR notices the parameters the input left unused and keeps
  the channels around ``Router`` (with the reason); passing this one instance in
  ``leaf_modules`` says so explicitly and keeps it whole.
- ``nn.LSTM`` has a channel rule (its input features are prunable); wrapping it in
  ``PruningIR.LeafModule(lstm, prunable_input=False)`` keeps its input width as it is
  (say, because its weights are shared with another model).

A leaf module without a channel rule is a barrier: the channels entering it are never
pruned and the channels leaving it are new ones, so only the channels that touch a leaf are
pinned; the hidden channels of the residual blocks around it stay prunable.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pruning_ir import MagnitudeCriterion, PruningIR, TracingError, UniformLabelSelector


class MedianDenoise(nn.Module):
    """Subtracts each channel's median over time, computed with numpy (not recordable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        median = np.median(x.detach().cpu().numpy(), axis=-1, keepdims=True)
        return x - torch.from_numpy(median).to(x)


class Router(nn.Module):
    """A residual path chosen per batch by its loudness: control flow on tensor values."""

    def __init__(self, channels: int, threshold: float = 0.1):
        super().__init__()
        self.threshold = threshold
        self.last_path = ""
        self.quiet = nn.Conv1d(channels, channels, 1)
        self.loud = nn.Sequential(nn.Conv1d(channels, 2 * channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv1d(2 * channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_path = "loud" if x.abs().mean() > self.threshold else "quiet"
        if self.last_path == "loud":
            return x + self.loud(x)
        return x + self.quiet(x)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
                         nn.BatchNorm1d(out_channels), nn.ReLU())


class ResidualBlock(nn.Module):
    """conv-bn-relu to ``hidden`` channels, conv-bn back, plus the input."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.expand = conv_bn_relu(channels, hidden, 3)
        self.reduce = nn.Sequential(nn.Conv1d(hidden, channels, 3, padding=1), nn.BatchNorm1d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.reduce(self.expand(x)))


class SensorNet(nn.Module):
    def __init__(self, channels: int = 32, hidden: int = 64, lstm_input: int = 48, num_classes: int = 5):
        super().__init__()
        self.stem = conv_bn_relu(4, channels, 5)
        self.block1 = ResidualBlock(channels, hidden)
        self.denoise = MedianDenoise()
        self.mix = conv_bn_relu(channels, channels, 3)
        self.router = Router(channels)
        self.block2 = ResidualBlock(channels, hidden)
        self.project = conv_bn_relu(channels, lstm_input, 1)
        self.lstm = nn.LSTM(lstm_input, 32, batch_first=True)
        self.head = nn.Linear(32, num_classes)

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.stem(signal))
        x = self.mix(self.denoise(x))
        x = self.project(self.block2(self.router(x)))
        sequence, _ = self.lstm(x.transpose(1, 2))
        return self.head(sequence[:, -1])


def excerpt(ir: PruningIR, words: tuple[str, ...]) -> str:
    """The blocks of ``ir.describe()`` about groups whose description mentions one of ``words``."""
    blocks: list[list[str]] = []
    for line in ir.describe().splitlines()[1:]:
        if line.startswith("group "):
            blocks.append([])
        blocks[-1].append("   " + line)
    return "\n".join("\n".join(block) for block in blocks if any(word in "".join(block) for word in words))


def run(model: nn.Module, signal: torch.Tensor) -> str:
    """The output shape and the path Router took, or the error the model raised."""
    try:
        with torch.no_grad():
            output = model(signal)
    except RuntimeError as error:
        return f"fails: {str(error).splitlines()[0]}"
    return f"output {tuple(output.shape)}, Router took its {model.router.last_path} path"


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    torch.manual_seed(0)
    model = SensorNet().eval()
    quiet_signal = 0.3 * torch.randn(8, 4, 64)    # takes Router's quiet path
    loud_signal = 5.0 * torch.randn(8, 4, 64)     # takes Router's loud path

    print("1. soft_tracing=False: code that cannot be recorded is an error naming the submodule")
    try:
        PruningIR(model, soft_tracing=False).infer_labels(quiet_signal)
    except TracingError as error:
        print(f"   TracingError: {error}")

    print("\n2. soft_tracing=True (the default): the numpy result is a constant and the channels feeding "
          "it are pinned:")
    soft_ir = PruningIR(model).infer_labels(quiet_signal)
    print(excerpt(soft_ir, ("leave torch",)))
    print("   one forward pass records only the path Router took (quiet); its unused layers are noticed "
          "and the channels around Router are kept:")
    print(excerpt(soft_ir, ("router.quiet",)))
    soft_pruned = soft_ir.prune(labels=UniformLabelSelector(pruning_ratio=0.5).select(soft_ir)).model
    print(f"   pruned without leaves, quiet input: {run(soft_pruned, quiet_signal)}")
    print(f"   pruned without leaves, loud input:  {run(soft_pruned, loud_signal)}")

    print("\n3. leaf_modules: a type (every MedianDenoise), an instance (this Router), and the LSTM "
          "with its input width kept:")
    leaf_modules = [MedianDenoise, model.router, PruningIR.LeafModule(model.lstm, prunable_input=False)]
    ir = PruningIR(model, leaf_modules=leaf_modules).infer_labels(quiet_signal)
    print(f"   {ir.describe().splitlines()[0]}")
    print(excerpt(ir, ("leaf module",)))
    print("   still prunable:")
    for group in ir.groups:
        if group.prunable:
            print(f"   group {group.id}: {len(group.labels)} labels of {', '.join(group.modules)}")

    MagnitudeCriterion(ir).apply()
    labels = UniformLabelSelector(pruning_ratio=0.5).select(ir)
    pruned = ir.prune(labels=labels).model
    print(f"\npruned {len(labels)} labels: parameters {parameter_count(model)} -> {parameter_count(pruned)}")
    for name, signal in (("quiet", quiet_signal), ("loud", loud_signal)):
        print(f"{name} input {tuple(signal.shape)}: before {run(model, signal)}; after {run(pruned, signal)}")
    print(f"LSTM input size kept: {pruned.lstm.input_size}; Router kept whole: "
          f"{pruned.router.quiet.in_channels} channels in, {pruned.router.loud[0].out_channels} in its loud path")


if __name__ == "__main__":
    main()
