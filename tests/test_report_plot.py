"""The prune charts stay readable on deep models: rows grow the figure, tick labels never overlap,
many layers fold by block or stage with their channels summed, and bad input is refused."""

from __future__ import annotations

import itertools
import struct

import pytest
import torch
from torch import nn

import pruning_ir
from pruning_ir import MagnitudeCriterion, PruningIR, UniformLabelSelector
from pruning_ir.demo.report import (channels_figure, fold_names, layer_widths, plot_channels, plot_report,
                                    report_figure)
from pruning_ir.one_call import GroupReport, PruneReport

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class DeepStack(nn.Module):
    """A stem, ``stages`` x ``blocks`` blocks of two convs each, a linear head."""

    def __init__(self, stages: int, blocks: int, channels: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.stages = nn.ModuleList(nn.Sequential(*[Block(channels) for _ in range(blocks)]) for _ in range(stages))
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean((2, 3)))


def _pruned(stages: int, blocks: int, ratio: float = 0.4) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = DeepStack(stages, blocks)
    ir = PruningIR(model).infer_labels(torch.randn(1, 3, 8, 8))
    MagnitudeCriterion(ir).apply()
    return model, ir.prune(labels=UniformLabelSelector(ratio).select(ir)).model


@pytest.fixture(scope="module")
def deep_pair() -> tuple[nn.Module, nn.Module]:
    return _pruned(4, 15)  # 122 conv/linear layers


def _png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _overlaps(figure) -> list[tuple[str, str]]:
    """Pairs of tick labels (and of bar notes within one panel) whose drawn boxes intersect."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    pairs = []
    for axes in figure.axes:
        groups = [axes.get_yticklabels(), axes.get_xticklabels(), axes.texts]
        for texts in groups:
            boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text()]
            pairs += [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2) if box_a.overlaps(box_b)]
    return pairs


def _row_labels(figure) -> list[str]:
    return [t.get_text() for t in figure.axes[0].get_yticklabels()]


def test_the_overlap_check_catches_a_vertical_bar_chart(deep_pair):
    """The check below is not vacuous: the old layout (a vertical bar per layer, rotated names) fails it."""
    original, pruned = deep_pair
    names = list(layer_widths(original))
    figure, axes = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 4.5))
    axes.bar(range(len(names)), [layer_widths(pruned)[n] for n in names])
    axes.set_xticks(list(range(len(names))), names, rotation=60, ha="right", fontsize=8)
    figure.tight_layout()
    assert len(_overlaps(figure)) > 10
    plt.close(figure)


def test_one_row_per_layer_on_a_122_layer_model(deep_pair, tmp_path):
    original, pruned = deep_pair
    names = list(layer_widths(original))
    assert len(names) == 122
    figure = channels_figure(original, pruned, max_rows=None)
    assert _row_labels(figure) == names
    assert _overlaps(figure) == []
    plt.close(figure)
    small_original, small_pruned = _pruned(1, 4)
    heights = [_png_size(plot_channels(a, b, tmp_path / f"{i}.png", max_rows=None))[1]
               for i, (a, b) in enumerate([(small_original, small_pruned), (original, pruned)])]
    small_rows = len(layer_widths(small_original))
    pitch = (heights[1] - heights[0]) / (len(names) - small_rows)
    assert heights[1] > 2.5 * heights[0] and pitch >= 20  # pixels per added row, at 8-point labels


def test_many_layers_fold_by_block_with_channels_summed(deep_pair, tmp_path):
    original, pruned = deep_pair
    before, after = layer_widths(original), layer_widths(pruned)
    figure = channels_figure(original, pruned, "deep")
    labels = _row_labels(figure)
    assert 6 < len(labels) <= 60 and labels[0] == "stem" and labels[-1] == "head"
    assert "stages.0.0 .. 1 x4" in labels  # two blocks of two convs: rows between stages and single layers
    kept, removed = figure.axes[0].containers[:2]
    assert sum(bar.get_width() for bar in kept) == sum(after.values())
    assert sum(bar.get_width() for bar in removed) == sum(before.values()) - sum(after.values())
    assert _overlaps(figure) == []
    plt.close(figure)
    width, height = _png_size(plot_channels(original, pruned, tmp_path / "folded.png", "deep"))
    assert height < 2000 and width < 2000


def test_fold_names_keeps_order_and_every_name_once():
    resnet = ["conv1"] + [f"layer{s}.{b}.conv{c}" for s in range(1, 5) for b in range(6) for c in (1, 2, 3)] + ["fc"]
    flat = [f"{i}" for i in range(250)]
    for names, max_rows in [(resnet, 60), (resnet, 8), (resnet, 1), (flat, 30), (flat, 7)]:
        rows = fold_names(names, max_rows)
        assert len(rows) <= max_rows
        assert [p for _, positions in rows for p in positions] == list(range(len(names)))
    by_block = [label for label, _ in fold_names(resnet, 30)]
    assert by_block[:3] == ["conv1", "layer1.0 x3", "layer1.1 x3"] and by_block[-1] == "fc"
    assert [label for label, _ in fold_names(resnet, 6)] == ["conv1", "layer1 x18", "layer2 x18", "layer3 x18",
                                                            "layer4 x18", "fc"]
    assert fold_names(flat, 50)[0] == ("0 .. 4 x5", [0, 1, 2, 3, 4])
    assert fold_names(resnet, None) == [(name, [i]) for i, name in enumerate(resnet)]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_rows"):
            fold_names(resnet, bad)


def test_long_names_are_shortened_from_the_left():
    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            inner = nn.Linear(4, 4)
            for depth in range(12):
                inner = nn.Sequential(inner) if depth % 2 else nn.ModuleDict({"encoder_block_wrapper": inner})
            self.body = inner

    model = Deep()
    (name,) = layer_widths(model)
    assert len(name) > 60
    figure = channels_figure(model, model)
    (label,) = _row_labels(figure)
    assert label.startswith("...") and name.endswith(label[3:]) and len(label) <= 40
    plt.close(figure)


def _report(groups: int, measured: bool = True) -> PruneReport:
    """A report of ``groups`` groups in 3 stages, as prune(return_report=True) gives it."""
    rows = [GroupReport(i, (f"encoder.stage{i % 3}.blocks.{i // 3}.mlp.fc1", f"encoder.stage{i % 3}.blocks.{i}.fc2"),
                        64, 8 + i % 17, tuple(range(8 + i % 17)), (1000 + i) if measured else None,
                        (5e4 + i) if measured else None) for i in range(groups)]
    rows.sort(key=lambda g: g.modules[0].split(".")[1])
    return PruneReport("test", True, "params", 0.6, 0.6, 1e8, 6e7, 1e6, 6e5, groups=rows)


def test_a_150_group_report_is_readable_folded_or_not(tmp_path):
    report = _report(150)
    whole = report_figure(report, max_rows=None)
    assert len(_row_labels(whole)) == 150 and len(whole.axes) == 3
    assert _overlaps(whole) == []
    assert all(label.endswith(f"[{g.group}]") for label, g in zip(_row_labels(whole), report.groups))
    plt.close(whole)
    folded = report_figure(report, max_rows=40)
    labels = _row_labels(folded)
    assert len(labels) <= 40 and labels[0].startswith("encoder.stage0.blocks.")
    removed_bars = folded.axes[2].containers[0]
    assert sum(bar.get_width() for bar in removed_bars) == pytest.approx(100 * sum(g.macs_removed for g in
                                                                                   report.groups) / 1e8)
    assert _overlaps(folded) == []
    plt.close(folded)
    heights = [_png_size(plot_report(_report(n), tmp_path / f"{n}.png", max_rows=None))[1] for n in (30, 150)]
    assert heights[1] > 2.5 * heights[0]


def test_an_in_place_report_plots_labels_only_and_bad_input_is_refused(tmp_path):
    figure = report_figure(_report(20, measured=False))
    assert len(figure.axes) == 1
    plt.close(figure)
    empty = _report(0)
    with pytest.raises(ValueError, match="no prunable group"):
        plot_report(empty, tmp_path / "empty.png")
    with pytest.raises(ValueError, match="share no conv or linear"):
        plot_channels(nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.ReLU()), tmp_path / "none.png")
    assert not list(tmp_path.iterdir())


def test_plot_report_of_a_real_prune(tmp_path):
    torch.manual_seed(0)
    model = DeepStack(2, 3)
    _, report = pruning_ir.prune(model, torch.randn(1, 3, 8, 8), params=0.6, return_report=True, verbose=False)
    path = plot_report(report, tmp_path / "report.png", max_rows=6)
    assert _png_size(path)[1] > 0
    assert _png_size(report.plot(tmp_path / "method.png", max_rows=6)) == _png_size(path)  # PruneReport.plot
    figure = report_figure(report, max_rows=6)
    assert len(_row_labels(figure)) <= 6 and len(figure.axes) == 3
    shares = [bar.get_width() for bar in figure.axes[0].containers[0]]
    assert any(share > 0 for share in shares) and all(0 <= share <= 100 for share in shares)
    assert _overlaps(figure) == []
    plt.close(figure)
