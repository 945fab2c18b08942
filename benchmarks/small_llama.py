"""The small Llama-style decoder of the perplexity benchmark, its corpus, training and perplexity.

Corpus: the docstrings of Python's standard library (``ast.get_docstring`` of every module, class and function in
the interpreter's own ``.py`` files; tests, idlelib, tkinter and turtledemo left out), read as bytes (a 256-symbol
byte tokenizer); every tenth file, in sorted order, is held out as the test split.
"""

from __future__ import annotations

import ast
import math
import os
import sysconfig
import time

import torch
import torch.nn.functional as F
from torch import nn

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
