"""The accel-nvme inspect / verify / clean commands and their exit codes, run as a user would."""

import subprocess
import sys

import torch

import accel_nvme


def cli(*args):
    return subprocess.run([sys.executable, "-m", "accel_nvme.cli", *args], capture_output=True, text=True, timeout=120)


def test_inspect_verify_clean_exit_codes(tmp_path, offload_dir):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    accel_nvme.dispatch_model(model, {"0": "nvme", "1": "nvme"}, offload_dir=offload_dir)
    assert cli("inspect", str(offload_dir)).returncode == 0
    assert cli("verify", str(offload_dir)).returncode == 0
    (group,) = [p for p in offload_dir.rglob("group-00001.safetensors")]
    data = bytearray(group.read_bytes())
    data[-1] ^= 1
    group.write_bytes(bytes(data))
    result = cli("verify", str(offload_dir))
    assert result.returncode == 1 and str(group) in result.stdout + result.stderr
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    assert cli("clean", str(foreign)).returncode == 2
    assert (foreign / "cat.jpg").exists()
    (offload_dir / "notes.txt").write_text("mine")
    assert cli("clean", str(offload_dir)).returncode == 0
    assert [p.name for p in offload_dir.iterdir()] == ["notes.txt"]
    assert cli("inspect", str(foreign)).returncode == 1


def test_inspect_shows_which_groups_a_resident_budget_keeps(offload_dir):
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    accel_nvme.dispatch_model(model, {str(i): "nvme" for i in range(4)}, offload_dir=offload_dir)
    result = cli("inspect", "--resident-budget", "40KiB", str(offload_dir))
    assert result.returncode == 0
    assert result.stdout.count("resident") == 2 and result.stdout.count("streamed") >= 2
