"""Streaming straight from the checkpoint (issue 23): no group files, reads of the checkpoint's byte ranges, tensors
moved to 64-byte alignment, the checkpoint's identity and range digests checked, and the ``copy`` rule."""

import json
import struct

import pytest
import torch
from accelerate import init_empty_weights
from helpers import reference, tiny_llama
from test_integrity import rewrite_in_place_keeping_mtime
from torch import nn
from transformers import AutoModelForCausalLM

import accel_nvme
from accel_nvme import NvmeConfig
from accel_nvme.format import GroupFileError
from accel_nvme.maintenance import format_inspect, inspect_folder, verify_folder
from accel_nvme.sources import DIGESTS_NAME
from accel_nvme.store import FOLDER_PREFIX, manifest_digest

IDS = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
WIDTH = 12  # 12 x 12 fp32 weights: 576 bytes, so each tensor's offset mod 64 is set by the padding before it


def write_misaligned(path, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """A safetensors file where tensor ``i`` starts at file offset ``i`` mod 64 (U8 padding entries in between)."""
    header, chunks, cursor = {}, [], 0
    header_bytes = 16 * 1024 - 8  # the header is padded to this: data starts at 16384, a multiple of 64
    offsets = {}
    for i, (name, tensor) in enumerate(tensors.items()):
        pad = (i - (8 + header_bytes + cursor)) % 64
        if pad:
            header[f"pad{i}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [cursor, cursor + pad]}
            chunks.append(b"\0" * pad)
            cursor += pad
        data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [cursor, cursor + len(data)]}
        offsets[name] = 8 + header_bytes + cursor
        chunks.append(data)
        cursor += len(data)
    raw = json.dumps(header).encode()
    assert len(raw) <= header_bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", header_bytes) + raw.ljust(header_bytes) + b"".join(chunks))
    return offsets


class Chain(nn.Module):
    def __init__(self, depth: int = 64):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class AlignmentProbe:
    """Records ``data_ptr() % 64`` of every Linear weight when its forward runs."""

    def __init__(self, model):
        self.seen = []
        for layer in model.layers:
            layer.register_forward_pre_hook(lambda module, args: self.seen.append(module.weight.data_ptr() % 64))


@pytest.mark.parametrize("group_bytes", [0, 1 << 20], ids=["group-per-layer", "one-group"])
def test_tensors_at_every_misalignment_mod_64_are_moved_aligned_and_exact(tmp_path, offload_dir, group_bytes):
    torch.manual_seed(0)
    in_ram = Chain().eval()
    path = tmp_path / "model.safetensors"
    offsets = write_misaligned(path, {f"layers.{i}.weight": layer.weight.data for i, layer in enumerate(in_ram.layers)})
    assert sorted(offset % 64 for offset in offsets.values()) == list(range(64))
    with init_empty_weights():
        streamed = Chain().eval()
    index = {name: {"safetensors_file": str(path), "weight_name": name, "dtype": "float32"} for name in offsets}
    config = NvmeConfig(offload_dir=offload_dir, group_bytes=group_bytes, copy=False)
    streamed = accel_nvme.dispatch_model(streamed, {"layers": "nvme"}, offload_index=index, config=config)
    probe = AlignmentProbe(streamed)
    x = torch.randn(1, WIDTH, generator=torch.Generator().manual_seed(2))
    for _ in range(2):  # the second forward reads every group again into reused buffers
        assert torch.equal(reference(streamed, x), reference(in_ram, x))
    assert probe.seen == [0] * 128
    (folder,) = offload_dir.glob(f"{FOLDER_PREFIX}*")
    assert sorted(p.name for p in folder.iterdir()) == [DIGESTS_NAME, "manifest.json"]


def saved_llama(tmp_path, seed=0, shard="24KB"):
    path = tmp_path / f"llama{seed}"
    tiny_llama(seed=seed, hidden=32).save_pretrained(path, max_shard_size=shard)
    return path


def load(path, offload, **nvme):
    return AutoModelForCausalLM.from_pretrained(
        path, device_map="auto", max_memory={"cpu": "20KB"}, offload_backend="nvme", offload_folder=str(offload), **nvme
    )


def logits(model):
    return reference(model, IDS).logits


@pytest.mark.parametrize("copy", [False, True])
def test_sharded_checkpoint_with_blocks_split_across_shards(tmp_path, offload_dir, copy):
    path = saved_llama(tmp_path)
    expected = logits(tiny_llama(seed=0, hidden=32))
    model = load(path, offload_dir, nvme_copy=copy)
    assert torch.equal(logits(model), expected)
    assert torch.equal(logits(model), expected)
    sources = model.model.layers[0]._hf_hook.prefetcher.sources
    files = [{segment.path for segment in source.segments} for source in sources]
    if copy:
        assert all(len(f) == 1 and f.pop().name.startswith("group-") for f in files)
    else:
        assert max(len(f) for f in files) > 1, "no block spans two shards: make the shards smaller"
        assert all(p.parent == path for f in files for p in f)
    report = inspect_folder(offload_dir)
    (folder,) = report["models"]
    assert {g["source"] for g in folder["groups"]} == {"group file" if copy else "checkpoint"}
    checkpoint_bytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    if not copy:
        assert folder["disk_bytes"] <= 32768 < checkpoint_bytes / 4, folder["disk_bytes"]  # manifest and digests
        assert "checkpoint" in format_inspect(report)
        assert verify_folder(offload_dir) == []


def test_reuse_of_an_in_place_folder_checks_the_recorded_range_digests(tmp_path, offload_dir):
    path = saved_llama(tmp_path)
    expected = logits(tiny_llama(seed=0, hidden=32))
    assert torch.equal(logits(load(path, offload_dir)), expected)
    (folder,) = offload_dir.glob(f"{FOLDER_PREFIX}*")
    digests = json.loads((folder / DIGESTS_NAME).read_text())
    assert digests["ranges"], "no range digest was recorded on the first forward"
    assert torch.equal(logits(load(path, offload_dir)), expected)  # reused, recorded digests match
    key = sorted(digests["ranges"])[0]
    digests["ranges"][key] = "0" * 32
    digests["digest"] = manifest_digest(digests)
    (folder / DIGESTS_NAME).write_text(json.dumps(digests))
    with pytest.raises(GroupFileError, match="do not match the digest recorded on their first read"):
        logits(load(path, offload_dir))
    problems = verify_folder(offload_dir)
    assert len(problems) == 1 and "the checkpoint changed" in problems[0].message


def test_checkpoint_rewritten_in_place_while_streaming_is_refused(tmp_path, offload_dir):
    old, new = saved_llama(tmp_path, seed=0, shard="1GB"), saved_llama(tmp_path, seed=1, shard="1GB")
    model = load(old, offload_dir, nvme_prefetch_depth=1)
    assert torch.equal(logits(model), logits(tiny_llama(seed=0, hidden=32)))
    rewrite_in_place_keeping_mtime(old / "model.safetensors", (new / "model.safetensors").read_bytes())
    with pytest.raises(GroupFileError, match="the checkpoint changed while group"):
        logits(model)


def test_checkpoint_rewritten_in_place_is_planned_again(tmp_path, offload_dir):
    old, new = saved_llama(tmp_path, seed=0, shard="1GB"), saved_llama(tmp_path, seed=1, shard="1GB")
    assert torch.equal(logits(load(old, offload_dir)), logits(tiny_llama(seed=0, hidden=32)))
    rewrite_in_place_keeping_mtime(old / "model.safetensors", (new / "model.safetensors").read_bytes())
    assert torch.equal(logits(load(old, offload_dir)), logits(tiny_llama(seed=1, hidden=32)))
    folders = sorted(p for p in offload_dir.iterdir() if p.name.startswith(FOLDER_PREFIX))
    assert len(folders) == 2  # a new fingerprint: the checkpoint's ctime changed


def test_copy_rule_converted_dtypes_and_other_filesystems_copy(tmp_path, offload_dir, ramfs):
    path = saved_llama(tmp_path, shard="1GB")
    load(path, offload_dir, dtype=torch.bfloat16)  # stored F32, computed as bf16: copied
    load(path, ramfs / "offload")  # another filesystem, copy="auto": copied
    load(path, ramfs / "forced", nvme_copy=False)  # forced in place
    sources = [
        {g["source"] for g in inspect_folder(folder)["models"][0]["groups"]}
        for folder in (offload_dir, ramfs / "offload", ramfs / "forced")
    ]
    assert sources == [{"group file"}, {"group file"}, {"checkpoint"}]


def test_copy_setting_is_checked_and_read_from_the_environment(monkeypatch):
    with pytest.raises(ValueError, match=r"NvmeConfig\.copy must be one of"):
        NvmeConfig(copy="sometimes")
    monkeypatch.setenv("ACCEL_NVME_COPY", "true")
    assert accel_nvme.config.load_config().copy is True
    monkeypatch.setenv("ACCEL_NVME_COPY", "auto")
    assert accel_nvme.config.load_config().copy == "auto"
