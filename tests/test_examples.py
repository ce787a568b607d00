"""Each script in examples/ runs with its defaults (tiny random models built from configs) and reports exact outputs."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from accel_nvme.store import FOLDER_PREFIX

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT = 240


@pytest.fixture
def env(tmp_path):
    """The environment of an example: no hub access, and accelerate/accel_nvme config files kept out of the way."""
    env = dict(os.environ)
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for name in ("ACCEL_NVME_OFFLOAD_FOLDER", "ACCEL_NVME_OFFLOAD_DIR", "ACCEL_NVME_CONFIG_FILE"):
        env.pop(name, None)
    return env


def run(command: list[str], env: dict[str, str], cwd: Path) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=cwd)
    assert result.returncode == 0, f"{command} exited {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}"
    return result.stdout


def weight_folders(offload: Path) -> list[Path]:
    return [p for p in offload.iterdir() if p.name.startswith(FOLDER_PREFIX)]


def test_generate_llm(tmp_path, env):
    offload = tmp_path / "offload"
    out = run(
        [sys.executable, str(EXAMPLES / "generate_llm.py"), "--offload-folder", str(offload), "--max-new-tokens", "6"],
        env,
        tmp_path,
    )
    assert "identical to in-RAM: True" in out
    assert "generated token ids: [1, 17, 42, 99, 7, 3," in out
    assert "on nvme: " in out and "MB read" in out
    assert len(weight_folders(offload)) == 1


def test_diffusers_pipeline(tmp_path, env):
    pytest.importorskip("diffusers")
    offload = tmp_path / "offload"
    out = run(
        [sys.executable, str(EXAMPLES / "diffusers_pipeline.py"), "--offload-folder", str(offload)], env, tmp_path
    )
    assert "identical to in-RAM: True" in out
    assert "components on nvme: ['unet']" in out
    assert len(weight_folders(offload)) == 1


def test_manual_device_map(tmp_path, env):
    offload = tmp_path / "offload"
    out = run([sys.executable, str(EXAMPLES / "manual_device_map.py"), "--offload-folder", str(offload)], env, tmp_path)
    assert out.count("torch.equal to the model without offload: True") == 3
    assert "identical to in-RAM: True" in out
    assert len(weight_folders(offload)) == 1


def test_multiprocess_launch_two_processes_share_one_folder(tmp_path, env):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate CLI is not installed")
    offload = tmp_path / "offload"
    # --multi_gpu makes accelerate start --num_processes processes (through torchrun); on a machine without GPUs the
    # script runs them on the CPU with gloo. (--cpu alone starts a single process in accelerate 1.x.)
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    command += [str(EXAMPLES / "multiprocess_launch.py"), "--offload-folder", str(offload)]
    out = run(command, env, tmp_path)
    assert "rank 0/2: identical to in-RAM: True" in out
    assert "rank 1/2: identical to in-RAM: True" in out
    assert "one shared set of group files: True" in out
    assert len(weight_folders(offload)) == 1
    assert not [p for p in offload.iterdir() if ".tmp-" in p.name]
