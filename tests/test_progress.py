"""Progress a CI log can show (issue #22): without a terminal, timestamped lines per layer with an ETA."""

import re

from conftest import cli, tiny_recipe


def test_piped_run_prints_a_progress_line_per_gptq_layer(tmp_path):
    recipe = tiny_recipe(tmp_path / "r.yaml", stages="  - gptq: {bits: 4, group_size: 32}")
    result = cli("run", str(recipe), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    layers = [re.match(r"\d\d:\d\d:\d\d gptq int4 g32: (\d+)/(\d+) \(\d+ s, ETA \d+ s\)$", line)
              for line in result.stderr.splitlines()]  # fmt: skip
    found = [(int(m[1]), int(m[2])) for m in layers if m]
    assert found and [i for i, _ in found] == list(range(1, found[0][1] + 1)), result.stderr
    assert re.search(r"\d\d:\d\d:\d\d loading the baseline: done in", result.stderr)


def test_quiet_run_prints_only_the_result(tmp_path):
    result = cli("run", str(tiny_recipe(tmp_path / "r.yaml")), "--out", str(tmp_path / "out"), "-q")
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    assert result.stdout.startswith("final artifact:")


def test_piped_output_is_not_hard_wrapped(tmp_path):
    deep = tmp_path / ("a-rather-long-folder-name-" * 3)
    deep.mkdir()
    recipe = tiny_recipe(deep / "recipe-with-a-long-name.yaml", model="/no/such/checkpoint/anywhere/at/all")
    result = cli("validate", str(recipe))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and len(errors[0]) > 100 and errors[0].rstrip().endswith("`dscompress models`)")
