"""Settings come from kwargs > ACCEL_NVME_* environment variables > the config file > defaults."""

import subprocess
import sys

import pytest
import yaml

from accel_nvme.config import NvmeConfig, config_file_path, load_config, save_config


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in (
        "ACCEL_NVME_CONFIG_FILE",
        "ACCEL_NVME_OFFLOAD_FOLDER",
        "ACCEL_NVME_OFFLOAD_DIR",
        "ACCEL_NVME_PREFETCH_DEPTH",
        "ACCEL_NVME_IO_THREADS",
        "ACCEL_NVME_VERIFY_ON_READ",
    ):
        monkeypatch.delenv(name, raising=False)


def test_defaults_without_file_or_environment():
    assert load_config() == NvmeConfig()


def test_file_lives_in_accelerates_config_folder(tmp_path, monkeypatch):
    assert config_file_path() == tmp_path / "hf" / "accelerate" / "accel_nvme.yaml"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert config_file_path() == tmp_path / "xdg" / "huggingface" / "accelerate" / "accel_nvme.yaml"
    monkeypatch.setenv("ACCEL_NVME_CONFIG_FILE", str(tmp_path / "elsewhere.yaml"))
    assert config_file_path() == tmp_path / "elsewhere.yaml"


def test_precedence_kwargs_over_env_over_file_over_defaults(monkeypatch):
    save_config({"offload_dir": "/from/file", "prefetch_depth": 3, "io_threads": 3, "io_request_bytes": "8MiB"})
    assert load_config() == NvmeConfig(
        offload_dir="/from/file", prefetch_depth=3, io_threads=3, io_request_bytes=8 << 20
    )
    monkeypatch.setenv("ACCEL_NVME_OFFLOAD_FOLDER", "/from/env")
    monkeypatch.setenv("ACCEL_NVME_PREFETCH_DEPTH", "5")
    config = load_config()
    assert (config.offload_dir, config.prefetch_depth, config.io_threads) == ("/from/env", 5, 3)
    config = load_config(offload_dir="/from/kwarg", prefetch_depth=1)
    assert (config.offload_dir, config.prefetch_depth, config.io_threads) == ("/from/kwarg", 1, 3)


def test_bad_values_name_their_origin(monkeypatch):
    monkeypatch.setenv("ACCEL_NVME_VERIFY_ON_READ", "maybe")
    with pytest.raises(ValueError, match=r"ACCEL_NVME_VERIFY_ON_READ.*true or false"):
        load_config()
    monkeypatch.delenv("ACCEL_NVME_VERIFY_ON_READ")
    config_file_path().parent.mkdir(parents=True)
    config_file_path().write_text("prefetch_depht: 2\n")
    with pytest.raises(ValueError, match=r"accel_nvme\.yaml.*unknown settings \['prefetch_depht'\]"):
        load_config()
    config_file_path().write_text("prefetch_depth: 0\n")
    with pytest.raises(ValueError, match=r"prefetch_depth must be an integer >= 1"):
        load_config()
    with pytest.raises(TypeError, match="unknown accel_nvme settings"):
        load_config(prefetch=2)


def test_cli_writes_and_shows_the_file(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "accel_nvme.cli",
        "config",
        "--offload-folder",
        str(tmp_path / "off"),
        "--prefetch-depth",
        "3",
        "--no-verify-on-read",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert str(config_file_path()) in result.stdout
    assert yaml.safe_load(config_file_path().read_text()) == {
        "offload_dir": str(tmp_path / "off"),
        "prefetch_depth": 3,
        "verify_on_read": False,
    }
    shown = subprocess.run(
        [sys.executable, "-m", "accel_nvme.cli", "config", "--show"], capture_output=True, text=True, check=True
    )
    assert "prefetch_depth: 3" in shown.stdout


def test_dispatch_model_honours_environment_and_file(monkeypatch, tmp_path):
    import torch

    import accel_nvme

    save_config({"prefetch_depth": 3})
    monkeypatch.setenv("ACCEL_NVME_OFFLOAD_FOLDER", str(tmp_path / "env-folder"))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).eval()
    expected = model(torch.ones(1, 4)).detach()
    model = accel_nvme.dispatch_model(model, {"0": "nvme", "1": "nvme"})
    assert model[0]._hf_hook.prefetcher.depth == 3
    assert any((tmp_path / "env-folder").iterdir())
    with torch.inference_mode():
        assert torch.equal(model(torch.ones(1, 4)), expected)


def test_an_explicit_nvme_config_wins_over_environment_and_file(monkeypatch):
    from accel_nvme.integrations.kwargs import pop_nvme_config

    save_config({"prefetch_depth": 3})
    monkeypatch.setenv("ACCEL_NVME_IO_THREADS", "7")
    kwargs = {
        "offload_backend": "nvme",
        "offload_folder": "/x",
        "nvme_config": NvmeConfig(prefetch_depth=5),
        "nvme_io_request_bytes": 8 << 20,
    }
    config = pop_nvme_config(kwargs, "Model.from_pretrained")
    assert (config.prefetch_depth, config.io_threads, config.io_request_bytes) == (5, 4, 8 << 20)
    assert kwargs == {"offload_folder": "/x"}
    with pytest.raises(TypeError, match="nvme_prefetch"):
        pop_nvme_config({"offload_backend": "nvme", "offload_folder": "/x", "nvme_prefetch": 2}, "Model")


def test_request_size_is_capped():
    with pytest.raises(ValueError, match="between 4 KiB and 1 GiB"):
        NvmeConfig(io_request_bytes=2 << 30)
