"""LLM scale: memory and time of pruning a Llama of about 1B parameters on CPU, calibrated without gradients.

A LlamaForCausalLM built from a config (random weights, bf16) is traced, calibrated with
``ActivationCriterion`` (Wanda scores) on a few short sequences, and 25% of every MLP's channels
are removed in place (``ir.prune(labels, inplace=True)``). Each arm runs in a fresh process; the
peak resident set size (``VmHWM``) is reported above the process before the model was built, as
a multiple of the model's size (the model itself counts 1), with the time of every step. A
smaller float32 Llama is also calibrated with ``LossAwareCriterion`` (``keep_gradients`` True
and False) and with ``ActivationCriterion``, to show what back-propagation costs.

    python benchmarks/llm_scale.py [--quick] [--arms a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from harness.machine import environment, reset_peak, rss_mb, run_worker, worker_main  # noqa: E402
from harness.tables import write_section  # noqa: E402

SEQ_LEN, BATCHES, MLP_SHARE = 128, 4, 0.25
CONFIGS = {  # name: (hidden, intermediate, layers, heads, kv heads, vocab, dtype)
    "llama_1b": (2048, 5504, 18, 16, 8, 32000, "bfloat16"),
    "llama_160m": (1024, 2816, 8, 16, 8, 32000, "float32"),
    "quick": (128, 344, 2, 4, 2, 1000, "bfloat16"),
}
ARMS = {  # name: (config, criterion, keep_gradients, prune calls)
    "activation_1b": ("llama_1b", "activation", None, 1),
    "activation_1b_chunked": ("llama_1b", "activation", None, 6),
    "activation_160m": ("llama_160m", "activation", None, 1),
    "loss_aware_1b_free": ("llama_1b", "loss_aware", False, 1),
    "loss_aware_160m_free": ("llama_160m", "loss_aware", False, 1),
    "loss_aware_160m_keep": ("llama_160m", "loss_aware", True, 1),
}
QUICK_ARMS = {"activation_quick": ("quick", "activation", None, 2),
              "loss_aware_quick": ("quick", "loss_aware", False, 1)}


def build(name: str) -> torch.nn.Module:
    """The Llama of config ``name``, created directly in its dtype (no float32 copy on the way)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    hidden, intermediate, layers, heads, kv_heads, vocab, dtype = CONFIGS[name]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=2 * SEQ_LEN, use_cache=False, attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        torch.manual_seed(0)
        with torch.device("cpu"):
            return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)


def prune_in_chunks(ir, labels: list, calls: int):
    """``ir.prune(labels, inplace=True)`` in ``calls`` calls, each over a share of the groups: prune()
    builds every new tensor before writing any, so fewer groups per call lower the peak."""
    import warnings
    groups = sorted({label.group.id for label in labels})
    chunks = [set(groups[i::calls]) for i in range(calls)]
    for number, chunk in enumerate(c for c in chunks if c):
        wanted = {label.class_id for label in labels if label.group.id in chunk}
        with warnings.catch_warnings():
            if number < calls - 1:  # the config is synchronised at the last call, when every layer agrees
                warnings.filterwarnings("ignore", message=".*config cannot describe")
            warnings.filterwarnings("ignore", message=".*shape-only")
            ir = ir.prune(labels=[label for label in ir.labels() if label.class_id in wanted], inplace=True)
    return ir


class _Phases:
    """Per step: seconds and the peak RSS above ``base`` (MiB), the peak reset before each step."""

    def __init__(self, base: float):
        self.base, self.steps = base, {}

    def run(self, name: str, step):
        reset_peak()
        start = time.perf_counter()
        result = step()
        self.steps[name] = {"seconds": round(time.perf_counter() - start, 3),
                            "peak_mb": round(rss_mb("VmHWM") - self.base, 1)}
        return result


def worker(arm: str, quick: str = "0") -> dict:
    """In a fresh process: build, trace, calibrate, select, prune in place; times and peak memory."""
    import pruning_ir
    from pruning_ir import ActivationCriterion, LossAwareCriterion, PruningIR, UniformLabelSelector
    from transformers import LlamaForCausalLM
    config, criterion, keep, calls = {**ARMS, **QUICK_ARMS}[arm]
    del pruning_ir, LlamaForCausalLM  # imported before the baseline: library code is not the step's memory
    base = rss_mb()
    phases = _Phases(base)
    model = phases.run("build model", lambda: build(config))
    size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (1, SEQ_LEN), generator=generator) for _ in range(BATCHES)]
    ir = PruningIR(model)

    def trace():
        with torch.no_grad():
            ir.infer_labels(input_ids=batches[0])
    phases.run("trace (infer labels)", trace)

    def calibrate():
        times = []
        if criterion == "activation":
            with ActivationCriterion(ir, method="wanda") as collector:
                for ids in batches:
                    start = time.perf_counter()
                    collector(input_ids=ids)
                    times.append(time.perf_counter() - start)
        else:
            with LossAwareCriterion(ir, keep_gradients=keep) as collector:
                for ids in batches:
                    start = time.perf_counter()
                    collector(input_ids=ids, labels=ids).loss.backward()
                    times.append(time.perf_counter() - start)
        return times
    batch_times = phases.run("calibration", calibrate)
    grads_left_mb = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                        if p.grad is not None) / 2**20

    def select():
        chosen = UniformLabelSelector(MLP_SHARE).select(ir)
        return [label for label in chosen if all(".mlp" in m for m in label.group.modules)]
    labels = phases.run("selection", select)
    width = model.model.layers[0].mlp.up_proj.weight.shape[0]
    pruned = phases.run("prune (inplace)", lambda: prune_in_chunks(ir, labels, calls).model)
    after = sum(p.numel() for p in pruned.parameters())
    with torch.no_grad():
        logits_shape = list(pruned(input_ids=batches[0]).logits.shape)
    total_peak = max(step["peak_mb"] for step in phases.steps.values())
    after_build = max(step["peak_mb"] for name, step in phases.steps.items() if name != "build model")
    return {"arm": arm, "config": config, "criterion": criterion, "keep_gradients": keep, "prune_calls": calls,
            "dtype": CONFIGS[config][-1], "params": params, "params_after": after, "model_mb": round(size_mb, 1),
            "mlp_width": [width, pruned.model.layers[0].mlp.up_proj.weight.shape[0]],
            "labels_removed": len(labels), "tokens": BATCHES * SEQ_LEN, "steps": phases.steps,
            "calibration_seconds_per_batch": round(sum(batch_times) / len(batch_times), 3),
            "peak_mb": total_peak, "peak_over_model": round(total_peak / size_mb, 3),
            "peak_after_build_over_model": round(after_build / size_mb, 3),
            "grads_left_mb": round(grads_left_mb, 1), "logits_shape": logits_shape}


def markdown(results: list[dict], env: dict) -> list[str]:
    lines = ["## LLM scale (gradient-free calibration)", "",
             f"`python benchmarks/llm_scale.py` ({env['date']}, {env['cpu']}, torch threads {env['torch_threads']}, "
             f"load average {env['load_average'][0]:.2f}). A Llama from a config (random weights), "
             f"{BATCHES} calibration batches of 1 x {SEQ_LEN} tokens, uniform {MLP_SHARE:.0%} of every MLP's "
             "channels removed with `ir.prune(labels, inplace=True)`. Peak: the largest resident set above the "
             "process before the model was built (the model counts 1x); each arm in a fresh process.", "",
             "| arm | params | dtype | model MB | peak / model | trace s | calib. s / batch | select s | "
             "prune calls | prune s | .grad left MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['arm']} | error: {r['error']} ||||||||||")
            continue
        s = r["steps"]
        lines.append(f"| {r['arm']} | {r['params'] / 1e6:.0f}M -> {r['params_after'] / 1e6:.0f}M | {r['dtype']} | "
                     f"{r['model_mb']:.0f} | {r['peak_over_model']:.2f} | {s['trace (infer labels)']['seconds']:.1f} | "
                     f"{r['calibration_seconds_per_batch']:.2f} | {s['selection']['seconds']:.2f} | "
                     f"{r['prune_calls']} | {s['prune (inplace)']['seconds']:.1f} | {r['grads_left_mb']:.0f} |")
    lines += ["", "Peak above the process before each step, MiB (build / trace / calibration / selection / prune): "
              + "; ".join(f"{r['arm']} " + " / ".join(f"{v['peak_mb']:.0f}" for v in r["steps"].values())
                          for r in results if "error" not in r) + "."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, no files written")
    parser.add_argument("--arms", default=None, help="comma-separated arms (default: all)")
    args = parser.parse_args()
    arms = QUICK_ARMS if args.quick else ARMS
    names = args.arms.split(",") if args.arms else list(arms)
    env = environment()
    results = []
    for name in names:
        result = run_worker("llm_scale", [name, "1" if args.quick else "0"], timeout=1800)
        result.setdefault("arm", name)
        results.append(result)
        print(json.dumps(result), flush=True)
    lines = markdown(results, env)
    print("\n".join(lines))
    if not args.quick:
        with open(os.path.join(HERE, "results", "llm_scale.json"), "w") as handle:
            json.dump({"environment": env, "results": results}, handle, indent=1)
        write_section(lines, os.path.join(HERE, "RESULTS.md"))


if __name__ == "__main__":
    if not worker_main(worker):
        main()
