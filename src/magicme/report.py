"""A readable report of one or more results files (`magicme report`): Markdown + HTML.

- the metric table in the paper's layout (Tables 1–2: one row per metric, one column per
  configuration), each cell the mean over videos ± the half-width of its 95 % confidence interval;
- per-subject rows;
- a γ sweep plot: temporal consistency against motion magnitude, one point per configuration
  (the paper's caveat, §5.2: smoothness rises as motion falls, so read both together);
- a contact sheet of the first, middle and last frame of every video.

Each results file is one configuration (the suite refuses to mix them); inside one, subjects whose
identity was trained without the mask form their own column ("w/o masked loss", Table 2).
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

from .outputs import atomic_file, atomic_folder, check_output, writing, written_by_magicme
from .suite import is_results_file, read_rows

# (row key, the paper's name); Table 1's rows in its order, then ours
TABLE_ROWS = (
    ("dino", "DINO ↑"),
    ("clip_i", "CLIP-I ↑"),
    ("clip_t", "CLIP-T ↑"),
    ("temporal_dino", "DINO Temp Consist ↑"),
    ("temporal_clip", "CLIP-I Temp Consist ↑"),
    ("face", "Face similarity ↑"),
    ("face_distance", "Face distance (dlib) ↓"),
    ("face_coverage", "Face coverage ↑"),
    ("motion", "Motion magnitude"),
)


@dataclass
class Group:
    """One column of the table: the rows of one configuration (and one `masked` setting)."""

    label: str
    rows: list[dict]
    results: Path

    @property
    def gamma(self) -> float | None:
        return self.rows[0].get("gamma") if self.rows else None


# ---- statistics ---------------------------------------------------------------------------------


def t_quantile(p: float, dof: int) -> float:
    """Student-t quantile: closed forms for 1 and 2 degrees of freedom, else the Cornish–Fisher expansion
    around the normal quantile (Abramowitz & Stegun 26.7.5), within 0.2 % of the exact value for dof ≥ 3."""
    if dof == 1:
        return math.tan(math.pi * (p - 0.5))
    if dof == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / dof + g2 / dof**2 + g3 / dof**3 + g4 / dof**4


def mean_ci(values) -> tuple[float, float | None, int]:
    """(mean, half-width of the 95 % confidence interval of the mean, n); None values are skipped.

    The half-width is t(0.975, n−1) · s / √n; it is None below two values (no spread to measure).
    """
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if x.size == 0:
        return math.nan, None, 0
    if x.size < 2:
        return float(x.mean()), None, 1
    return float(x.mean()), t_quantile(0.975, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size), int(x.size)


FACE_ROWS = frozenset({"face", "face_distance", "face_coverage"})  # scored only where a face was found


def cell(values, show_n: bool = False) -> str:
    """'mean ± 95 % half-width'; with `show_n`, the number of videos it averages: '0.712 ± 0.031 (n=12)'."""
    mean, half, n = mean_ci(values)
    if n == 0:
        return "–"
    text = f"{mean:.3f}" if half is None else f"{mean:.3f} ± {half:.3f}"
    return f"{text} (n={n})" if show_n else text


# ---- loading ------------------------------------------------------------------------------------


def load_groups(results: list[str | Path], labels: list[str] | None = None) -> list[Group]:
    """Read results files into table columns; a file mixing configurations or holding no rows is refused."""
    if not results:
        raise ValueError("--results: give at least one results file")
    if labels and len(labels) != len(results):
        raise ValueError(f"--label: give one per --results ({len(results)}), got {len(labels)}")
    groups = []
    for i, path in enumerate(results):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--results {str(path)!r} does not exist")
        if not is_results_file(path):
            raise ValueError(f"--results {str(path)!r} is not a results file of 'magicme evaluate-suite'")
        rows = read_rows(path)
        if not rows:
            raise ValueError(f"--results {str(path)!r} holds no rows")
        ids = sorted({r["config_id"] for r in rows})
        if len(ids) > 1:
            raise ValueError(
                f"--results {str(path)!r} mixes configurations {', '.join(ids)}; one file per configuration "
                "(pass several --results to compare them)"
            )
        label = labels[i] if labels else path.name.removesuffix(".jsonl")
        masked = [r for r in rows if r.get("masked") is not False]  # None: a baseline without identity
        unmasked = [r for r in rows if r.get("masked") is False]
        if masked:
            groups.append(Group(label, masked, path))
        if unmasked:
            groups.append(Group(f"{label} w/o masked loss", unmasked, path))
    return groups


# ---- tables -------------------------------------------------------------------------------------


def metric_table(groups: list[Group]) -> list[list[str]]:
    """The paper's layout: header row, then one row per metric with a mean ± CI cell per group."""
    table = [["", *(g.label for g in groups)]]
    for key, name in TABLE_ROWS:
        if any(r.get(key) is not None for g in groups for r in g.rows):
            table.append([name, *(cell((r.get(key) for r in g.rows), key in FACE_ROWS) for g in groups)])
    table.append(["Videos", *(str(len(g.rows)) for g in groups)])
    table.append(["γ (noise prior)", *(str(g.gamma) for g in groups)])
    return table


def subject_table(groups: list[Group]) -> list[list[str]]:
    """One row per (configuration, subject), one column per metric."""
    keys = [(k, n) for k, n in TABLE_ROWS if any(r.get(k) is not None for g in groups for r in g.rows)]
    table = [["configuration", "subject", "videos", *(n for _, n in keys)]]
    for g in groups:
        for subject in dict.fromkeys(r["subject"] for r in g.rows):
            rows = [r for r in g.rows if r["subject"] == subject]
            table.append([g.label, subject, str(len(rows)), *(cell((r.get(k) for r in rows), k in FACE_ROWS) for k, _ in keys)])
    return table


def markdown_table(table: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in row] for row in table]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join(" --- " for _ in esc[0]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in esc[1:]]
    return "\n".join(lines)


def html_table(table: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def summary(results: list[str | Path], labels: list[str] | None = None) -> str:
    """The metric table of `results` as Markdown (what `magicme evaluate-suite` prints when it finishes)."""
    return markdown_table(metric_table(load_groups(results, labels)))


# ---- figures ------------------------------------------------------------------------------------


def legend_label(group: Group) -> str:
    """A configuration's legend entry: its label, with γ added unless the label already says it."""
    said = "γ" in group.label or "gamma" in group.label.lower()
    return group.label if said or group.gamma is None else f"{group.label} (γ={group.gamma})"


def gamma_sweep_figure(groups: list[Group]):
    """Temporal consistency (CLIP and DINO) against motion magnitude: each video faint, each group's mean
    with its 95 % CI; one legend entry per configuration, below both panels (not over the points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), layout="constrained", sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    entries: dict[str, object] = {}  # legend text → handle: a configuration shown in both panels is listed once
    for ax, (key, name) in zip(axes, (("temporal_clip", "CLIP-I temporal consistency"), ("temporal_dino", "DINO temporal consistency"))):
        for i, g in enumerate(groups):
            pts = [(r["motion"], r[key]) for r in g.rows if r.get("motion") is not None and r.get(key) is not None]
            if not pts:
                continue
            x, y = np.asarray(pts).T
            c = colors[i % len(colors)]
            ax.scatter(x, y, s=8, alpha=0.25, color=c)
            (mx, hx, _), (my, hy, _) = mean_ci(x), mean_ci(y)
            handle = ax.errorbar(mx, my, xerr=hx or 0, yerr=hy or 0, fmt="o", color=c, capsize=3)
            entries.setdefault(legend_label(g), handle)
        ax.set_xlabel("motion magnitude (mean |Δ pixel| per frame)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.suptitle("γ sweep: temporal consistency vs motion (mean ± 95 % CI; faint: single videos)")
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="outside lower center", ncol=min(4, len(entries)), fontsize=8)
    return fig


def gamma_sweep_plot(groups: list[Group], path: Path) -> Path:
    """`gamma_sweep_figure` written to `path` as PNG (atomically)."""
    import matplotlib.pyplot as plt

    fig = gamma_sweep_figure(groups)
    _atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def contact_sheet(group: Group, path: Path, max_videos: int = 64, thumb: int = 96) -> tuple[Path, int]:
    """First, middle and last frame of each video (up to `max_videos`), one row per video, labelled.
    Returns the path and how many videos it shows; a missing video file is a grey row saying so."""
    from PIL import Image, ImageDraw

    from .video import read_video

    rows = group.rows[:max_videos]
    label_w, pad, head = 220, 4, 16
    sheet = Image.new("RGB", (label_w + 3 * (thumb + pad), head + max(1, len(rows)) * (thumb + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(("first", "middle", "last")):
        draw.text((label_w + j * (thumb + pad) + 4, 2), name, fill="black")
    for i, r in enumerate(rows):
        top = head + i * (thumb + pad)
        prompt = r["prompt"] if len(r["prompt"]) <= 34 else r["prompt"][:33] + "…"
        text = f"{r['subject']}  seed {r['seed']}\n{prompt}"
        try:
            frames = read_video(group.results.parent / r["video"])
            picks = [frames[0], frames[len(frames) // 2], frames[-1]]
        except (FileNotFoundError, ValueError, KeyError):
            picks, text = [], text + "\n(video missing)"
        draw.multiline_text((4, top + 4), text, fill="black")
        for j, frame in enumerate(picks):
            h, w = frame.shape[:2]
            scale = thumb / max(h, w)  # up or down to the cell, aspect kept
            im = Image.fromarray(frame).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.NEAREST)
            sheet.paste(im, (label_w + j * (thumb + pad), top))
        if not picks:
            draw.rectangle([label_w, top, label_w + 3 * (thumb + pad) - pad, top + thumb], fill=(200, 200, 200))
    _atomic_save(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return path, len(rows)


def _atomic_save(path: Path, write) -> None:
    with atomic_file(path) as tmp:
        write(str(tmp))


REPORT_FILE = re.compile(r"report\.(md|html)|gamma_sweep\.png|contact_sheet_\d+\.png")


def is_own_report(path: Path) -> bool:
    """A report folder magicme wrote (its run record beside it) that holds nothing but report files."""
    return written_by_magicme(path) and path.is_dir() and all(REPORT_FILE.fullmatch(p.name) for p in path.iterdir())


def _atomic_text(path: Path, text: str) -> None:
    _atomic_save(path, lambda tmp: Path(tmp).write_text(text))


# ---- the report ---------------------------------------------------------------------------------


def write_report(results: list[str | Path], out: str | Path, *, labels: list[str] | None = None,
                 max_videos: int = 64) -> dict[str, Path]:
    """Write report.md, report.html, gamma_sweep.png and contact_sheet_<i>.png into `out`; return their paths."""
    if not isinstance(max_videos, int) or max_videos < 1:
        raise ValueError(f"--max-videos must be an integer >= 1, got {max_videos!r}")
    from .video import write_sidecar

    groups = load_groups(results, labels)
    out = check_output(out, folder=True, owned=is_own_report, inputs=[("--results", r) for r in results])
    with writing(out):
        with atomic_folder(out) as tmp:
            written = _write_report_files(groups, tmp, max_videos)
        write_sidecar(out, {"task": "report", "results": [str(Path(r).resolve()) for r in results], "labels": labels,
                            "max_videos": max_videos, "files": sorted(written.values())})
    return {key: out / name for key, name in written.items()}


def _write_report_files(groups: list[Group], out: Path, max_videos: int) -> dict[str, str]:
    """report.md, report.html, the plot and the contact sheets into `out`; their names by key."""
    table, per_subject = metric_table(groups), subject_table(groups)
    plot = gamma_sweep_plot(groups, out / "gamma_sweep.png")
    sheets = [contact_sheet(g, out / f"contact_sheet_{i}.png", max_videos) for i, g in enumerate(groups)]

    note = ("Cells: mean over videos ± half-width of the 95 % confidence interval of the mean (Student t). "
            "Temporal consistency rises as motion falls (paper §5.2): read it with the motion row and CLIP-T.")
    if any(r.get(k) is not None for g in groups for r in g.rows for k in FACE_ROWS):
        note += (" Face rows (dlib's 128-D descriptor of the largest face in each frame against each reference photo): "
                 "similarity = mean cosine, distance = mean Euclidean (the same person below 0.6), coverage = share "
                 "of frames with a face; similarity and distance average only the videos with a face, n says how many.")
    md = ["# magicme evaluation report", "", "## Metrics (paper Table 1 layout)", "", markdown_table(table), "", note, "",
          "## Per subject", "", markdown_table(per_subject), "", "## γ sweep", "", f"![γ sweep]({plot.name})", "",
          "## Contact sheets (first / middle / last frame)", ""]
    for g, (path, shown) in zip(groups, sheets):
        more = f" (first {shown} of {len(g.rows)})" if shown < len(g.rows) else ""
        md += [f"### {g.label}{more}", "", f"![{g.label}]({path.name})", ""]
    md += ["Results: " + ", ".join(f"`{g.results}`" for g in dict((str(g.results), g) for g in groups).values()), ""]
    _atomic_text(out / "report.md", "\n".join(md))

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>magicme evaluation report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}</style></head><body>",
        "<h1>magicme evaluation report</h1><h2>Metrics (paper Table 1 layout)</h2>", html_table(table),
        f"<p>{html.escape(note)}</p><h2>Per subject</h2>", html_table(per_subject),
        f"<h2>γ sweep</h2><img src='{html.escape(plot.name)}' alt='gamma sweep'>",
        "<h2>Contact sheets (first / middle / last frame)</h2>",
    ]
    for g, (path, shown) in zip(groups, sheets):
        parts.append(f"<h3>{html.escape(g.label)}</h3><img src='{html.escape(path.name)}' alt='{html.escape(g.label)}'>")
    parts.append("</body></html>")
    _atomic_text(out / "report.html", "\n".join(parts))
    return {"markdown": "report.md", "html": "report.html", "plot": plot.name,
            **{f"contact_sheet_{i}": p.name for i, (p, _) in enumerate(sheets)}}
