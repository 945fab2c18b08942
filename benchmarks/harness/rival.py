"""The rival, Torch-Pruning 1.6.1, set up the way its examples do, and brought to a MACs budget.

``MetaPruner`` with ``GroupMagnitudeImportance(p=2)`` ("magnitude") or ``GroupTaylorImportance()``
("taylor", on gradients accumulated beforehand), the final classifier ignored, attention heads
declared and the head attributes updated after pruning. Its only knob is a ratio, so the
comparisons at equal MACs bisect it (:func:`tp_at_macs`, :func:`tp_at_most`); Taylor in rounds
(:func:`tp_in_rounds`) mirrors ``pruning_ir.prune_in_rounds``.
"""

from __future__ import annotations

import copy

from torch import nn

# no pruning_ir import at module level: the speed and scale workers time Torch-Pruning in a process without it


def macs(model: nn.Module, *inputs) -> float:
    """MACs of one forward pass (``pruning_ir.latency.macs``, the counter every MACs budget uses)."""
    from pruning_ir.latency import macs as count
    return count(model, *inputs)

_QKV_NAMES = (("qkv",), ("q", "k", "v"), ("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))


def tp_classifier(model: nn.Module) -> list[nn.Module]:
    """The final classifier Torch-Pruning is told to ignore: the last Linear (else the last conv)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1:]
    return [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)][-1:]


def tp_attention(model: nn.Module) -> dict[nn.Module, tuple[nn.Module, ...]]:
    """Attention modules and their q/k/v Linears (timm, HF BERT/LLaMA, separate q/k/v styles)."""
    found = {}
    for module in model.modules():
        head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
        for names in _QKV_NAMES:
            linears = tuple(getattr(module, n, None) for n in names)
            if isinstance(head_dim, int) and all(isinstance(m, nn.Linear) for m in linears):
                found[module] = linears
    return found


def tp_num_heads(model: nn.Module) -> dict[nn.Module, int]:
    """``num_heads`` for MetaPruner, as Torch-Pruning's ViT / BERT / LLaMA examples build it."""
    heads = {}
    for module, linears in tp_attention(model).items():
        head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size")
        for linear in linears:
            heads[linear] = linear.out_features // head_dim // (3 if len(linears) == 1 else 1)
    return heads


def tp_fix_attention(model: nn.Module, pruner) -> None:
    """After ``step()``, update the attention modules' head attributes from the pruned
    Linears, as Torch-Pruning's examples do (``m.num_heads = pruner.num_heads[m.qkv]``...)."""
    for module, linears in tp_attention(model).items():
        first = linears[0]
        heads = pruner.num_heads.get(first)
        if not heads:
            continue
        width = first.out_features // (3 if len(linears) == 1 else 1)
        head_dim = width // heads
        for name, value in (("num_heads", heads), ("num_attention_heads", heads), ("head_dim", head_dim),
                            ("attention_head_size", head_dim), ("all_head_size", width)):
            if isinstance(getattr(module, name, None), int):
                setattr(module, name, value)
        if len(linears) == 3 and pruner.num_heads.get(linears[1]):
            kv_heads = pruner.num_heads[linears[1]]
            for name, value in (("num_key_value_heads", kv_heads), ("num_key_value_groups", heads // kv_heads)):
                if isinstance(getattr(module, name, None), int):
                    setattr(module, name, value)


def tp_pruner(model: nn.Module, inputs: tuple, importance: str = "magnitude", ratio: float = 0.5,
              global_pruning: bool = False):
    """A ``tp.pruner.MetaPruner`` (builds the dependency graph): the final classifier ignored,
    attention heads declared; ``importance`` is "magnitude" (L2) or "taylor"."""
    import torch_pruning as tp
    imp = tp.importance.GroupTaylorImportance() if importance == "taylor" \
        else tp.importance.GroupMagnitudeImportance(p=2)
    # fresh dicts: MetaPruner's defaults are shared mutable dicts that num_heads is merged into
    return tp.pruner.MetaPruner(model, inputs[0] if len(inputs) == 1 else inputs, importance=imp,
                                pruning_ratio=ratio, global_pruning=global_pruning,
                                ignored_layers=tp_classifier(model), num_heads=tp_num_heads(model),
                                in_channel_groups={}, out_channel_groups={})


def tp_prune(model: nn.Module, inputs: tuple, importance: str = "magnitude", ratio: float = 0.5,
             global_pruning: bool = False) -> nn.Module:
    """Prune ``model`` in place with Torch-Pruning (see :func:`tp_pruner`); returns it."""
    pruner = tp_pruner(model, inputs, importance, ratio, global_pruning)
    pruner.step()
    tp_fix_attention(model, pruner)
    return model


def tp_pruned_copy(model: nn.Module, importance: str, ratio: float, global_pruning: bool, example) -> nn.Module:
    """A pruned copy of ``model`` in eval mode; the copy takes ``model``'s gradients (Taylor's input)."""
    source, model = model, copy.deepcopy(model).eval()
    for mine, theirs in zip(model.parameters(), source.parameters()):  # deepcopy leaves gradients behind
        mine.grad = None if theirs.grad is None else theirs.grad.clone()
    tp_prune(model, (example,), importance, ratio, global_pruning)
    model.zero_grad(set_to_none=True)
    return model


def tp_at_macs(model: nn.Module, importance: str, target: float, global_pruning: bool, example):
    """``(pruned copy, its MACs, ratio)`` for the ratio whose MACs are closest to ``target`` (bisection)."""
    low, high, best = 0.0, 0.95, None
    for _ in range(14):
        ratio = (low + high) / 2
        pruned = tp_pruned_copy(model, importance, ratio, global_pruning, example)
        count = macs(pruned, example)
        if best is None or abs(count - target) < abs(best[1] - target):
            best = (pruned, count, ratio)
        if count > target:
            low = ratio
        else:
            high = ratio
    return best


def tp_at_most(model: nn.Module, inputs: tuple, budget: float, steps: int = 12) -> nn.Module:
    """Uniform magnitude pruning at the largest ratio (bisected) whose MACs do not exceed ``budget``."""
    low, high, best = 0.0, 0.95, None
    for _ in range(steps):
        ratio = (low + high) / 2
        pruned = tp_prune(copy.deepcopy(model), inputs, "magnitude", ratio)
        if macs(pruned, *inputs) <= budget:
            high, best = ratio, pruned
        else:
            low = ratio
    return best if best is not None else tp_prune(copy.deepcopy(model), inputs, "magnitude", high)


def tp_calibrated(trained: nn.Module, x, y, batch: int) -> nn.Module:
    """A copy of ``trained`` holding the loss gradients of the calibration data in batches of
    ``batch`` (for Taylor; ``harness.digits.calibration``)."""
    from harness.digits import calibration
    model = copy.deepcopy(trained).eval()
    model.zero_grad()
    calibration(x, y, batch)(model)
    return model


def tp_in_rounds(trained: nn.Module, importance: str, budget: float, global_pruning: bool, x, y, rounds: int,
                 batch: int) -> tuple[nn.Module, list[float]]:
    """``importance`` in ``rounds`` steps, as ``prune_in_rounds`` does ours: each round recomputes
    the calibration gradients on the partly pruned model, prunes it to the next of ``rounds`` MACs
    targets falling linearly to ``budget`` (:func:`tp_at_macs`) and re-estimates its batch norms.
    Returns the model and each round's ratio."""
    from harness.digits import reestimate_batchnorm
    example, model, ratios = x[:1], trained, []
    base = macs(model, example)
    for k in range(1, rounds + 1):
        model, _, ratio = tp_at_macs(tp_calibrated(model, x, y, batch), importance,
                                     base - (base - budget) * k / rounds, global_pruning, example)
        model = reestimate_batchnorm(model, x).eval()
        ratios.append(round(ratio, 4))
    model.zero_grad(set_to_none=True)
    return model, ratios
