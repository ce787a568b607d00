"""The README's main command installs what `accel-nvme bench` imports, and scripts/readme_bench.py (what CI runs) reads
that command from the README and fails on a mode that did not run or an output that is not exact."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from accel_nvme import cli

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("readme_bench", ROOT / "scripts" / "readme_bench.py")
readme_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_bench)


def test_the_main_command_installs_what_the_bench_imports():
    command = readme_bench.readme_main_command(ROOT / "README.md")
    assert command.startswith("python3 -m venv .venv && ") and command.endswith(".venv/bin/accel-nvme bench")
    (extras,) = re.findall(r'-e "\.\[([a-z,]+)\]"', command)
    pyproject = (ROOT / "pyproject.toml").read_text()  # no tomllib on Python 3.10
    declared = {
        name: re.findall(r'"([A-Za-z0-9_.-]+)', deps)
        for name, deps in re.findall(r"^(\w+) = \[(.*?)\]", pyproject, re.M | re.S)
    }
    installed = {package for extra in extras.split(",") for package in declared[extra]}
    assert {"transformers", "diffusers", "matplotlib"} <= installed  # the Llama, diffusers_disk, the PNG


def test_ci_runs_the_main_command_in_its_own_venv_with_quick(tmp_path):
    command = readme_bench.ci_command(readme_bench.readme_main_command(ROOT / "README.md"), tmp_path / "r.json", False)
    assert ".venv/" not in command and command.count(".venv-bench") == 3
    assert command.endswith(f"accel-nvme bench --quick --json {tmp_path / 'r.json'}")


def _report(*modes):
    return {"modes": list(modes)}


def _mode(name, status="ok", exact=(True,)):
    return {"mode": name, "status": status, "batches": [{"batch": 4, "exact": e, "max_abs_diff": 0.5} for e in exact]}


def test_a_bench_report_with_a_failed_mode_or_an_inexact_output_is_a_problem():
    assert readme_bench.problems(_report(_mode("ram", exact=(None,)), _mode("nvme"))) == []
    assert readme_bench.problems(_report(_mode("ram", exact=(None,)), _mode("nvme", exact=(True, False)))) == [
        "nvme batch 4: not exact (max diff 0.5)"
    ]
    failed = {"mode": "nvme", "status": "failed", "error": "exit status 1"}
    assert readme_bench.problems(_report(_mode("ram", exact=(None,)), _mode("accelerate_disk"), failed)) == [
        "nvme: failed: exit status 1"
    ]
    assert readme_bench.problems(_report(_mode("ram", exact=(None,)))) == [
        "no output was compared with the in-RAM model"
    ]


def test_without_matplotlib_the_default_plot_is_skipped_with_a_hint(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    parser = cli.build_parser()
    assert cli._plot_path(parser.parse_args(["bench"]), parser) is None
    assert "pip install 'accel-nvme[plot]'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli._plot_path(parser.parse_args(["bench", "--plot", "mine.png"]), parser)
    assert exit_info.value.code == 2  # asked for by name: refused before the bench runs
    assert cli._plot_path(parser.parse_args(["bench", "--no-plot"]), parser) is None


def test_quick_runs_the_same_path_on_a_small_model(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.bench, "run", lambda config, modes, **kw: calls.append((config, modes, kw)) or {})
    monkeypatch.setattr(cli.bench, "format_report", lambda report: "")
    cli.main(["bench", "--quick", "--no-plot"])
    ((config, modes, options),) = calls
    assert config.batches == (4, 16) and config.linear_bytes < 60_000_000
    assert options["from_pretrained"] is True and options["free_ram"] >= cli.bench.MIN_FREE_RAM_BYTES
    assert options["warm_forwards"] == 1 and tuple(modes) == cli.bench.MODES
