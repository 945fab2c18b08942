"""Prune a Hugging Face BERT classifier to a CPU latency budget.

    python examples/bert_latency_budget.py [--quick] [--speed-up 2.0] [--statistic median|min] [--threads 1]

Builds a small BertForSequenceClassification from a config (no download, no network) and
trains it for a few steps on a synthetic task: does token 3 appear in the (padded) sequence?
LossAwareCriterion then scores every attention head, MLP unit and hidden channel on that
task, and KnapsackLabelSelector removes the least important ones until the median CPU
latency of one forward pass, measured with ``pruning_ir.latency.measure_latency`` on an
``input_ids`` + ``attention_mask`` batch, meets the budget. Prints parameters, MACs,
latency, heads and intermediate size per layer, and accuracy, before and after. On a shared
or virtual machine, other processes add noise to every timing: ``--statistic min`` is steadier.

Hugging Face ``config`` objects are not updated by pruning (``config.num_attention_heads``
keeps its old value): forward never reads them, so the pruned model runs, but read the
sizes from the layers, as below, not from the config.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from pruning_ir import KnapsackLabelSelector, LossAwareCriterion, PruningIR, bind
from pruning_ir.latency import macs, measure_latency, parameter_count

PAD, CLS, NEEDLE = 0, 2, 3   # token ids: padding, the [CLS] token, the token the classifier looks for
FIRST_ORDINARY_TOKEN = 5


@dataclass(frozen=True)
class Settings:
    """Model size, training and latency measurement of one run (FULL, or QUICK for the tests)."""

    hidden_size: int
    layers: int
    heads: int
    intermediate_size: int
    vocabulary: int
    sequence_length: int
    training_steps: int
    learning_rate: float
    latency_batch: int       # the batch the latency is measured on
    latency_warmup: int
    latency_repeats: int


FULL = Settings(hidden_size=256, layers=4, heads=8, intermediate_size=1024, vocabulary=1000, sequence_length=64,
                training_steps=100, learning_rate=3e-4, latency_batch=4, latency_warmup=3, latency_repeats=10)
QUICK = Settings(hidden_size=128, layers=2, heads=4, intermediate_size=512, vocabulary=100, sequence_length=32,
                 training_steps=50, learning_rate=1e-3, latency_batch=16, latency_warmup=2, latency_repeats=10)


def synthetic_batch(settings: Settings, size: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random token sequences of random lengths, padded; label 1 where the NEEDLE token occurs."""
    length = settings.sequence_length
    input_ids = torch.randint(FIRST_ORDINARY_TOKEN, settings.vocabulary, (size, length), generator=generator)
    input_ids[:, 0] = CLS
    lengths = torch.randint(length // 2, length + 1, (size,), generator=generator)
    labels = torch.randint(0, 2, (size,), generator=generator)
    positions = 1 + (torch.rand(size, generator=generator) * (lengths - 1)).long()   # inside the sequence
    rows = labels.nonzero().squeeze(1)
    input_ids[rows, positions[rows]] = NEEDLE
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD)
    return input_ids, attention_mask, labels


def train(model: BertForSequenceClassification, settings: Settings, steps: int, generator: torch.Generator) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)  # after pruning: new parameters
    model.train()
    for _ in range(steps):
        input_ids, attention_mask, labels = synthetic_batch(settings, 32, generator)
        loss = F.cross_entropy(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy(model: BertForSequenceClassification,
             test_batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> float:
    input_ids, attention_mask, labels = test_batch
    model.eval()
    predictions = model(input_ids=input_ids, attention_mask=attention_mask).logits.argmax(-1)
    return (predictions == labels).float().mean().item()


def layer_sizes(model: BertForSequenceClassification) -> tuple[list[int], list[int], int]:
    """Attention heads and intermediate size of every layer, and the hidden size, read from the layers."""
    heads, intermediate = [], []
    for layer in model.bert.encoder.layer:
        attention = layer.attention.self
        heads.append(attention.query.out_features // attention.attention_head_size)
        intermediate.append(layer.intermediate.dense.out_features)
    return heads, intermediate, model.bert.embeddings.word_embeddings.embedding_dim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer steps (used by the tests)")
    parser.add_argument("--speed-up", type=float, default=2.0, help="target latency = current latency / speed-up")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (1 gives steadier timings on a shared machine)")
    parser.add_argument("--statistic", choices=("median", "min"), default="median",
                        help="statistic of the timed runs; 'min' is steadier on a shared or virtual machine")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)

    # 1. A BERT classifier from a config (random weights), trained a little on the synthetic task.
    config = BertConfig(vocab_size=settings.vocabulary, hidden_size=settings.hidden_size,
                        num_hidden_layers=settings.layers, num_attention_heads=settings.heads,
                        intermediate_size=settings.intermediate_size, max_position_embeddings=128,
                        pad_token_id=PAD, num_labels=2, attn_implementation="sdpa")
    model = BertForSequenceClassification(config)
    test_batch = synthetic_batch(settings, 512, torch.Generator().manual_seed(1))
    print(f"training {type(model).__name__} ({settings.layers} layers, hidden {settings.hidden_size}) "
          f"for {settings.training_steps} steps ...")
    train(model, settings, settings.training_steps, generator)

    # 2. Calibrate: gradient-based scores for every head, MLP unit and hidden channel.
    ir = PruningIR(model)
    with LossAwareCriterion(ir) as score_collector:
        for _ in range(8):
            input_ids, attention_mask, labels = synthetic_batch(settings, 32, generator)
            logits = score_collector(input_ids=input_ids, attention_mask=attention_mask).logits
            F.cross_entropy(logits, labels).backward()
    model.zero_grad(set_to_none=True)   # the calibration's gradients are not needed any more

    # 3. A latency function: median (or min) CPU time of one forward pass on a fixed batch. Keyword
    #    arguments the latency function does not take itself (attention_mask) go to the model.
    input_ids, attention_mask, _ = synthetic_batch(settings, settings.latency_batch, torch.Generator().manual_seed(2))
    latency = bind(measure_latency, input_ids, attention_mask=attention_mask,
                   warmup=settings.latency_warmup, repeats=settings.latency_repeats, statistic=args.statistic)
    model_macs = bind(macs, input_ids, attention_mask=attention_mask)
    report_latency = {statistic: bind(measure_latency, input_ids, attention_mask=attention_mask, statistic=statistic,
                                      warmup=settings.latency_warmup, repeats=2 * settings.latency_repeats)
                      for statistic in ("median", "min")}   # for the table at the end: more runs, both statistics
    latency_before = latency(model)
    target = latency_before / args.speed_up
    print(f"latency ({args.statistic}) {latency_before * 1e3:.2f} ms -> target {target * 1e3:.2f} ms "
          f"({args.speed_up:g}x faster)")

    # 4. Select what to remove under the budget, and remove it (the original model is left as it was).
    start = time.perf_counter()
    selector = KnapsackLabelSelector(target_latency=target, latency_calculation_function=latency, verbose=False)
    labels = selector.select(ir)
    pruned = ir.prune(labels=labels).model
    print(f"selected {len(labels)} labels in {time.perf_counter() - start:.1f} s "
          f"({selector.latency_calls} latency measurements); achieved {selector.latency * 1e3:.2f} ms, "
          f"achieved/target {selector.latency / target:.3f}")

    heads_before, intermediate_before, hidden_before = layer_sizes(model)
    heads_after, intermediate_after, hidden_after = layer_sizes(pruned)
    accuracy_after_pruning = accuracy(pruned, test_batch)
    rows = [
        ("parameters", f"{parameter_count(model):,.0f}", f"{parameter_count(pruned):,.0f}"),
        ("MACs", f"{model_macs(model):,.0f}", f"{model_macs(pruned):,.0f}"),
        *((f"latency ({statistic})", f"{measure(model) * 1e3:.2f} ms", f"{measure(pruned) * 1e3:.2f} ms")
          for statistic, measure in report_latency.items()),
        ("heads per layer", str(heads_before), str(heads_after)),
        ("intermediate size", str(intermediate_before), str(intermediate_after)),
        ("hidden size", str(hidden_before), str(hidden_after)),
        ("accuracy", f"{accuracy(model, test_batch):.3f}", f"{accuracy_after_pruning:.3f}"),
    ]
    train(pruned, settings, settings.training_steps // 2, generator)
    rows.append(("after fine-tuning", "", f"{accuracy(pruned, test_batch):.3f} "
                                          f"({settings.training_steps // 2} steps)"))
    print(f"\n{'':<20}{'before':>22}  {'after'}   (latencies measured again, side by side: the median "
          "and the fastest run)")
    for name, before, after in rows:
        print(f"{name:<20}{before:>22}  {after}")

    # 5. Still a BertForSequenceClassification, running the same inputs; only the config is stale.
    with torch.no_grad():
        logits_before = model(input_ids=input_ids, attention_mask=attention_mask).logits
        logits_after = pruned(input_ids=input_ids, attention_mask=attention_mask).logits
    print(f"\n{type(pruned).__name__} is still a {type(model).__name__}: on the same input_ids and "
          f"attention_mask it gives logits of shape {tuple(logits_after.shape)} "
          f"({'as' if logits_after.shape == logits_before.shape else 'NOT as'} before)")
    print(f"pruned.config.num_attention_heads = {pruned.config.num_attention_heads} and "
          f"intermediate_size = {pruned.config.intermediate_size}: Hugging Face configs are not updated "
          f"by pruning (forward does not read them); read sizes from the layers")


if __name__ == "__main__":
    main()
