"""Several processes loading the same model into one offload folder: one writes, the others wait and reuse."""

import subprocess
import sys
import textwrap

import torch
from helpers import tiny_llama

from accel_nvme.store import FOLDER_PREFIX

WORKER = textwrap.dedent(
    """
    import sys, torch, accel_nvme
    from transformers import AutoModelForCausalLM
    checkpoint, offload, expected = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map="auto", max_memory={"cpu": "20KB"},
                                                 offload_backend="nvme", offload_folder=offload)
    ids = torch.arange(3, 11).reshape(1, 8)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(out, torch.load(expected)), "wrong tokens"
    print("OK")
    """
)


def test_two_processes_loading_into_one_folder_both_get_correct_outputs(tmp_path):
    model = tiny_llama(hidden=128, layers=6)
    model.save_pretrained(tmp_path / "ckpt")
    ids = torch.arange(3, 11).reshape(1, 8)
    with torch.inference_mode():
        torch.save(
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False),
            tmp_path / "expected.pt",
        )
    args = [str(tmp_path / "ckpt"), str(tmp_path / "offload"), str(tmp_path / "expected.pt")]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [worker.communicate(timeout=300) for worker in workers]
    for worker, (out, err) in zip(workers, results, strict=True):
        assert worker.returncode == 0, err
        assert out.strip().endswith("OK")
    folders = [p for p in (tmp_path / "offload").iterdir() if p.name.startswith(FOLDER_PREFIX)]
    assert len(folders) == 1
    assert not [p for p in (tmp_path / "offload").iterdir() if ".tmp-" in p.name]
