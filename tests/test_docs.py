"""Every Python code block in README.md and docs/ runs as shown (with placeholder paths pointed at tiny models)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
BLOCKS = [(doc, i, code) for doc in DOCUMENTS for i, code in enumerate(BLOCK.findall(doc.read_text()))]


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("docs")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(root / "llama")
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(root / "pipeline")
    return {"path/to/llama": str(root / "llama"), "path/to/pipeline": str(root / "pipeline")}


def test_there_are_code_blocks_to_check():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("doc, index, code", BLOCKS, ids=[f"{d.name}-{i}" for d, i, _ in BLOCKS])
def test_code_block_runs(doc, index, code, placeholders, tmp_path):
    for placeholder, path in {**placeholders, "/mnt/nvme/offload": str(tmp_path / "offload")}.items():
        code = code.replace(placeholder, path)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{doc.name} block {index} failed:\n{result.stderr[-3000:]}"
