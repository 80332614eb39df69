"""report.html: the run for people, in one self-contained file (inline SVG, no scripts, no network).

Charts: perplexity and KL against deployed size for every stage (what a compression run is for: accuracy per
byte), GPTQ's loss per decoder layer, pruning's kept heads or experts per layer, the distillation curve. Every
mark carries its numbers as data attributes (`data-label`, `data-x`, `data-y`), so a test can check each chart
against report.json, and the same numbers are in the tables under it.
"""

from __future__ import annotations

import math
from html import escape

W, H, PAD, LEFT = 580, 260, 48, 84  # LEFT: room for the y tick labels and the y title
COLORS = ("#1f6feb", "#d1242f", "#1a7f37", "#9a6700", "#8250df", "#bf3989")


def _scale(values: list[float], lo_px: float, hi_px: float):
    lo, hi = min(values), max(values)
    span = (hi - lo) or (abs(hi) or 1.0)
    lo, hi = lo - 0.08 * span, hi + 0.08 * span
    return lambda v: lo_px + (v - lo) / (hi - lo) * (hi_px - lo_px), lo, hi


def _tick_digits(lo: float, hi: float) -> int:
    """Significant digits that keep five ticks over [lo, hi] apart: a perplexity axis from 315.02 to 315.60
    needs six, not three (which prints 315 five times)."""
    span = abs(hi - lo) or 1.0
    return min(8, 3 + max(0, math.ceil(math.log10(max(abs(lo), abs(hi), span) / span))))


def _frame(title: str, x_label: str, y_label: str, body: str, x_rng, y_rng, chart: str, x_ticks=None) -> str:
    """Axes, ticks and labels around `body`. x_ticks: [(value, label)] for categories; else 5 even ticks."""
    ticks, digits = [], _tick_digits(*y_rng)
    for i in range(5):
        fy = y_rng[0] + (y_rng[1] - y_rng[0]) * i / 4
        py = H - PAD - (H - 2 * PAD) * i / 4
        ticks.append(f'<text x="{LEFT - 6}" y="{py + 4:.1f}" class="t" text-anchor="end">{fy:.{digits}g}</text>')
    if x_ticks is None:
        x_ticks = [(x_rng[0] + (x_rng[1] - x_rng[0]) * i / 4, None) for i in range(5)]
    for value, label in x_ticks:
        px = LEFT + (W - PAD - LEFT) * (value - x_rng[0]) / ((x_rng[1] - x_rng[0]) or 1)
        text = escape(label) if label is not None else f"{value:.4g}"
        ticks.append(f'<text x="{px:.1f}" y="{H - PAD + 16}" class="t" text-anchor="middle">{text}</text>')
    return (
        f'<figure><svg id="{chart}" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img">'
        f"<title>{escape(title)}</title>"
        f'<line x1="{LEFT}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" class="axis"/>'
        f'<line x1="{LEFT}" y1="{PAD}" x2="{LEFT}" y2="{H - PAD}" class="axis"/>'
        + "".join(ticks)
        + f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle">{escape(x_label)}</text>'
        f'<text x="12" y="{H / 2}" transform="rotate(-90 12 {H / 2})" text-anchor="middle">{escape(y_label)}</text>'
        + body
        + f"</svg><figcaption>{escape(title)}</figcaption></figure>"
    )


def scatter(chart: str, title: str, x_label: str, y_label: str, points: list[tuple[str, float, float]]) -> str:
    """Labelled points (label, x, y), joined in order (the pipeline's path through size and accuracy)."""
    if not points:
        return ""
    fx, *x_rng = _scale([p[1] for p in points], LEFT, W - PAD)
    fy, *y_rng = _scale([p[2] for p in points], H - PAD, PAD)
    path = " ".join(f"{fx(x):.1f},{fy(y):.1f}" for _, x, y in points)
    marks = [f'<polyline points="{path}" class="path"/>']
    for i, (label, x, y) in enumerate(points):
        color = COLORS[i % len(COLORS)]
        marks.append(
            f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="5" fill="{color}" data-label="{escape(label)}" '
            f'data-x="{x!r}" data-y="{y!r}"><title>{escape(label)}: {x:.4g}, {y:.4g}</title></circle>'
            f'<text x="{fx(x) + 7:.1f}" y="{fy(y) - 7:.1f}" class="t">{escape(label)}</text>'
        )
    return _frame(title, x_label, y_label, "".join(marks), x_rng, y_rng, chart)


def bars(chart: str, title: str, x_label: str, y_label: str, values: list[tuple[str, float]],
         marked: frozenset = frozenset()) -> str:  # fmt: skip
    """One bar per (label, value), in order; labels in `marked` are drawn in the second color."""
    values = [(label, v) for label, v in values if v is not None]
    if not values:
        return ""
    top = max(v for _, v in values) or 1.0
    step = (W - PAD - LEFT) / len(values)
    marks = []
    for i, (label, v) in enumerate(values):
        h = (H - 2 * PAD) * v / (top * 1.08)
        marks.append(
            f'<rect x="{LEFT + i * step + 1:.1f}" y="{H - PAD - h:.1f}" width="{max(step - 2, 1):.1f}" '
            f'height="{h:.1f}" '
            f'fill="{COLORS[1] if label in marked else COLORS[0]}" data-label="{escape(label)}" data-x="{i}" '
            f'data-y="{v!r}">'
            f"<title>{escape(label)}: {v:.4g}</title></rect>"
        )
    every = max(1, len(values) // 12)  # at most about 12 category labels
    x_ticks = [(i + 0.5, str(i)) for i in range(0, len(values), every)]
    return _frame(title, x_label, y_label, "".join(marks), (0, len(values)), (0, top * 1.08), chart, x_ticks)


def lines(chart: str, title: str, x_label: str, y_label: str, series: dict[str, list[tuple[float, float]]]) -> str:
    series = {k: v for k, v in series.items() if v}
    if not series:
        return ""
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    fx, *x_rng = _scale(xs, LEFT, W - PAD)
    fy, *y_rng = _scale(ys, H - PAD, PAD)
    marks = []
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{fx(x):.1f},{fy(y):.1f}" for x, y in pts)
        marks.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        marks += [
            f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="3" fill="{color}" data-label="{escape(name)}" '
            f'data-x="{x!r}" data-y="{y!r}"/>'
            for x, y in pts
        ]
        marks.append(f'<text x="{W - PAD - 4}" y="{PAD + 14 * (i + 1)}" fill="{color}" text-anchor="end" class="t">'
                     f"{escape(name)}</text>")  # fmt: skip
    return _frame(title, x_label, y_label, "".join(marks), x_rng, y_rng, chart)


def _mb(n) -> str:
    return "-" if not n else f"{n / 1e6:.1f}"


def _num(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _stage_table(report: dict) -> str:
    head = "".join(f"<th>{c}</th>" for c in ("stage", "status", "perplexity", "KL (nats/token)", "top-1",
                                              "deployed MB", "disk MB", "time s"))  # fmt: skip
    rows = []
    for s in report["stages"]:
        m = s.get("metrics") or {}
        rows.append(
            "<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in (
                s["dir"], s["status"] + (" (reused)" if s.get("reused") else ""), _num(m.get("perplexity"), ".3f"),
                _num(m.get("kl"), ".5f"), _num(m.get("top1"), ".4f"), _mb(s.get("deployed_bytes")),
                _mb(s.get("size_bytes")), _num((s.get("timings") or {}).get("total_s"), ".1f"),
            )) + "</tr>"
        )  # fmt: skip
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _verdicts(report: dict) -> str:
    items = [
        f'<li class="{"pass" if v["passed"] else "fail"}"><code>{escape(s["dir"])}</code> '
        f"{'PASS' if v['passed'] else 'FAIL'}: {escape(v['detail'])}</li>"
        for s in report["stages"]
        for v in s.get("verdicts", [])
    ]
    return f"<ul>{''.join(items)}</ul>" if items else "<p>No gates.</p>"


def size_points(report: dict, metric: str) -> list[tuple[str, float, float]]:
    """(stage, deployed MB, metric) of every stage with both: the data of the size charts."""
    return [
        (s["dir"], s["deployed_bytes"] / 1e6, s["metrics"][metric])
        for s in report["stages"]
        if s.get("deployed_bytes") and (s.get("metrics") or {}).get(metric) is not None
    ]


def _stage_charts(s: dict) -> str:
    summary, out = s.get("summary") or {}, []
    if summary.get("layer_loss"):
        values = [(f"layer {i}", v) for i, v in enumerate(summary["layer_loss"])]
        out.append(bars(f"gptq-{s['dir']}", f"{s['dir']}: GPTQ loss per decoder layer", "decoder layer",
                        "sum (w - q)^2 / Hinv_cc^2", values))  # fmt: skip
    peaks = summary.get("layer_peak_accelerator_gib") or []
    if any(peaks):  # GPU runs only: the most each block held while read, solved and stored
        values = [(f"layer {i}", max(p.values())) for i, p in enumerate(peaks) if p]
        out.append(bars(f"gpu-{s['dir']}", f"{s['dir']}: accelerator memory peak per decoder layer", "decoder layer",
                        "GiB", values))  # fmt: skip
    if summary.get("layer_seconds"):  # where a long gptq pass spends its time (MoE layers against dense ones)
        values = [(f"layer {i}", v) for i, v in enumerate(summary["layer_seconds"])]
        out.append(bars(f"time-{s['dir']}", f"{s['dir']}: seconds per decoder layer (read, calibrate, solve, store)",
                        "decoder layer", "seconds", values))  # fmt: skip
    if summary.get("sizes"):  # uniform widths (every layer the same): a table, not a chart
        cells = "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>" for k, v in summary["sizes"].items())
        caption = f"{s['dir']}: widths after pruning ({summary.get('removed_pct', 0):.1f}% of parameters removed)"
        out.append(f'<figure><table class="meta">{cells}</table><figcaption>{escape(caption)}</figcaption></figure>')
    for kind, per_layer in (summary.get("kept") or {}).items():
        values = [(f"layer {i}", float(len(kept))) for i, kept in enumerate(per_layer)]
        out.append(bars(f"prune-{kind}-{s['dir']}", f"{s['dir']}: kept {kind} per layer", "layer", f"{kind} kept",
                        values))  # fmt: skip
    if summary.get("sensitivity_kl"):
        fallback = frozenset(summary.get("fallback_sites") or ())
        out.append(bars(f"int8-{s['dir']}", f"{s['dir']}: KL when only this site's activations are INT8 "
                        f"(red: kept in float, {len(fallback)} of {len(summary['sensitivity_kl'])})", "site",
                        "KL (nats/token)", list(summary["sensitivity_kl"].items()), fallback))  # fmt: skip
    history = summary.get("history") or []
    curves = {k: [(h["tokens"], h[k]) for h in history if h.get(k) is not None] for k in ("kl", "loss")}
    if any(curves.values()):
        out.append(lines(f"distill-{s['dir']}", f"{s['dir']}: distillation", "training tokens", "nats/token",
                         curves))  # fmt: skip
    return "".join(out)


STYLE = """body{font:14px system-ui,sans-serif;margin:24px;max-width:1200px;color:#1f2328}
table{border-collapse:collapse;margin:12px 0}td,th{border:1px solid #d0d7de;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}table.meta td{text-align:left}
figure{display:inline-block;margin:8px}.axis{stroke:#57606a}
.path{fill:none;stroke:#8c959f;stroke-dasharray:4 3}.t{font-size:11px;fill:#57606a}.pass{color:#1a7f37}
.fail{color:#d1242f}code{background:#f6f8fa;padding:1px 4px}"""


def render_html(report: dict) -> str:
    meta = [
        ("result", report["result"]), ("recipe", report["recipe"]), ("model", report["model"]),
        ("device", report["device"]), ("started", report.get("started", "-")),
        ("finished", report.get("finished", "-")), ("final artifact", report.get("final_artifact")),
        ("evaluation", f"{report['eval_windows']} x {report['eval_seq_len']} tokens of {report['data_source']}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in (report.get("versions") or {}).items())),
    ]  # fmt: skip
    charts = scatter("size-perplexity", "Perplexity against deployed size", "deployed size (MB)", "perplexity",
                     size_points(report, "perplexity"))  # fmt: skip
    charts += scatter("size-kl", "KL to the unquantized model against deployed size", "deployed size (MB)",
                      "mean KL (nats/token)", size_points(report, "kl"))  # fmt: skip
    details = "".join(_stage_charts(s) for s in report["stages"])
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>dscompress report</title>'
        f'<style>{STYLE}</style></head><body><h1>dscompress run</h1><table class="meta">'
        + "".join(f"<tr><th>{k}</th><td>{escape(str(v))}</td></tr>" for k, v in meta)
        + "</table><h2>Stages</h2>"
        + _stage_table(report)
        + "<p>Deployed size: the bytes a runtime loads (quantized weights at their bits with scales and zeros, the "
        "rest at the model's dtype). Disk: the stage folder, which keeps float weights beside the grid.</p>"
        + f"<h2>Accuracy per byte</h2>{charts}<h2>Gates</h2>{_verdicts(report)}"
        + (f"<h2>Inside the passes</h2>{details}" if details else "")
        + "</body></html>\n"
    )
