"""What RESULTS.md keeps besides the generated sections: the note on retired arms, and the
sections written by hand (results of earlier runs and studies), carried over on every regeneration."""

from __future__ import annotations

RETIRED_AT = "57530ad"  # the last commit that changed criteria.py before the retirement; it runs every arm
RETIRED = [
    "`criteria.py` arms `loss_aware` (single-label scores, `joint=False`), `loss_aware_mean`, "
    "`loss_aware_joint_mean`, `loss_aware_joint_batch_mean` (scores divided by their group's mean), "
    "`loss_aware_measured` (the eval-mode scores priced by `measure_removal_costs`), `loss_aware_mean_x5` "
    "(single-label, mean-normalized, in rounds) and the `tp_widths` selection (every criterion at the widths "
    "Torch-Pruning's global magnitude picked): `results/criteria_macs_seeds0-1.json` (the quality run of "
    "`make bench` shown above, every arm), `results/criteria_lr3e-4_seeds12-23.json` and `..._seeds24-35.json`, "
    "`results/criteria_measured_seeds12-35.json`, and at fine-tuning lr 1e-3 `results/criteria.json` "
    "and `results/criteria_heldout.json`.",
    "`finetune_length.py` (the one-shot models fine-tuned for 1, 3 and 5 epochs): `results/finetune_length.json`.",
    "`overhead.py` (a LossAwareCriterion calibration step against a plain training step): `results/overhead.json`.",
    "`knapsack.py`'s accuracy part (Knapsack, uniform and global selection at equal MACs on digits, which "
    "`criteria.py` compares) and its stand-alone latency run: `results/knapsack.json`.",
]


def retired_md() -> list[str]:
    return ["Arms and scripts on which no published claim rests any more, retired from the benchmarks; their "
            f"numbers stay in `benchmarks/results/`, and a checkout of commit {RETIRED_AT} reproduces them "
            f"(`git worktree add ../bench-{RETIRED_AT} {RETIRED_AT}`).", "", *(f"- {item}" for item in RETIRED)]


def hand_written(text: str, generated: tuple[str, ...]) -> list[str]:
    """The ``## `` sections of an earlier report whose headings are not in ``generated``, as lines."""
    kept, keep = [], False
    for line in text.rstrip("\n").splitlines():
        if line.startswith("## "):
            keep = line[3:].strip() not in generated
        if keep:
            kept.append(line)
    return kept
