"""Perplexity: a small Llama trained here, pruned by every pruning_ir recipe and by Torch-Pruning's LLM recipe.

Corpus: the docstrings of Python's standard library (``ast.get_docstring`` of every module,
class and function in the interpreter's own ``.py`` files; tests, idlelib, tkinter and
turtledemo left out), read as bytes (a 256-symbol byte tokenizer); every tenth file, in sorted
order, is held out as the test split. A Llama-style decoder (RMSNorm, grouped-query attention, SwiGLU;
hidden 256, 4 layers, 8 query / 4 key-value heads, MLP 688; learned positions, see
``SmallLlama``) is trained on the rest, then each recipe removes 20%, 35% and 50% of
the attention and MLP parameters, uniformly per layer:

- ``loss_aware``: LossAwareCriterion, one shot; ``loss_aware_rounds``: 4 rounds (prune_in_rounds);
- ``wanda`` / ``flap``: ActivationCriterion (forward passes only); ``magnitude``: MagnitudeCriterion;
  our recipes prune heads and MLP channels and keep the hidden size;
- ``torch_pruning``: Torch-Pruning's ``examples/LLMs/prune_llm.py`` recipe: ``BasePruner`` with
  ``GroupMagnitudeImportance(p=2, group_reduction="mean")``, local (uniform) pruning, the hidden
  size, query heads (key/value heads kept, GQA-consistent) and MLP channels at one ratio,
  ``round_to=4``, lm_head ignored; the ratio is bisected so that the same share of attention and
  MLP parameters goes.

Perplexity on the test split right after pruning and after the same short fine-tune, and the time
of each. ``--quick``: a tiny model, a few steps, no files written.

    python benchmarks/perplexity.py [--quick]
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import math
import os
import sys
import sysconfig
import time
import warnings
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from harness.machine import environment  # noqa: E402
from llm_scale import write_section  # noqa: E402

SHARES = (0.20, 0.35, 0.50)
METHODS = ("loss_aware", "loss_aware_rounds", "wanda", "wanda_query_heads", "flap", "magnitude", "torch_pruning")
FULL = {"hidden": 256, "intermediate": 688, "layers": 4, "heads": 8, "kv_heads": 4, "seq": 128, "batch": 16,
        "train_steps": 200, "lr": 3e-3, "finetune_steps": 15, "finetune_batch": 8, "finetune_lr": 5e-4,
        "calibration_batches": 4, "calibration_batch": 8, "test_windows": 256}
QUICK = {**FULL, "hidden": 64, "intermediate": 160, "layers": 2, "heads": 4, "kv_heads": 2, "seq": 64,
         "batch": 8, "train_steps": 10, "finetune_steps": 2, "calibration_batches": 2, "test_windows": 16}
SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "tkinter", "turtledemo",
                "lib2to3", "ensurepip"}


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) byte tensors: standard-library docstrings, every tenth file held out."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
    parts: tuple[list, list] = ([], [])
    for number, path in enumerate(sorted(files)):
        try:
            tree = ast.parse(open(path, encoding="utf-8").read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = [ast.get_docstring(node) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        parts[number % 10 == 0].extend(d for d in docs if d)
    return tuple(torch.tensor(list("\n\n".join(p).encode()), dtype=torch.long) for p in parts)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    """Grouped-query causal attention with Llama's q/k/v/o projections."""

    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.head_dim, self.num_heads, self.num_key_value_heads = dim // heads, heads, kv_heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, p: dict):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(p["hidden"]), RMSNorm(p["hidden"])
        self.self_attn = Attention(p["hidden"], p["heads"], p["kv_heads"])
        self.mlp = MLP(p["hidden"], p["intermediate"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class SmallLlama(nn.Module):
    """Llama's pre-norm decoder (RMSNorm, GQA, SwiGLU) with learned positions instead of rotary ones: Torch-Pruning
    1.6.1 does not finish building its dependency graph on rotary embeddings (Hugging Face's or this file's)."""

    def __init__(self, p: dict):
        super().__init__()
        self.embed_tokens, self.embed_positions = nn.Embedding(256, p["hidden"]), nn.Embedding(p["seq"], p["hidden"])
        self.layers = nn.ModuleList(Block(p) for _ in range(p["layers"]))
        self.norm, self.lm_head = RMSNorm(p["hidden"]), nn.Linear(p["hidden"], 256, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids) + self.embed_positions(torch.arange(ids.shape[1], device=ids.device))
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def build(p: dict) -> nn.Module:
    torch.manual_seed(0)
    model = SmallLlama(p)
    for name, parameter in model.named_parameters():
        if parameter.dim() == 2:
            nn.init.normal_(parameter, std=0.02)
    return model


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-byte cross-entropy; ``model`` may be a criterion's score collector."""
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def batches(data: torch.Tensor, count: int, size: int, seq: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq - 1, (count, size), generator=g)
    return [torch.stack([data[s:s + seq] for s in row.tolist()]) for row in starts]


def train(model: torch.nn.Module, data: torch.Tensor, steps: int, size: int, seq: int, lr: float, seed: int) -> float:
    """AdamW with a linear warm-up and cosine decay; returns seconds."""
    start = time.perf_counter()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(steps // 10, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(s / steps, 1.0)))))
    for ids in batches(data, steps, size, seq, seed):
        lm_loss(model, ids).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


@torch.no_grad()
def perplexity(model: torch.nn.Module, data: torch.Tensor, seq: int, windows: int) -> float:
    """exp(mean next-byte loss) over non-overlapping windows of the test split."""
    model.eval()
    rows = data[:min(windows, len(data) // seq) * seq].view(-1, seq)
    losses = [lm_loss(model, chunk).item() * len(chunk) for chunk in rows.split(32)]
    return math.exp(sum(losses) / len(rows))


def attention_mlp_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n or ".mlp." in n)


# -- pruning_ir recipes -----------------------------------------------------------------------------
def _heads_and_mlp_selector(share: float, split: tuple[int, int, int, int]):
    """Uniform selection over the head and MLP groups that removes ``share`` of their parameters: heads go in
    the attention group's labels (``split``: attention parameters per layer, those the head labels hold, MLP
    parameters, head labels per layer: key/value groups, or query heads within each group), so the MLP share
    makes up the rounding; the hidden-size group (the embedding's) keeps its labels."""
    from pruning_ir import UniformLabelSelector
    attention, removable, mlp, labels = split
    heads = math.floor(share * labels + 0.5) / labels
    channels = min(max((share * (attention + mlp) - heads * removable) / mlp, 0.0), 0.95)

    class HeadsAndMLP(UniformLabelSelector):
        def select(self, ir, **kwargs):
            chosen = []
            for kind, part in (("self_attn", heads), (".mlp", channels)):
                if part > 0:
                    chosen += [label for label in UniformLabelSelector(part).select(ir, **kwargs)
                               if all(kind in m for m in label.group.modules)]
            return chosen
    return HeadsAndMLP(share)


def prune_ours(method: str, model: nn.Module, share: float, calibration: list[torch.Tensor],
               split: tuple[int, int, int]) -> nn.Module:
    from pruning_ir import (ActivationCriterion, LossAwareCriterion, MagnitudeCriterion, PruningIR,
                            prune_in_rounds)
    ir = PruningIR(model, gqa_unit="query_heads" if method.endswith("_query_heads") else "kv_groups")
    if method.endswith("_query_heads"):   # query heads within each key/value group: k/v and their rows kept
        attention, _, mlp, _ = split
        attn = model.layers[0].self_attn
        removable = attn.q_proj.weight.numel() + attn.o_proj.weight.numel()
        split, method = (attention, removable, mlp, attn.num_heads // attn.num_key_value_heads), method[:-len(
            "_query_heads")]
    if method == "loss_aware_rounds":
        def calibrate(collector):
            for ids in calibration:
                lm_loss(collector, ids).backward()
        criterion = partial(LossAwareCriterion, keep_gradients=False)
        return prune_in_rounds(ir, partial(_heads_and_mlp_selector, split=split), share, calibrate, rounds=4, criterion=criterion,
                               inplace=True, verbose=False).model
    if method == "magnitude":
        ir.infer_labels(calibration[0])
        MagnitudeCriterion(ir).apply()
    elif method == "loss_aware":
        with LossAwareCriterion(ir, keep_gradients=False) as collector:
            for ids in calibration:
                lm_loss(collector, ids).backward()
    else:
        with ActivationCriterion(ir, method=method) as collector:
            for ids in calibration:
                collector(ids)
    return ir.prune(labels=_heads_and_mlp_selector(share, split).select(ir), inplace=True).model


# -- Torch-Pruning's LLM recipe -----------------------------------------------------------------------
def tp_prune(model: torch.nn.Module, ratio: float, example: torch.Tensor) -> torch.nn.Module:
    """examples/LLMs/prune_llm.py of Torch-Pruning, on ``model`` in place."""
    import torch_pruning as tp
    num_heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = m.num_heads
            num_heads[m.k_proj] = m.num_key_value_heads
            num_heads[m.v_proj] = m.num_key_value_heads
    pruner = tp.pruner.BasePruner(
        model, example_inputs=example, importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False, pruning_ratio=ratio, ignored_layers=[model.lm_head], num_heads=num_heads,
        prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio, round_to=4)
    for group in pruner.step(interactive=True):
        group.prune()
    for name, m in model.named_modules():  # the script's attribute updates (here the forward reads only head_dim)
        if name.endswith("self_attn"):
            m.num_heads = m.q_proj.out_features // m.head_dim
            m.num_key_value_heads = m.k_proj.out_features // m.head_dim
    return model


def tp_ratio(model: torch.nn.Module, share: float, example: torch.Tensor) -> float:
    """The Torch-Pruning ratio whose pruning removes ``share`` of the attention and MLP parameters (bisection)."""
    total = attention_mlp_params(model)
    low, high = 0.0, share
    for _ in range(8):
        middle = (low + high) / 2
        removed = 1 - attention_mlp_params(tp_prune(copy.deepcopy(model), middle, example)) / total
        low, high = (middle, high) if removed < share else (low, middle)
    return (low + high) / 2


def run(p: dict, verbose: bool = True) -> dict:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*Unwrapped parameters")
    train_data, test_data = corpus()
    model = build(p)
    results = {"parameters": p, "corpus": {"train_bytes": len(train_data), "test_bytes": len(test_data),
                                           "source": "Python standard-library docstrings (ast)"}}
    results["train_seconds"] = train(model, train_data, p["train_steps"], p["batch"], p["seq"], p["lr"], seed=0)
    base = perplexity(model, test_data, p["seq"], p["test_windows"])
    results["dense"] = {"perplexity": base, "attention_mlp_params": attention_mlp_params(model),
                        "params": sum(q.numel() for q in model.parameters())}
    if verbose:
        print(f"dense: perplexity {base:.3f} after {results['train_seconds']:.0f} s of training", flush=True)
    calibration = batches(train_data, p["calibration_batches"], p["calibration_batch"], p["seq"], seed=1)
    example = train_data[:16].unsqueeze(0)
    layer = model.layers[0]
    attention_params = sum(q.numel() for q in layer.self_attn.parameters())
    split = (attention_params, attention_params, sum(q.numel() for q in layer.mlp.parameters()),
             layer.self_attn.num_key_value_heads)
    rows = []
    for share in SHARES:
        ratio = tp_ratio(model, share, example)
        for method in METHODS:
            work = copy.deepcopy(model)
            start = time.perf_counter()
            if method == "torch_pruning":
                pruned = tp_prune(work, ratio, example)
            else:
                pruned = prune_ours(method, work, share, calibration, split)
            prune_seconds = time.perf_counter() - start
            pruned.zero_grad(set_to_none=True)
            row = {"share": share, "method": method, "prune_seconds": prune_seconds,
                   "removed": 1 - attention_mlp_params(pruned) / results["dense"]["attention_mlp_params"],
                   "params": sum(q.numel() for q in pruned.parameters()),
                   "hidden_size": pruned.lm_head.in_features,
                   "heads": pruned.layers[0].self_attn.q_proj.out_features // pruned.layers[0].self_attn.head_dim, "tp_ratio": ratio if method == "torch_pruning" else None,
                   "perplexity": perplexity(pruned, test_data, p["seq"], p["test_windows"])}
            row["finetune_seconds"] = train(pruned, train_data, p["finetune_steps"], p["finetune_batch"], p["seq"],
                                            p["finetune_lr"], seed=2)
            row["perplexity_finetuned"] = perplexity(pruned, test_data, p["seq"], p["test_windows"])
            rows.append(row)
            if verbose:
                print(json.dumps(row), flush=True)
    results["rows"] = rows
    return results


def markdown(results: dict, env: dict) -> list[str]:
    p, dense = results["parameters"], results["dense"]
    lines = ["## Perplexity (LLM pruning vs Torch-Pruning)", "",
             f"`python benchmarks/perplexity.py` ({env['date']}, {env['cpu']}, torch threads 1, load average "
             f"{env['load_average'][0]:.2f}; {results['total_seconds'] / 60:.1f} min). A Llama-style decoder (hidden "
             f"{p['hidden']}, {p['layers']} layers, {p['heads']} query / {p['kv_heads']} key-value heads, MLP "
             f"{p['intermediate']}, byte vocabulary, learned positions: Torch-Pruning 1.6.1 does not finish building its "
             f"graph on rotary embeddings; {dense['params'] / 1e6:.2f}M parameters) trained here for "
             f"{p['train_steps']} steps of {p['batch']} x {p['seq']} bytes ({results['train_seconds']:.0f} s) on "
             f"the docstrings of Python's standard library ({results['corpus']['train_bytes'] / 1e6:.2f} MB; every "
             f"tenth file held out, {results['corpus']['test_bytes'] / 1e3:.0f} kB): test perplexity "
             f"**{dense['perplexity']:.3f}** per byte. Each recipe removes a share of the attention and MLP "
             f"parameters uniformly per layer; ours keep the hidden size, Torch-Pruning's LLM recipe "
             "(`examples/LLMs/prune_llm.py`: group magnitude, local, hidden size + query heads + MLP at one "
             "ratio, bisected to the same parameter share) prunes the hidden size too. Calibration: "
             f"{p['calibration_batches']} batches of {p['calibration_batch']} x {p['seq']} training bytes. "
             f"Fine-tune: {p['finetune_steps']} AdamW steps of {p['finetune_batch']} x {p['seq']}, the same for all.",
             "", "| removed (target) | method | removed (actual) | hidden | heads | ppl pruned | ppl fine-tuned | prune s | "
             "fine-tune s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['share']:.0%} | {r['method']} | {r['removed']:.1%} | {r['hidden_size']} | {r['heads']} | "
                     f"{r['perplexity']:.3f} | {r['perplexity_finetuned']:.3f} | {r['prune_seconds']:.2f} | "
                     f"{r['finetune_seconds']:.1f} |")
    lines.append("")
    for share in SHARES:
        rows = [r for r in results["rows"] if r["share"] == share]
        tp = next(r for r in rows if r["method"] == "torch_pruning")
        best = min((r for r in rows if r["method"] != "torch_pruning"), key=lambda r: r["perplexity"])
        lines.append(f"- {share:.0%}: best of ours right after pruning {best['method']} {best['perplexity']:.3f} vs "
                     f"Torch-Pruning {tp['perplexity']:.3f} ({best['perplexity'] / tp['perplexity'] - 1:+.1%}); "
                     f"after fine-tuning best {min(r['perplexity_finetuned'] for r in rows if r is not tp):.3f} vs "
                     f"{tp['perplexity_finetuned']:.3f}.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few steps; no files written")
    args = parser.parse_args()
    env = environment()
    start = time.perf_counter()
    results = run(QUICK if args.quick else FULL)
    results["total_seconds"] = time.perf_counter() - start
    lines = markdown(results, env)
    print("\n".join(lines))
    if not args.quick:
        with open(os.path.join(HERE, "results", "perplexity.json"), "w") as handle:
            json.dump({"environment": env, **results}, handle, indent=1)
        write_section(lines)


if __name__ == "__main__":
    main()
