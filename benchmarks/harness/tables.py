"""Tables and JSON files: a markdown table, a JSON writer, and the tables of an accuracy
comparison over seeds (means per cell, each of ours against its best rival, printing, and merging
the rows of runs made apart: other seeds or other arms).

Accuracy rows are per-seed dicts (``seed``, ``selection``, ``ratio``, ``criterion``, ``macs`` and
the accuracies ``pruned``, ``bn``, ``ft1``); ours are the criteria named ``loss_aware*``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Sequence

COLUMNS = ("pruned", "bn", "ft1")
COMPARED = ("bn", "ft1")  # the compared columns: after re-estimation, after fine-tuning


def table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table, as lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def write_json(path: str, data: dict) -> str:
    """Write ``data`` to ``path`` (its folder created), indented; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(data, handle, indent=1)
    return path


def summarize(rows: list[dict], criteria_order: Sequence[str], selections: Sequence[str]) -> list[dict]:
    """Means over seeds per (selection, ratio, criterion), in the order of ``selections`` and
    ``criteria_order`` (names not in it last)."""
    def order(key: tuple[str, float, str]) -> tuple:
        selection, ratio, criterion = key
        return (selection != "-", selections.index(selection) if selection in selections else -1, ratio,
                criteria_order.index(criterion) if criterion in criteria_order else len(criteria_order))

    entries = []
    for key in sorted({(r["selection"], r["ratio"], r["criterion"]) for r in rows}, key=order):
        group = [r for r in rows if (r["selection"], r["ratio"], r["criterion"]) == key]
        entry = {"selection": key[0], "ratio": key[1], "criterion": key[2],
                 "macs": statistics.mean(r["macs"] for r in group),
                 **{column: statistics.mean(r[column] for r in group) for column in COLUMNS}}
        if all("widths" in r for r in group):
            entry["widths"] = [round(statistics.mean(w), 1) for w in zip(*(r["widths"] for r in group))]
        entries.append(entry)
    return entries


def _per_seed(rows: list[dict], selection: str, ratio: float, criterion: str, column: str) -> dict[int, float]:
    return {r["seed"]: r[column] for r in rows if (r["selection"], r["ratio"], r["criterion"]) == (selection, ratio,
                                                                                                  criterion)}


def compare(rows: list[dict], criteria_order: Sequence[str], selections: Sequence[str]) -> list[dict]:
    """Every LossAware entry against the best other criterion (the target), per column.

    The other criteria are those of the same selection and ratio (knapsack: of any selection
    at that ratio but ``tp_widths``); ``difference_se`` is the standard error of the per-seed
    difference."""
    entries = summarize(rows, criteria_order, selections)
    found = []
    for entry in (e for e in entries if e["criterion"].startswith("loss_aware")):
        selection, ratio = entry["selection"], entry["ratio"]
        others = [e for e in entries if e["ratio"] == ratio and not e["criterion"].startswith("loss_aware")
                  and e["selection"] != "-" and (e["selection"] == selection
                                                 or selection == "knapsack" and e["selection"] != "tp_widths")]
        if not others:  # a partial run (--criteria) without the rivals of this selection
            continue
        for column in COMPARED:
            best = max(others, key=lambda e: e[column])
            ours = _per_seed(rows, selection, ratio, entry["criterion"], column)
            theirs = _per_seed(rows, best["selection"], ratio, best["criterion"], column)
            differences = [ours[s] - theirs[s] for s in ours if s in theirs]
            se = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else None
            found.append({"criterion": entry["criterion"], "selection": selection, "ratio": ratio, "column": column,
                          "ours": entry[column], "best_other": best[column],
                          "other": best["criterion"] if best["selection"] == selection
                          else f"{best['criterion']} ({best['selection']})",
                          "difference": entry[column] - best[column], "difference_se": se,
                          "other_macs_ratio": best["macs"] / entry["macs"],
                          "win": entry[column] >= best[column]})
    return found


def print_comparison(entries: list[dict], comparisons: list[dict]) -> None:
    """Print the means of :func:`summarize` and, per LossAware criterion, the comparisons it wins and loses."""
    base = next(e["macs"] for e in entries if e["criterion"] == "unpruned")
    print(f"{'selection':9} {'ratio':>5} {'criterion':16} {'MACs':>6} {'pruned':>7} {'bn':>7} {'ft1':>7}  widths")
    for e in entries:
        print(f"{e['selection']:9} {e['ratio']:5.1f} {e['criterion']:16} {e['macs'] / base:6.1%} "
              f"{100 * e['pruned']:7.2f} {100 * e['bn']:7.2f} {100 * e['ft1']:7.2f}  "
              + " ".join(f"{w:g}" for w in e.get("widths", ())))
    for name in dict.fromkeys(c["criterion"] for c in comparisons):
        mine = [c for c in comparisons if c["criterion"] == name]
        print(f"{name} >= every other criterion: {sum(c['win'] for c in mine)}/{len(mine)} (selection x ratio x "
              "{bn, ft1})")
        for c in mine:
            if not c["win"]:
                se = "" if c["difference_se"] is None else f" (paired SE {100 * c['difference_se']:.2f})"
                more = c.get("other_macs_ratio", 1.0) - 1
                macs_note = f"; it keeps {more:+.0%} MACs" if abs(more) >= 0.02 else ""
                print(f"    loses {c['selection']} {c['ratio']:.1f} {c['column']}: {100 * c['ours']:.2f} vs "
                      f"{c['other']} {100 * c['best_other']:.2f}, {100 * c['difference']:+.2f}{se}{macs_note}")


def merge_parts(parts: list[dict], default_finetune_lr: float) -> tuple[tuple, list[int], list[dict]]:
    """The settings ``(epochs, budget, finetunes, finetune_lr)``, seeds and rows of several result
    files run with the same settings (``default_finetune_lr`` for files that record none); a row
    that two files hold is kept once. Raises ValueError if the settings differ."""
    settings = {(part["epochs"], part.get("budget"), part.get("finetunes"),
                 part.get("finetune_lr", default_finetune_lr)) for part in parts}
    if len(settings) > 1:
        raise ValueError(f"the files were run with different settings (epochs, budget, finetunes, finetune_lr): "
                         f"{settings}")
    keys = {}
    for row in (row for part in parts for row in part["rows"]):
        keys.setdefault((row["seed"], row["selection"], row["ratio"], row["criterion"]), row)
    return settings.pop(), sorted({seed for part in parts for seed in part["seeds"]}), list(keys.values())


def write_section(lines: list[str], path: str) -> None:
    """Replace a benchmark's section of RESULTS.md (the section whose ``## `` heading is ``lines[0]``)
    in place, or append it: hand-written sections that ``run.py`` carries over."""
    heading = lines[0]
    text = open(path).read().rstrip("\n").splitlines() if os.path.exists(path) else []
    out, skip, done = [], False, False
    for line in text:
        if line.startswith("## "):
            skip = line == heading
            if skip and not done:
                out += lines + [""]
                done = True
        if not skip:
            out.append(line)
    if not done:
        out += ["", *lines]
    with open(path, "w") as handle:
        handle.write("\n".join(out).rstrip("\n") + "\n")
