"""RESULTS.md from the JSON files of ``make bench``: machine, versions, one table per section,
and "where we lose", computed from the numbers (nothing here is hand-written about results); the
hand-written history sections of the file are carried over (``history``).
``python benchmarks/run.py --render`` re-renders it without running anything.
"""

from __future__ import annotations

import json
import os
import statistics

from harness import HERE, RESULTS as DEFAULT_RESULTS, history
from harness.tables import table
SECTIONS = ("coverage", "speed", "quality", "latency", "scale")
TITLES = {"coverage": "1. Coverage", "speed": "2. Speed", "quality": "3. Quality (digits CNN)",
          "latency": "4. Latency budget", "scale": "5. Scale"}
GENERATED = ("Machine", "Summary", *TITLES.values(), "Where we lose / caveats", "Retired arms")  # its ## headings
QUALITY_MARGIN = 0.005  # half a point of accuracy: one or two test images of the digits split


def num(value, spec: str = ".3f", suffix: str = "") -> str:
    return "-" if value is None else f"{format(value, spec)}{suffix}"


def pair(ours, theirs, spec: str = ".3f") -> str:
    """``ours / TP (ratio)``, the cell of every side-by-side column."""
    ratio = ours / theirs if ours and theirs else None
    return f"{num(ours, spec)} / {num(theirs, spec)} ({num(ratio, '.2f')})"


def result_path(results_dir: str, name: str, quick: bool) -> str:
    return os.path.join(results_dir, f"{name}{'_quick' if quick else ''}.json")


def load(results_dir: str, quick: bool) -> dict:
    """``{section: data}`` for every section file present, plus ``run`` (the runner's record)."""
    found = {}
    for name in ("run", *SECTIONS):
        path = result_path(results_dir, name, quick)
        if os.path.exists(path):
            with open(path) as handle:
                found[name] = json.load(handle)
    return found


# -- sections --------------------------------------------------------------------------------------
def coverage_md(data: dict) -> list[str]:
    s = data["summary"]
    lines = [f"Pruned, runs, same output shapes: **pruning_ir {s['pruning_ir']}/{s['models']}**, "
             f"**Torch-Pruning {s['torch_pruning']}/{s['models']}** (magnitude, {data['settings']['ratio']:.0%} "
             f"of every group; time limit {data['settings']['time_limit_s']:.0f} s).", ""]
    rows = []
    for r in data["rows"]:
        ours, tp = r["pruning_ir"], r["torch_pruning"]
        rows.append([r["model"], "yes" if ours["pruned"] else "**no**", num(ours["removed_share"], ".0%"),
                     "yes" if tp["pruned"] else "**no**", num(tp["removed_share"], ".0%"),
                     (ours["error"] or "") + (" / " if ours["error"] and tp["error"] else "") + (tp["error"] or "")])
    return lines + table(["model", "pruning_ir", "params removed", "Torch-Pruning", "params removed",
                          "error (ours / TP)"], rows)


PHASE_KEYS = ("build", "calibrate", "select", "calibrate_select", "prune", "total")


def speed_md(data: dict) -> list[str]:
    st = data["settings"]
    lines = [f"Seconds, ours / Torch-Pruning (ratio); {st['calibration_steps']} calibration steps on the example "
             f"input, {st['ratio']:.0%} of every group, median of {st['processes']} processes x "
             f"{st['timed_runs']} warm runs; memory: {st['memory']}. Calibration includes our criterion's set-up "
             "and score computation; Torch-Pruning computes its Taylor importance inside `step()`, counted under "
             "selection: compare the two together in `calib. + sel.`. Same output shapes: a Torch-Pruning model "
             "that fails it is still timed.", ""]
    rows = []
    for r in data["rows"]:
        ours, tp = r["pruning_ir"], r["torch_pruning"]
        rows.append([r["model"], *(pair(ours.get(k), tp.get(k)) for k in PHASE_KEYS),
                     pair(ours["peak_mb"], tp["peak_mb"], ".0f"), num(ours["model_mb"], ".1f"),
                     f"{'yes' if ours['runs'] else '**no**'} / {'yes' if tp['runs'] else '**no**'}"])
    m = data["median_ratio"]
    rows.append(["**median ratio**", *(num(m.get(k), ".2f") for k in PHASE_KEYS), num(m["peak_mb"], ".2f"), "", ""])
    return lines + table(["model", "build", "calibration", "selection", "calib. + sel.", "pruning", "total",
                          "peak MB", "model MB", "same output shapes (ours / TP)"], rows)


def quality_entries(data: dict) -> list[dict]:
    return data.get("criteria", {}).get("table", [])


def _ordered(names) -> list[str]:
    first = [n for n in names if n.startswith("loss_aware")]
    last = [n for n in names if n.startswith("tp_")]
    return first + [n for n in names if n not in first and n not in last] + last


def quality_md(data: dict) -> list[str]:
    c, entries = data.get("criteria", {}), quality_entries(data)
    base = next((e for e in entries if e["criterion"] == "unpruned"), None)
    if not entries or base is None:
        return ["No quality table."]
    criteria = _ordered(dict.fromkeys(e["criterion"] for e in entries if e["criterion"] != "unpruned"))
    keys = list(dict.fromkeys((e["selection"], e["ratio"]) for e in entries if e["criterion"] != "unpruned"))
    lr = c.get("finetune_lr")  # files without it fine-tuned at 1e-3 and did not fine-tune the unpruned model
    tuned = f", {100 * base['ft1']:.2f}% after the same epoch of fine-tuning as the pruned ones" if lr else ""
    lines = [f"Test accuracy (%) of the digits CNN (unpruned {100 * base['pruned']:.2f}%, {100 * base['bn']:.2f}% with "
             f"its batch norms re-estimated{tuned}), mean of seeds "
             f"{c.get('seeds')}, by `{data['settings']['command']}`: every model of one ratio is pruned to the same "
             + ("MACs budget, (1 - ratio) of the unpruned MACs (uniform selection removes the smallest share of "
                "every group that meets it; " if c.get("budget") == "macs" else
                "MACs budget (what uniform selection at that ratio leaves; ")
             + "Torch-Pruning's ratio is bisected to it). "
             "`tp_*` are Torch-Pruning's GroupTaylorImportance / GroupMagnitudeImportance in MetaPruner "
             "(global selection: `global_pruning=True`); `-`: not run for that selection.", ""]
    titles = {"pruned": "right after pruning", "bn": "after batch-norm re-estimation (no weight update)",
              "ft1": f"after one epoch of fine-tuning (Adam, lr {lr or 1e-3:g})"}
    for column in ("pruned", "bn", "ft1"):
        rows = []
        for selection, ratio in keys:
            here = {e["criterion"]: e for e in entries if (e["selection"], e["ratio"]) == (selection, ratio)}
            kept = min(e["macs"] for e in here.values()) / base["macs"]
            rows.append([selection, f"{ratio:.1f} ({kept:.0%})",
                         *(num(here[n][column] * 100, ".1f") if n in here else "-" for n in criteria)])
        lines += [f"Accuracy {titles[column]}:", "", *table(["selection", "ratio (MACs kept)", *criteria], rows), ""]
    return lines[:-1]


def latency_md(data: dict) -> list[str]:
    lines = ["Knapsack vs binary search (lowest scores first) on a MACs or measured CPU-latency target; "
             "achieved/target re-measured (CPU: median of 3).", ""]
    rows = []
    for r in (r for r in data["targets"] if r["method"] == "knapsack"):
        base = next((b for b in data["targets"] if b["method"] == "binary_search" and b["model"] == r["model"]
                     and b["cost"] == r["cost"] and b["share"] == r["share"]), {})
        rows.append([r["model"], r["cost"], num(r["share"], ".1f"),
                     "unreachable" if "unreachable" in r else num(r["achieved_over_target"], ".3f"),
                     num(r.get("selection_s"), ".1f"), num(r.get("latency_calls"), "d"),
                     "unreachable" if "unreachable" in base else num(base.get("achieved_over_target"), ".3f"),
                     f"{num(r.get('kept_score_share'), '.3f')} / {num(base.get('kept_score_share'), '.3f')}"])
    lines += table(["model", "cost", "target", "Knapsack achieved/target", "time s", "calls",
                    "binary search achieved/target", "kept score (K / BS)"], rows)
    noise = ", ".join(f"{k} {v:.1%}" for k, v in data.get("cpu_noise", {}).items())
    if noise:
        lines += ["", f"CPU noise floor (5 measurements of the unpruned model, (max - min) / median): {noise}."]
    lines += ["", "Is the speed-up real? Measured CPU speed-up against MACs reduction, all models of a row "
                  f"measured in rotation ({data['settings']['cpu_input']}, fastest of {data['settings']['rounds']}).",
              ""]
    rows = [[r["model"], num(r["share"], ".1f"), r["method"], num(r["macs_reduction"], ".2f", "x"),
             num(r["speedup"], ".2f", "x"), num(r["speedup_over_macs_reduction"], ".2f")] for r in data["speedup"]]
    return lines + table(["model", "MACs target", "method", "MACs reduction", "CPU speed-up",
                          "speed-up / MACs reduction"], rows)


def scale_md(data: dict) -> list[str]:
    lines = ["Build time (s) and peak memory (MB), ours / Torch-Pruning (ratio); "
             f"memory: {data['settings']['memory']}.", ""]
    rows = []
    for r in data["rows"]:
        ours, tp = r["pruning_ir"], r["torch_pruning"]
        rows.append([r["model"], r["family"], r["depth"], num((ours.get("params") or 0) / 1e6, ".1f"),
                     pair(ours["seconds"], tp["seconds"]), pair(ours["peak_mb"], tp["peak_mb"], ".0f"),
                     num(ours.get("model_mb"), ".0f"), f"{ours.get('labels') or '-'} / {ours.get('groups') or '-'}"])
    lines += table(["model", "family", "depth (blocks/layers)", "params (M)", "build s", "peak MB", "model MB",
                    "our labels / groups"], rows)
    growth = "; ".join(f"{family}: ours {num(g['pruning_ir'], '.2f')}, TP {num(g['torch_pruning'], '.2f')}"
                       for family, g in data["growth_exponent"].items())
    return lines + ["", f"Growth exponent of build time with depth (1 = linear): {growth}."]


RENDERERS = {"coverage": coverage_md, "speed": speed_md, "quality": quality_md, "latency": latency_md,
             "scale": scale_md}


def section_md(name: str, data: dict) -> list[str]:
    if "error" in data:
        return [f"Section failed: `{data['error']}`"]
    return RENDERERS[name](data)


# -- where we lose -------------------------------------------------------------------------------------
def worse(ours, theirs, floor: float, share: float = 0.1) -> bool:
    """Ours above theirs by more than ``share`` and by more than ``floor`` (noise on tiny numbers)."""
    return bool(ours and theirs) and ours > theirs * (1 + share) and ours - theirs > floor


def losses(found: dict) -> list[str]:
    """Every place the numbers say we are worse, or a number should be read with care."""
    out = []
    env = found.get("run", {}).get("environment", {})
    if env and env["load_average"][0] > 0.5 * env["cores"]:
        out.append(f"The machine was shared during the run (load average {env['load_average'][0]:.1f} on "
                   f"{env['cores']} cores): absolute times are noisy; the ratios come from interleaved runs.")
    if "coverage" in found and "rows" in found["coverage"]:
        for r in found["coverage"]["rows"]:
            ours, tp = r["pruning_ir"], r["torch_pruning"]
            if not ours["pruned"]:
                out.append(f"Coverage: pruning_ir fails on {r['model']}: {ours['error']}.")
        more = [f"{r['model']} ({r['torch_pruning']['removed_share']:.0%} vs {r['pruning_ir']['removed_share']:.0%})"
                for r in found["coverage"]["rows"] if r["pruning_ir"]["pruned"] and r["torch_pruning"]["pruned"]
                and r["torch_pruning"]["removed_share"] > r["pruning_ir"]["removed_share"] + 0.02]
        if more:
            out.append("Coverage: at the same nominal ratio Torch-Pruning removes more parameters of " + ", ".join(more)
                       + " (it rounds the kept channels of a layer down, we round the removed count to nearest).")
    if "speed" in found and "rows" in found["speed"]:
        names = {"build": "build", "calibrate": "calibration", "select": "selection",
                 "calibrate_select": "calibration + selection", "prune": "pruning", "total": "total",
                 "peak_mb": "peak memory"}
        for r in found["speed"]["rows"]:
            ours, tp = r["pruning_ir"], r["torch_pruning"]
            slower = [f"{names[k]} x{v:.2f}" for k, v in r["ratio"].items()
                      if k in names and worse(ours[k], tp[k], 0.01 if k != "peak_mb" else 2.0)]
            if slower and "calibration" in " ".join(slower) and ours.get("calibrate_setup") is not None:
                steps = (ours["calibrate"] - ours["calibrate_setup"]) / tp["calibrate"]
                slower.append(f"of which entering LossAwareCriterion {ours['calibrate_setup']:.3f} s "
                              f"(the steps alone x{steps:.2f})")
            if slower:
                out.append(f"Speed, {r['model']}: ours / Torch-Pruning above 1 for " + ", ".join(slower) + ".")
            if r["pruning_ir"]["error"]:
                out.append(f"Speed, {r['model']}: pruning_ir failed: {r['pruning_ir']['error']}.")
            if r["torch_pruning"]["error"] and r["torch_pruning"]["total"]:
                out.append(f"Speed, {r['model']}: Torch-Pruning's model fails the check "
                           f"({r['torch_pruning']['error'][:120]}), so its times are for other work.")
    if "quality" in found:
        out += quality_losses(found["quality"])
    if "latency" in found and "targets" in found["latency"]:
        out += latency_losses(found["latency"])
    if "scale" in found and "rows" in found["scale"]:
        for r in found["scale"]["rows"]:
            for key, what, unit in (("seconds", "build time", 0.01), ("peak_mb", "peak memory", 2.0)):
                if worse(r["pruning_ir"][key], r["torch_pruning"][key], unit):
                    out.append(f"Scale, {r['model']}: our {what} is "
                               f"{r['pruning_ir'][key] / r['torch_pruning'][key]:.2f}x Torch-Pruning's.")
        for family, g in found["scale"]["growth_exponent"].items():
            if g["pruning_ir"] and g["torch_pruning"] and g["pruning_ir"] > g["torch_pruning"] + 0.1:
                out.append(f"Scale, {family}: our build time grows faster with depth "
                           f"(exponent {g['pruning_ir']:.2f} vs {g['torch_pruning']:.2f}).")
    return out


def quality_losses(data: dict, margin: float = QUALITY_MARGIN) -> list[str]:
    """Per LossAware variant: where the best Torch-Pruning criterion (same ratio; same selection,
    or any for knapsack) is more accurate by more than ``margin``."""
    entries, out = quality_entries(data), []
    tp = [e for e in entries if e["criterion"].startswith("tp_")]
    base = next((e for e in entries if e["criterion"] == "unpruned"), None)
    for name in dict.fromkeys(e["criterion"] for e in entries if e["criterion"].startswith("loss_aware")):
        lost, total = [], 0
        for ours in (e for e in entries if e["criterion"] == name):
            rivals = [t for t in tp if t["ratio"] == ours["ratio"]
                      and (ours["selection"] == "knapsack" or t["selection"] == ours["selection"])]
            for column in ("bn", "ft1") if rivals else ():
                best, total = max(rivals, key=lambda t: t[column]), total + 1
                if best[column] > ours[column] + margin:
                    lost.append(f"{ours['selection']} {ours['ratio']:.1f} {column} "
                                f"{100 * (ours[column] - best[column]):+.1f} pt vs {best['criterion']}"
                                + (f" ({best['selection']})" if best["selection"] != ours["selection"] else ""))
        if lost:
            out.append(f"Quality, {name}: below the best Torch-Pruning criterion in {len(lost)}/{total} "
                       f"(selection x ratio x {{bn, ft1}}): " + "; ".join(lost) + ".")
    over = []
    for t in tp:
        if base and t["selection"] != "-":
            budget = min(e["macs"] for e in entries if (e["selection"], e["ratio"]) == (t["selection"], t["ratio"]))
            if t["macs"] > 1.02 * budget:
                over.append(f"{t['criterion']} {t['selection']} {t['ratio']:.1f} +{t['macs'] / budget - 1:.0%}")
    if over:
        out.append("Quality: some Torch-Pruning models keep more MACs than ours (its ratio cannot reach the budget "
                   "exactly; an advantage to it): " + ", ".join(over) + ".")
    return out


def latency_losses(data: dict) -> list[str]:
    out, slow, weak = [], [], []
    tolerance = {"macs": 0.02, "cpu": 0.08}
    noise = data.get("cpu_noise", {})
    if noise and max(noise.values()) > 0.1:
        out.append("Latency: the CPU noise floor was " + ", ".join(f"{k} {v:.0%}" for k, v in noise.items())
                   + " (max - min of 5 measurements of one model): the `cpu` rows, which target a measured "
                   "latency, are within noise; the MACs rows are exact.")
    for r in (r for r in data["targets"] if r["method"] == "knapsack"):
        where = f"{r['model']} {r['cost']} {r['share']:.1f}"
        if "unreachable" in r:
            out.append(f"Latency, {where}: the target was below the smallest reachable model as measured then.")
            continue
        if r["achieved_over_target"] > 1 + tolerance[r["cost"]] / 2:
            out.append(f"Latency, {where}: Knapsack over budget, achieved/target {r['achieved_over_target']:.3f}.")
        base = next((b for b in data["targets"] if b["method"] == "binary_search" and b["model"] == r["model"]
                     and b["cost"] == r["cost"] and b["share"] == r["share"] and "selection_s" in b), None)
        if base and r["selection_s"] > 3 * base["selection_s"]:
            slow.append(f"{where} {r['selection_s']:.0f} s ({r['selection_s'] / base['selection_s']:.0f}x)")
    if slow:
        out.append("Latency: Knapsack selection is much slower than the binary search: " + ", ".join(slow) + ".")
    for r in data["speedup"]:
        if r["method"] == "knapsack_macs":
            tp = next((t for t in data["speedup"] if t["method"] == "tp_uniform" and t["model"] == r["model"]
                       and t["share"] == r["share"]), None)
            if tp and tp["speedup"] > 1.05 * r["speedup"]:
                out.append(f"Latency, {r['model']} {r['share']:.1f}: at no more MACs, Torch-Pruning's uniform model "
                           f"runs faster (x{tp['speedup']:.2f} vs our Knapsack's x{r['speedup']:.2f}).")
        if r["speedup_over_macs_reduction"] < 0.7:
            weak.append(f"{r['model']} {r['share']:.1f} {r['method']} x{r['speedup']:.2f} for "
                        f"x{r['macs_reduction']:.2f}")
    if weak:
        out.append("Latency: the measured CPU speed-up is well below the MACs reduction (under 0.7 of it) for "
                   + "; ".join(weak) + " (read the CPU numbers against the noise floor).")
    return out


# -- summary ------------------------------------------------------------------------------------------
def summary_md(found: dict) -> list[str]:
    """The headline numbers, one line per section."""
    out = []
    if "coverage" in found and "summary" in found["coverage"]:
        s = found["coverage"]["summary"]
        out.append(f"Coverage: pruned, running, same output shapes on {s['pruning_ir']}/{s['models']} zoo models "
                   f"(pruning_ir) vs {s['torch_pruning']}/{s['models']} (Torch-Pruning).")
    if "speed" in found and "median_ratio" in found["speed"]:
        m = found["speed"]["median_ratio"]
        out.append(f"Speed (median over models, ours / Torch-Pruning): total {num(m['total'], '.2f')}, build "
                   f"{num(m['build'], '.2f')}, calibration + selection {num(m.get('calibrate_select'), '.2f')}, "
                   f"pruning {num(m['prune'], '.2f')}, peak memory {num(m['peak_mb'], '.2f')}.")
    entries = quality_entries(found.get("quality", {}))
    if entries:
        counts = {}
        for ours in (e for e in entries if e["criterion"].startswith("loss_aware")):
            rivals = [t for t in entries if t["criterion"].startswith("tp_") and t["ratio"] == ours["ratio"]
                      and (ours["selection"] == "knapsack" or t["selection"] == ours["selection"])]
            for column in ("bn", "ft1") if rivals else ():
                won = ours[column] + QUALITY_MARGIN >= max(t[column] for t in rivals)
                wins, total = counts.get(ours["criterion"], (0, 0))
                counts[ours["criterion"]] = (wins + won, total + 1)
        out.append("Quality (digits, same MACs): at least as accurate (within 0.5 pt) as the best Torch-Pruning "
                   "criterion in "
                   + ", ".join(f"{k} {w}/{t}" for k, (w, t) in counts.items())
                   + " (selection x ratio x {BN re-estimated, 1 epoch}).")
    if "latency" in found and "targets" in found["latency"]:
        lat = found["latency"]
        macs = [r["achieved_over_target"] for r in lat["targets"]
                if r["method"] == "knapsack" and r["cost"] == "macs" and "achieved_over_target" in r]
        cpu = [r for r in lat["targets"] if r["method"] == "knapsack" and r["cost"] == "cpu"]
        hit = [r["achieved_over_target"] for r in cpu if "achieved_over_target" in r]
        mine = [r["speedup_over_macs_reduction"] for r in lat["speedup"] if r["method"] == "knapsack_macs"]
        theirs = [r["speedup_over_macs_reduction"] for r in lat["speedup"] if r["method"] == "tp_uniform"]
        out.append(f"Latency: Knapsack achieved/target {min(macs):.3f}-{max(macs):.3f} on MACs"
                   + (f", {min(hit):.2f}-{max(hit):.2f} on measured CPU latency ({len(cpu) - len(hit)} of "
                      f"{len(cpu)} targets unreachable)" if cpu and hit else "")
                   + (f"; CPU speed-up / MACs reduction, median: Knapsack {statistics.median(mine):.2f}, "
                      f"Torch-Pruning uniform {statistics.median(theirs):.2f}" if mine and theirs else "") + ".")
    if "scale" in found and "rows" in found["scale"]:
        sc = found["scale"]
        for family in sc["growth_exponent"]:
            big = max((r for r in sc["rows"] if r["family"] == family), key=lambda r: r["depth"])
            g = sc["growth_exponent"][family]
            out.append(f"Scale, {big['model']}: build {pair(big['pruning_ir']['seconds'], big['torch_pruning']['seconds'])}"
                       f" s, peak {pair(big['pruning_ir']['peak_mb'], big['torch_pruning']['peak_mb'], '.0f')} MB; "
                       f"time grows with depth^{num(g['pruning_ir'], '.2f')} (Torch-Pruning "
                       f"^{num(g['torch_pruning'], '.2f')}).")
    return [f"- {line}" for line in out]


# -- the file ---------------------------------------------------------------------------------------
def machine_md(found: dict) -> list[str]:
    run = found.get("run", {})
    env = run.get("environment") or next((d["environment"] for d in found.values() if "environment" in d), {})
    if not env:
        return ["(no environment recorded)"]
    rows = [["CPU", f"{env['cpu']}, {env['cores']} cores"],
            ["load average at start (1/5/15 min)", " / ".join(f"{v:.2f}" for v in env["load_average"])],
            ["date", env["date"]], ["torch threads", env["torch_threads"]],
            ["versions", f"python {env['python']}, torch {env['torch']}, torch-pruning {env['torch_pruning']}, "
                         f"pruning_ir {env['pruning_ir']}, transformers {env['transformers']}"]]
    if run.get("wall_s"):
        walls = ", ".join(f"{k} {v:.0f} s" for k, v in run.get("section_wall_s", {}).items())
        rows.append(["wall time", f"{run['wall_s'] / 60:.1f} min ({walls}); CPU time of the run and its "
                                  f"subprocesses {run.get('cpu_s', 0) / 60:.1f} min"])
        for rerun in run.get("reruns", []):
            rows.append(["re-run", f"{', '.join(rerun['sections'])} on {rerun['environment']['date']} "
                                   f"(load average {rerun['environment']['load_average'][0]:.2f}), "
                                   f"{rerun['wall_s'] / 60:.1f} min"])
    return table(["", ""], rows)


def render(found: dict, quick: bool, carried: list[str] = ()) -> str:
    """The report; ``carried``: hand-written sections of the previous file (:func:`history.hand_written`)."""
    lines = ["# Benchmarks: pruning_ir vs Torch-Pruning", "",
             "Generated from `benchmarks/results/*.json` by `benchmarks/run.py`; `make bench` "
             f"(`python benchmarks/run.py{' --quick' if quick else ''}`) re-runs everything on CPU, each comparison "
             "interleaved in one run. Ratios are pruning_ir / Torch-Pruning: below 1 is faster or smaller.", "",
             "## Machine", "", *machine_md(found), "", "## Summary", "", *summary_md(found), ""]
    for name in SECTIONS:
        if name in found:
            data = found[name]
            stamp = data.get("environment", {})
            lines += [f"## {TITLES[name]}", "", *section_md(name, data), ""]
            if stamp:
                lines += [f"_{stamp['date']}, load average {stamp['load_average'][0]:.2f} at the start of the "
                          f"section, {data.get('wall_s', 0):.0f} s._", ""]
    lost = losses(found)
    lines += ["## Where we lose / caveats", "", *(f"- {item}" for item in lost or ["Nowhere in these numbers."]), "",
              "## Retired arms", "", *history.retired_md(), ""]
    if carried:
        lines += [*carried, ""]
    return "\n".join(lines)


def write(results_dir: str = DEFAULT_RESULTS, quick: bool = False, out: str | None = None) -> str:
    """Render the results in ``results_dir`` to ``out`` (default: see :func:`default_report`)."""
    out = out or default_report(results_dir, quick)
    previous = open(out).read() if os.path.exists(out) else ""
    text = render(load(results_dir, quick), quick, history.hand_written(previous, GENERATED))
    with open(out, "w") as handle:
        handle.write(text)
    return out


def default_report(results_dir: str, quick: bool) -> str:
    if os.path.abspath(results_dir) == DEFAULT_RESULTS and not quick:
        return os.path.join(HERE, "RESULTS.md")
    return os.path.join(results_dir, f"RESULTS{'_quick' if quick else ''}.md")
