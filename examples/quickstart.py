"""The four steps on a small residual CNN trained on scikit-learn's digits (real 8x8 images).

    python examples/quickstart.py [--quick]

Trains the CNN, calibrates LossAwareCriterion, removes half of every prunable group with
UniformLabelSelector, fine-tunes one epoch, and prints parameters, MACs and accuracy
before and after. Writes the pruned IR to demo-output/ir.pt (dill).
"""

from __future__ import annotations

import argparse
import os

import dill
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from pruning_ir import LossAwareCriterion, PruningIR, UniformLabelSelector


class DigitsNet(nn.Module):
    """conv-bn-relu stem, one residual block, global pooling, linear classifier."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                   nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.expand = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                                    nn.BatchNorm2d(2 * width), nn.ReLU())
        self.classifier = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.block(x))
        x = self.expand(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def digits_loaders(batch_size: int = 64):
    images, targets = load_digits(return_X_y=True)
    images = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    targets = torch.tensor(targets)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    make = lambda idx, shuffle: torch.utils.data.DataLoader(  # noqa: E731
        torch.utils.data.TensorDataset(images[idx], targets[idx]), batch_size=batch_size, shuffle=shuffle,
        generator=torch.Generator().manual_seed(1))
    return make(train, True), make(test, False)


def train(model: nn.Module, loader, epochs: int, description: str) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)  # built after pruning: parameters are new
    model.train()
    for _ in tqdm(range(epochs), desc=description, leave=False):
        for images, targets in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(images), targets).backward()
            optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    model.eval()
    correct = sum((model(images).argmax(1) == targets).sum().item() for images, targets in loader)
    return correct / len(loader.dataset)


def macs(model: nn.Module, example: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(example)
    return counter.get_total_flops() // 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs (used by the test suite)")
    parser.add_argument("--output", default="demo-output")
    args = parser.parse_args()
    torch.manual_seed(0)
    train_loader, test_loader = digits_loaders()
    model = DigitsNet()
    train(model, train_loader, epochs=2 if args.quick else 8, description="training")
    example = next(iter(test_loader))[0][:1]

    ir = PruningIR(model)
    with LossAwareCriterion(ir) as score_collector:
        for images, targets in tqdm(train_loader, desc="calibrating", leave=False):
            F.cross_entropy(score_collector(images), targets).backward()
    labels = UniformLabelSelector(pruning_ratio=0.5).select(ir)
    pruned_ir = ir.prune(labels=labels)
    pruned = pruned_ir.model
    pruned_accuracy = accuracy(pruned, test_loader)
    train(pruned, train_loader, epochs=1, description="fine-tuning")

    rows = [("parameters", sum(p.numel() for p in model.parameters()), sum(p.numel() for p in pruned.parameters())),
            ("MACs", macs(model, example), macs(pruned, example)),
            ("test accuracy", f"{accuracy(model, test_loader):.3f}",
             f"{pruned_accuracy:.3f} (after 1 epoch: {accuracy(pruned, test_loader):.3f})")]
    print(f"\npruned {len(labels)} labels in {len(ir.label_groups())} groups "
          f"({type(pruned).__name__} is still a {type(model).__name__})")
    print(f"{'':<15}{'before':>12}  {'after':<40}")
    for name, before, after in rows:
        print(f"{name:<15}{before!s:>12}  {after!s:<40}")
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "ir.pt")
    torch.save(pruned_ir, path, pickle_module=dill)
    reloaded = torch.load(path, pickle_module=dill, weights_only=False).model.eval()
    pruned.eval()
    with torch.no_grad():
        same = torch.equal(reloaded(example), pruned(example))
    print(f"saved the pruned IR to {path}; reloaded, it gives {'identical' if same else 'DIFFERENT'} outputs")


if __name__ == "__main__":
    main()
