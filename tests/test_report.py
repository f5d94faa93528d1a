import json
import math

import numpy as np
import pytest
from PIL import Image

from magicme.cli import main
from magicme.report import mean_ci, summary, t_quantile, write_report
from magicme.video import write_video

COLOURS = {"first": (255, 0, 0), "middle": (0, 255, 0), "last": (0, 0, 255)}


def _results(folder, name, gamma, temporal, motion, masked_flags, config_id):
    """A results file of synthetic rows whose videos have a red first, green middle and blue last frame."""
    rows = []
    for i, masked in enumerate(masked_flags):
        frames = np.zeros((5, 32, 32, 3), np.uint8)
        frames[0], frames[2], frames[4] = COLOURS["first"], COLOURS["middle"], COLOURS["last"]
        video = folder / f"{name}_{i}.gif"
        write_video(frames, video)
        rows.append({
            "config_id": config_id, "config": {"gamma": gamma}, "subject": "dog" if i % 2 else "cat", "prompt": f"p{i}",
            "prompt_index": i, "seed": 0, "gamma": gamma, "masked": masked, "video": video.name,
            "dino": 0.5 + 0.01 * i, "clip_i": 0.7 + 0.02 * i, "clip_t": 0.25, "temporal_dino": temporal - 0.1,
            "temporal_clip": temporal + 0.005 * i, "motion": motion + 0.001 * i,
        })
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def _parse_markdown_tables(text):
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split(" | ")])
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def test_t_quantile_and_confidence_interval():
    assert t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(0.975, 4) == pytest.approx(2.776, abs=2e-3)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.960, abs=1e-3)
    mean, half, n = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0, None])
    assert (mean, n) == (3.0, 5) and half == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5), rel=1e-3)
    assert mean_ci([0.7])[1] is None and mean_ci([])[2] == 0


def test_report_renders_table_plot_and_contact_sheet(tmp_path):
    ours, ours_rows = _results(tmp_path, "ours", 0.15, 0.82, 0.10, [True, True, True, True, False], "aaa")
    plain, _ = _results(tmp_path, "no_prior", 0.0, 0.80, 0.20, [True, True, True], "bbb")
    paths = write_report([ours, plain], tmp_path / "report", labels=["Ours", "w/o noise prior"])

    tables = _parse_markdown_tables(paths["markdown"].read_text())
    table = tables[0]
    assert table[0] == ["", "Ours", "Ours w/o masked loss", "w/o noise prior"]
    assert all(len(row) == len(table[0]) for row in table)  # parses as one rectangular table
    names = [row[0] for row in table[2:]]
    assert names[:5] == ["DINO ↑", "CLIP-I ↑", "CLIP-T ↑", "DINO Temp Consist ↑", "CLIP-I Temp Consist ↑"]
    clip_i = dict(zip(table[0], table[2 + names.index("CLIP-I ↑")]))
    values = [r["clip_i"] for r in ours_rows[:4]]  # the masked rows of "Ours"
    half = t_quantile(0.975, 3) * np.std(values, ddof=1) / 2
    assert clip_i["Ours"] == f"{np.mean(values):.3f} ± {half:.3f}"
    assert clip_i["Ours w/o masked loss"] == f"{ours_rows[4]['clip_i']:.3f}"  # one video: no interval
    assert dict(zip(table[0], table[2 + names.index("Videos")]))["w/o noise prior"] == "3"
    assert summary([ours, plain], ["Ours", "w/o noise prior"]).splitlines() == paths["markdown"].read_text().split(
        "## Metrics (paper Table 1 layout)\n\n")[1].split("\n\n")[0].splitlines()
    subjects = tables[1]
    assert subjects[0][:3] == ["configuration", "subject", "videos"] and len(subjects) == 2 + 5  # 5 (group, subject) rows

    html = paths["html"].read_text()
    assert html.count("<table>") == 2 and "gamma_sweep.png" in html

    plot = np.asarray(Image.open(paths["plot"]).convert("RGB")).astype(int)
    assert plot.shape[0] > 100 and plot.std() > 5 and len(np.unique(plot.reshape(-1, 3), axis=0)) > 20  # not blank

    sheet = np.asarray(Image.open(paths["contact_sheet_0"]).convert("RGB"))
    assert sheet.shape[0] >= 4 * 96  # one row per video
    for colour in COLOURS.values():  # first, middle and last frames are all on the sheet
        assert (sheet.reshape(-1, 3) == colour).all(axis=1).sum() > 500
    assert not [p for p in (tmp_path / "report").iterdir() if p.name.startswith(".")]


def test_report_refuses_mixed_or_empty_results(tmp_path, capsys):
    a, _ = _results(tmp_path, "a", 0.15, 0.8, 0.1, [True], "aaa")
    b, _ = _results(tmp_path, "b", 0.0, 0.8, 0.1, [True], "bbb")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(a.read_text() + b.read_text())
    code = main(["report", "--results", str(mixed), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "mixes configurations" in err[0]
    assert not (tmp_path / "out").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["report", "--results", str(empty), "--out", str(tmp_path / "out")]) == 2
    assert "no rows" in capsys.readouterr().err
    assert main(["report", "--results", str(a), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.md").exists() and (tmp_path / "out" / "report.html").exists()


def _sweep_groups(labels):
    from pathlib import Path

    from magicme.report import Group

    rng = np.random.default_rng(0)
    groups = []
    for i, (label, gamma) in enumerate(labels):
        rows = [{"gamma": gamma, "motion": 0.05 - gamma / 20 + rng.normal(0, 0.005),
                 "temporal_clip": 0.9 + gamma / 10 + rng.normal(0, 0.01), "temporal_dino": 0.8 + gamma / 8 + rng.normal(0, 0.02)}
                for _ in range(6)]
        groups.append(Group(label, rows, Path(f"r{i}.jsonl")))
    return groups


@pytest.mark.parametrize("labels", [
    [("γ=0", 0.0), ("γ=0.15", 0.15), ("γ=0.3", 0.3)],  # labels that already say γ: not said twice
    [("g0", 0.0), ("g0 w/o masked loss", 0.0), ("g015", 0.15), ("g015 w/o masked loss", 0.15), ("g03", 0.3),
     ("g05", 0.5), ("g07", 0.7), ("g09", 0.9), ("g095", 0.95)],  # many configurations: the legend wraps
])
def test_gamma_sweep_legend_once_per_configuration_and_no_text_overlaps(labels):
    """Rendered, the plot's legend lists each configuration once (γ once in each entry), sits outside both
    panels, and no label, title, legend or tick label overlaps another or a panel."""
    import matplotlib.pyplot as plt

    from magicme.report import gamma_sweep_figure

    fig = gamma_sweep_figure(_sweep_groups(labels))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    [legend] = fig.legends
    entries = [t.get_text() for t in legend.get_texts()]
    assert len(entries) == len(set(entries)) == len(labels)
    assert all(e.count("γ") == 1 for e in entries), entries
    def drawn(ax, labels, axis):  # the locator also lists ticks just outside the view, which are not drawn
        lo, hi = sorted(ax.get_xlim() if axis == 0 else ax.get_ylim())
        return [t for t in labels if t.get_text() and lo <= t.get_position()[axis] <= hi]

    ticks = [t for ax in fig.axes for t in drawn(ax, ax.get_xticklabels(), 0) + drawn(ax, ax.get_yticklabels(), 1)]
    labels_ = [a for ax in fig.axes for a in (ax.xaxis.label, ax.yaxis.label)] + [fig._suptitle, legend]
    panels = [ax.patch for ax in fig.axes]
    boxes = [(a, a.get_window_extent(renderer)) for a in labels_ + ticks + panels]
    for i, (a, box) in enumerate(boxes[: len(labels_)]):
        for b, other in boxes[i + 1 :]:
            assert not box.overlaps(other), (getattr(a, "get_text", lambda: a)(), getattr(b, "get_text", lambda: b)())
    width, height = fig.canvas.get_width_height()
    assert all(0 <= box.x0 and box.x1 <= width and 0 <= box.y0 and box.y1 <= height for _, box in boxes)  # nothing cut off
    plt.close(fig)
