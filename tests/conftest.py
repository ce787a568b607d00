import gc
import subprocess
import uuid

import pytest
import torch

import accel_nvme  # noqa: F401  (installs the "nvme" tier into accelerate)


@pytest.fixture
def offload_dir(tmp_path):
    path = tmp_path / "offload"
    path.mkdir()
    return path


@pytest.fixture
def ramfs(tmp_path):
    """A mounted ramfs, a filesystem that refuses O_DIRECT (needs root)."""
    mountpoint = tmp_path / f"ramfs-{uuid.uuid4().hex[:8]}"
    mountpoint.mkdir()
    result = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mountpoint)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount ramfs (needs root): {result.stderr.strip()}")
    yield mountpoint
    gc.collect()  # readers of models left alive by a test close their files when collected
    subprocess.run(["umount", str(mountpoint)], check=True)


@pytest.fixture(autouse=True)
def grad_modes_unchanged():
    """A test leaves the thread's grad and inference modes as it found them: a leak fails that test, and the modes are
    put back so that the tests after it compute as they would (inference mode changes which kernels torch picks)."""
    before = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    yield
    after = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    if after != before:
        if after[1] != before[1]:
            _KEPT_GUARDS.append(torch._C._InferenceMode(before[1]))  # a guard lives as long as it is referenced
        torch.set_grad_enabled(before[0])
        pytest.fail(f"(grad enabled, inference mode) was {before} before the test, {after} after it")


_KEPT_GUARDS: list = []
