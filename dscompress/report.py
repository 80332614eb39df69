"""Run reports: report.json (machine), report.md and report.html (people, with charts), junit.xml (CI systems),
and a terminal table."""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from rich.console import Console
from rich.markup import escape as escape_markup
from rich.table import Table

from dscompress.atomic import atomic_write_json, atomic_write_text
from dscompress.report_html import render_html


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_reports(out: Path, report: dict) -> None:
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "junit.xml", junit_xml(report))
    atomic_write_text(out / "report.md", markdown(report))
    atomic_write_text(out / "report.html", render_html(report))


_CHECK_NAMES = {  # the threshold with its unit: a perplexity limit is a percent increase, KL is nats per token
    "perplexity": "perplexity increase {op} {threshold:g}%",
    "kl": "mean KL {op} {threshold:g} nats/token",
    "top1": "top-1 agreement {op} {threshold:g}",
}


def _check_name(stage: dict, v: dict) -> str:
    template = _CHECK_NAMES.get(v["metric"], "{metric} {op} {threshold:g}")
    return f"{stage['dir']}: " + template.format(metric=v["metric"], op=v["op"], threshold=v["threshold"])


def junit_xml(report: dict) -> str:
    """One test case per gate check, each with its share of its stage's time. A failed check of a stage that
    stopped the run is a <failure>; of a stage dropped by `on_fail: skip` (the run still exits 0) a <skipped>;
    a stage that was interrupted or crashed is one <error> case, so the verdicts always match the exit code."""
    cases, counts, total = [], {"failures": 0, "skipped": 0, "errors": 0}, 0.0
    for stage in report["stages"]:
        verdicts = stage.get("verdicts", [])
        seconds = stage.get("timings", {}).get("total_s", 0.0)
        for v in verdicts:
            body, share = "", seconds / len(verdicts)
            if not v["passed"]:
                kind = "skipped" if stage.get("status") == "skipped" else "failure"
                counts["skipped" if kind == "skipped" else "failures"] += 1
                body = f"<{kind} message={quoteattr(v['detail'])}>{escape(v['detail'])}</{kind}>"
            cases.append(_case(_check_name(stage, v), share, body))
            total += share
        if stage.get("status") == "pending" and report.get("result") in ("interrupted", "error"):
            message = report.get("message") or report["result"]
            counts["errors"] += 1
            body = f"<error message={quoteattr(message)}>{escape(message)}</error>"
            cases.append(_case(f"{stage['dir']}: completes", 0.0, body))
    stamp = f' timestamp="{report["started"]}"' if report.get("started") else ""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<testsuites><testsuite name="dscompress" tests="{len(cases)}" failures="{counts["failures"]}" '
        f'errors="{counts["errors"]}" skipped="{counts["skipped"]}" time="{total:.3f}"{stamp}>\n'
        + "\n".join(cases)
        + "\n</testsuite></testsuites>\n"
    )


def _case(name: str, seconds: float, body: str) -> str:
    return f'    <testcase classname="dscompress.gates" name={quoteattr(name)} time="{seconds:.3f}">{body}</testcase>'


COLUMNS = ("stage", "status", "ppl", "KL", "top-1", "deployed MB", "disk MB", "time s")


def _rows(report: dict):
    for s in report["stages"]:
        m = s.get("metrics", {})
        status = s["status"] + (" (reused)" if s.get("reused") else "")
        yield (
            s["dir"], status, _fmt(m.get("perplexity"), ".3f"), _fmt(m.get("kl"), ".5f"),
            _fmt(m.get("top1"), ".4f"), _fmt((s.get("deployed_bytes") or 0) / 1e6, ".1f"),
            _fmt(s.get("size_bytes", 0) / 1e6, ".1f"),
            _fmt(s.get("timings", {}).get("total_s"), ".1f"),
        )  # fmt: skip


def markdown(report: dict) -> str:
    lines = [
        f"# dscompress run: {report['recipe']}",
        "",
        f"- result: **{report['result']}**; final artifact: `{report.get('final_artifact')}`",
        f"- model: `{report['model']}`; device: {report['device']}; seed: {report['seed']}",
        f"- evaluation: {report['eval_windows']} windows x {report['eval_seq_len']} tokens "
        f"of `{report['data_source']}`",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(report)]
    gate_lines = [
        f"- `{s['dir']}` {'PASS' if v['passed'] else 'FAIL'}: {v['detail']}"
        for s in report["stages"]
        for v in s.get("verdicts", [])
    ]
    if gate_lines:
        lines += ["", "## Gates", "", *gate_lines]
    if report.get("message"):
        lines += ["", f"**{report['message']}**"]
    return "\n".join(lines) + "\n"


def print_table(console: Console, report: dict) -> None:
    table = Table(title=f"dscompress: {report['result']}")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("stage", "status") else "right")
    for row in _rows(report):
        table.add_row(*row)
    console.print(table)
    for s in report["stages"]:
        for v in s.get("verdicts", []):
            if not v["passed"]:
                console.print(f"[red]gate failed[/red] {s['dir']}: {escape_markup(v['detail'])}")
