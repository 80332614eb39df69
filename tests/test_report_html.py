"""report.html (issue #22): rendered for real runs, every chart's marks checked against report.json."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import tiny_recipe, write_recipe

import dscompress


class Marks(HTMLParser):
    """chart id -> [(label, x, y)] of its data marks."""

    def __init__(self):
        super().__init__()
        self.charts: dict[str, list] = {}
        self.current = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg":
            self.current = self.charts.setdefault(a["id"], [])
        elif "data-y" in a and self.current is not None:
            self.current.append((a["data-label"], float(a["data-x"]), float(a["data-y"])))


def charts(out: Path) -> dict[str, list]:
    parser = Marks()
    parser.feed((out / "report.html").read_text())
    return parser.charts


def check_size_charts(out: Path, report: dict) -> None:
    found = charts(out)
    for metric, chart in (("perplexity", "size-perplexity"), ("kl", "size-kl")):
        expect = [(s["dir"], s["deployed_bytes"] / 1e6, s["metrics"][metric]) for s in report["stages"]]
        assert _same(found[chart], expect), (chart, found[chart], expect)


def _same(got, expect) -> bool:
    return len(got) == len(expect) and all(
        g[0] == e[0] and g[1] == pytest.approx(e[1]) and g[2] == pytest.approx(e[2])
        for g, e in zip(got, expect, strict=True)
    )


@pytest.mark.slow
def test_real_run_report_charts_match_report_json(tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        """
model: {path: "bundled:smollm2-135m-instruct"}
data: {eval: {samples: 4, seq_len: 256}, calibration: {samples: 4, seq_len: 256}}
stages:
  - name: int8
    rtn: {bits: 8, group_size: -1}
  - name: w4
    gptq: {bits: 4, group_size: 64}
""",
    )
    out = tmp_path / "out"
    dscompress.run(recipe, out)
    report = json.loads((out / "report.json").read_text())
    base, int8, w4 = report["stages"]
    n_params = 134_515_008  # SmolLM2-135M, tied embeddings counted once, float32
    assert base["deployed_bytes"] == 4 * n_params
    assert w4["deployed_bytes"] < int8["deployed_bytes"] < base["deployed_bytes"] < w4["size_bytes"]
    check_size_charts(out, report)
    losses = report["stages"][2]["summary"]["layer_loss"]
    assert len(losses) == 30 and all(v > 0 for v in losses)
    assert [m[2] for m in charts(out)["gptq-2-w4"]] == pytest.approx(losses)
    html = (out / "report.html").read_text()
    assert report["started"] in html and report["finished"] in html and "<script" not in html


def test_prune_and_distill_charts_match_report_json(tmp_path):
    stages = (
        "  - prune: {heads: {ratio: 0.5}}\n"
        "  - distill: {budget: {tokens: 2048}, lr: 0.003, eval_every: 1, checkpoint_every: 100}"
    )
    out = tmp_path / "out"
    dscompress.run(tiny_recipe(tmp_path / "r.yaml", stages=stages), out)
    report = json.loads((out / "report.json").read_text())
    found = charts(out)
    check_size_charts(out, report)
    kept = report["stages"][1]["summary"]["kept"]["heads"]
    assert [m[2] for m in found["prune-heads-1-prune"]] == [len(k) for k in kept]
    history = report["stages"][2]["summary"]["history"]
    curve = [m for m in found["distill-2-distill"] if m[0] == "kl"]
    assert _same(curve, [("kl", h["tokens"], h["kl"]) for h in history]) and len(curve) >= 3


def test_int8_sensitivity_and_fallback_chart_matches_report_json(tmp_path):
    stages = "  - int8: {calibration: minmax, fallback: auto}\n    gate: {kl: {max: 0.00001}, on_fail: skip}"
    out = tmp_path / "out"
    dscompress.run(tiny_recipe(tmp_path / "r.yaml", stages=stages), out)
    report = json.loads((out / "report.json").read_text())
    summary = report["stages"][1]["summary"]
    marks = charts(out)["int8-1-int8"]
    assert {label: y for label, _, y in marks} == pytest.approx(summary["sensitivity_kl"])  # json sorts the keys
    assert len(marks) == summary["sites"] > 0
    html = (out / "report.html").read_text()
    assert f"{len(summary['fallback_sites'])} of {summary['sites']}" in html


def test_gptq_gpu_peaks_per_layer_are_drawn_from_the_summary(tmp_path):
    """On a GPU the gptq pass reports each block's accelerator peak per phase; the report draws the largest. (CI has
    no GPU: a CPU run's report gets the values a GPU run writes, then is rendered again.)"""
    from dscompress.report_html import render_html

    out = tmp_path / "out"
    dscompress.run(tiny_recipe(tmp_path / "r.yaml", stages="  - gptq: {bits: 4, group_size: 32}"), out)
    report = json.loads((out / "report.json").read_text())
    summary = report["stages"][1]["summary"]
    assert summary["layer_peak_accelerator_gib"] == [{}, {}]  # the CPU run: no accelerator
    summary["layer_peak_accelerator_gib"] = [{"load": 1.0, "solve": 5.2, "store": 1.3}, {"load": 22.0, "solve": 39.3}]
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "report.html").write_text(render_html(report))
    marks = charts(tmp_path / "gpu")["gpu-1-gptq"]
    assert [(label, y) for label, _, y in marks] == [("layer 0", 5.2), ("layer 1", 39.3)]
    seconds = charts(out)["time-1-gptq"]  # the time per decoder layer, from the CPU run itself
    assert [y for _, _, y in seconds] == pytest.approx(summary["layer_seconds"]) and len(seconds) == 2
