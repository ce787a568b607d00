"""Every Python code block in README.md and docs/ runs as shown (with placeholder paths pointed at tiny models)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_ddpm_pipeline, tiny_llama

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
BLOCKS = [(doc, i, code) for doc in DOCUMENTS for i, code in enumerate(BLOCK.findall(doc.read_text()))]


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    tiny_llama().save_pretrained(root / "llama")
    tiny_ddpm_pipeline().save_pretrained(root / "pipeline")
    return {"path/to/llama": str(root / "llama"), "path/to/pipeline": str(root / "pipeline")}


def test_there_are_code_blocks_to_check():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("doc, index, code", BLOCKS, ids=[f"{d.name}-{i}" for d, i, _ in BLOCKS])
def test_code_block_runs(doc, index, code, placeholders, tmp_path):
    for placeholder, path in {**placeholders, "/mnt/nvme/offload": str(tmp_path / "offload")}.items():
        code = code.replace(placeholder, path)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{doc.name} block {index} failed:\n{result.stderr[-3000:]}"
