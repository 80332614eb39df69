"""Run reports: report.json (machine), report.md (people), junit.xml (CI systems), and a terminal table."""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from rich.console import Console
from rich.table import Table

from dscompress.atomic import atomic_write_json, atomic_write_text


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_reports(out: Path, report: dict) -> None:
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "junit.xml", junit_xml(report))
    atomic_write_text(out / "report.md", markdown(report))


def junit_xml(report: dict) -> str:
    """One test case per gate check; a failed check is a <failure> with the sentence that explains it."""
    cases, failures = [], 0
    for stage in report["stages"]:
        for v in stage.get("verdicts", []):
            name = quoteattr(f"{stage['dir']}: {v['metric']} {v['op']} {v['threshold']:g}")
            seconds = stage.get("timings", {}).get("total_s", 0.0)
            body = ""
            if not v["passed"]:
                failures += 1
                body = f"<failure message={quoteattr(v['detail'])}>{escape(v['detail'])}</failure>"
            cases.append(
                f'    <testcase classname="dscompress.gates" name={name} time="{seconds:.3f}">{body}</testcase>'
            )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<testsuites><testsuite name="dscompress" tests="{len(cases)}" failures="{failures}">\n'
        + "\n".join(cases)
        + "\n</testsuite></testsuites>\n"
    )


COLUMNS = ("stage", "status", "ppl", "KL", "top-1", "size MB", "time s")


def _rows(report: dict):
    for s in report["stages"]:
        m = s.get("metrics", {})
        status = s["status"] + (" (reused)" if s.get("reused") else "")
        yield (
            s["dir"], status, _fmt(m.get("perplexity"), ".3f"), _fmt(m.get("kl"), ".5f"),
            _fmt(m.get("top1"), ".4f"), _fmt(s.get("size_bytes", 0) / 1e6, ".1f"),
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
                console.print(f"[red]gate failed[/red] {s['dir']}: {v['detail']}")
