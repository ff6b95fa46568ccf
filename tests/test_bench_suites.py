"""The benchmark suites cannot rot: every part answers --help and has a smoke run (--tiny), the store parts' smoke
runs write a result in the harness's schema, the other CPU suites' run where slow tests run (vLLM and CUDA
parts: their arguments only), and the figures in
benchmarks/RESULTS.md and the README's "Measured" block are the ones `python -m benchmarks.report` reads from the
result files."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import harness, report

SUITES = {"store": "benchmarks.store", "transport": "benchmarks.transport", "vllm_cpu": "benchmarks.vllm_cpu",
          "quality": "benchmarks.quality"}
SINGLE = ["benchmarks.gpu_blend", "benchmarks.workloads", "benchmarks.vllm_gpu_rag"]
SCHEMA = {"suite", "command", "machine", "date", "git_sha", "rows"}


def parts() -> list[tuple[str, str]]:
    return [(suite, name) for suite, module in SUITES.items()
            for name in importlib.import_module(module).PARTS]


def part_module(suite: str, name: str):
    return importlib.import_module(f"benchmarks.{importlib.import_module(SUITES[suite]).PARTS[name]}")


def test_results_md_and_readme_agree_with_the_result_files():
    assert report.main(["--check"]) == 0


def test_every_table_cites_files_that_exist_and_records_where_they_came_from():
    for table in report.tables():
        assert table.rows, table.question
        for name in table.sources:
            assert (harness.RESULTS / name).is_file(), name
    assert all(f.suffix in (".json", ".jsonl", ".png") for f in harness.RESULTS.iterdir())


@pytest.mark.parametrize(("suite", "name"), parts())
def test_every_part_parses_its_arguments_and_its_smoke_arguments(suite, name, capsys):
    module = part_module(suite, name)
    assert module.TINY, f"{suite} {name} has no --tiny arguments"
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    assert "usage" in capsys.readouterr().out


@pytest.mark.parametrize("name", SINGLE)
def test_single_suites_parse_their_arguments_and_have_a_smoke_run(name, capsys, monkeypatch):
    module = importlib.import_module(name)
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as done:
        module.main()
    assert done.value.code == 0
    assert "--tiny" in capsys.readouterr().out or module.TINY


def test_tiny_puts_the_smoke_arguments_first_so_later_ones_win():
    assert harness.with_tiny(["--tiny", "--reps", "3"], ["--reps", "1", "--json", "x"]) == \
        ["--reps", "1", "--json", "x", "--reps", "3"]
    assert harness.with_tiny(["--reps", "3"], ["--reps", "1"]) == ["--reps", "3"]


@pytest.mark.parametrize("name", ["tiers", "codecs", "prefetch", "cluster"])
def test_store_smoke_runs_write_the_harness_schema(name, tmp_path, capsys):
    out = tmp_path / f"{name}.json"
    store = importlib.import_module("benchmarks.store")
    assert harness.run_suite(store.PARTS, [name, "--tiny", "--json", str(out)]) == 0
    assert f"== {name}" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert SCHEMA <= set(result) and result["suite"] == f"store_{name}"
    assert result["rows"] and result["machine"]["cpu"]["cores"] == os.cpu_count()


@pytest.mark.slow
@pytest.mark.parametrize("command", [["benchmarks.transport", "peer", "--tiny"],
                                     ["benchmarks.quality", "--tiny"],
                                     ["benchmarks.gpu_blend", "--tiny", "--chunks", "2", "--reps", "1",
                                      "--warmup", "1"]])
def test_cpu_smoke_runs_of_the_slower_suites(command, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", *command], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    written = list((tmp_path / "kvblend-bench-tiny").glob("*.json*"))
    assert written, "the smoke run wrote no result"
