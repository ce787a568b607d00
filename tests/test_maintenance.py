import fcntl
import json
import logging
import os

import pytest
import torch
from helpers import cached_bytes
from torch import nn

import accel_nvme
from accel_nvme.maintenance import clean_folder, format_inspect, inspect_folder, run_command, verify_folder
from accel_nvme.store import FOLDER_PREFIX, GroupPlan, materialize

NVME_MAP = {"0": "nvme", "1": "nvme", "2": "nvme"}
LINEAR_BYTES = (8 * 8 + 8) * 4


def dispatched(offload_dir, seed=0, width=8):
    """Offload a 3-layer Linear model to ``offload_dir``; return its model folder."""
    torch.manual_seed(seed)
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(3)))
    accel_nvme.dispatch_model(model, NVME_MAP, offload_dir=offload_dir, main_device="cpu")
    (folder,) = [p for p in offload_dir.iterdir() if p.name.startswith(FOLDER_PREFIX)]
    return folder


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def group_manifest(folder, index):
    return json.loads((folder / "manifest.json").read_text())["groups"][index]


def test_inspect_shows_groups_sizes_dtypes_and_fingerprint(offload_dir, capsys):
    folder = dispatched(offload_dir)
    report = inspect_folder(offload_dir)
    assert report["kind"] == "offload folder"
    (model,) = report["models"]
    assert model["fingerprint"] == folder.name.removeprefix(FOLDER_PREFIX)
    assert model["version"] == 2 and model["complete"] and model["foreign"] == []
    assert [g["file"] for g in model["groups"]] == [f"group-0000{i}.safetensors" for i in range(3)]
    assert [(g["data_bytes"], g["dtypes"], g["tensors"]) for g in model["groups"]] == [(LINEAR_BYTES, ["F32"], 2)] * 3
    assert model["total_bytes"] == 3 * LINEAR_BYTES
    assert model["disk_bytes"] >= 3 * LINEAR_BYTES
    text = format_inspect(report)
    assert model["fingerprint"] in text and "group-00002.safetensors" in text and "F32" in text
    assert f"{LINEAR_BYTES:,}" in text and "complete" in text
    assert run_command("inspect", offload_dir) == 0
    assert model["fingerprint"] in capsys.readouterr().out


def test_inspect_one_model_folder_lists_every_dtype(offload_dir, monkeypatch):
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(4, 4, generator=g).bfloat16(), "b": torch.randn(4, generator=g)}
    manifest = materialize(offload_dir, [GroupPlan("block", tensors, {"w": "w", "b": "b"})])
    monkeypatch.chdir(manifest.folder)
    report = inspect_folder(".")
    assert report["kind"] == "model folder" and report["path"] == str(manifest.folder)
    (group,) = report["models"][0]["groups"]
    # b (16 bytes), 48 bytes of padding, then w at 64
    assert (group["name"], group["dtypes"], group["tensors"], group["data_bytes"]) == ("block", ["BF16", "F32"], 2, 96)
    assert [e["kind"] for e in report["leftovers"]] == ["lock"]


def test_inspect_reports_leftovers_foreign_entries_and_damage(offload_dir):
    folder = dispatched(offload_dir)
    (offload_dir / f".{folder.name}.tmp-4242").mkdir()
    (offload_dir / "notes.txt").write_text("mine")
    (folder / "manifest.json").unlink()
    report = inspect_folder(offload_dir)
    assert sorted(e["kind"] for e in report["leftovers"]) == ["lock", "temporary"]
    assert report["foreign"] == [str(offload_dir / "notes.txt")]
    (model,) = report["models"]
    assert not model["complete"] and "no manifest.json" in model["problem"]
    assert len(model["groups"]) == 3
    text = format_inspect(report)
    assert "NOT USABLE" in text and "notes.txt" in text and ".tmp-4242" in text


def test_inspect_of_a_folder_with_nothing_of_ours_exits_1(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert run_command("inspect", tmp_path) == 1
    assert "0 model folder(s)" in capsys.readouterr().out


def test_verify_passes_on_a_good_folder(offload_dir, capsys):
    folder = dispatched(offload_dir)
    assert verify_folder(offload_dir) == []
    assert verify_folder(folder) == []
    assert run_command("verify", offload_dir) == 0
    assert "every group file is sound" in capsys.readouterr().out


def test_verify_names_the_file_with_a_flipped_data_byte(offload_dir, capsys):
    folder = dispatched(offload_dir)
    victim = folder / "group-00001.safetensors"
    flip_byte(victim, group_manifest(folder, 1)["data_offset"] + 5)
    (problem,) = verify_folder(offload_dir)
    assert problem.file == victim and "digest" in problem.message
    assert run_command("verify", offload_dir) == 1
    assert str(victim) in capsys.readouterr().out


def test_verify_finds_a_truncated_file(offload_dir):
    folder = dispatched(offload_dir)
    victim = folder / "group-00002.safetensors"
    victim.write_bytes(victim.read_bytes()[:-4])
    (problem,) = verify_folder(offload_dir)
    assert problem.file == victim and "truncated" in problem.message


def test_verify_finds_a_missing_file(offload_dir):
    folder = dispatched(offload_dir)
    (folder / "group-00000.safetensors").unlink()
    (problem,) = verify_folder(folder)
    assert problem.file == folder / "group-00000.safetensors" and "missing" in problem.message


def test_verify_finds_a_manifest_that_is_not_json(offload_dir):
    folder = dispatched(offload_dir)
    (folder / "manifest.json").write_text("{oops")
    (problem,) = verify_folder(offload_dir)
    assert problem.file == folder / "manifest.json" and "not valid JSON" in problem.message


def test_verify_finds_group_files_without_a_manifest(offload_dir):
    folder = dispatched(offload_dir)
    (folder / "manifest.json").unlink()
    (problem,) = verify_folder(offload_dir)
    assert problem.file == folder / "manifest.json" and "3 group file(s)" in problem.message


def test_verify_of_a_folder_with_nothing_of_ours_fails(tmp_path):
    (problem,) = verify_folder(tmp_path)
    assert problem.file == tmp_path and "no accel_nvme model folder" in problem.message


def test_verify_leaves_no_page_cache_behind(offload_dir):
    folder = dispatched(offload_dir, width=512)
    assert verify_folder(folder) == []
    for path in folder.glob("group-*.safetensors"):
        resident = cached_bytes(path)
        assert resident <= 64 * 4096, f"{resident} bytes of {path} still cached"


def test_clean_removes_our_folders_locks_and_temporaries_and_leaves_user_files(offload_dir, capsys, caplog):
    folder = dispatched(offload_dir)
    other = materialize(offload_dir, [GroupPlan("g", {"t": torch.ones(3)}, {"t": "t"})]).folder
    temporary = offload_dir / f".{folder.name}.tmp-4242"
    temporary.mkdir()
    (temporary / "group-00000.safetensors").write_bytes(b"partial")
    (offload_dir / "notes.txt").write_text("mine")
    (offload_dir / "mine").mkdir()
    (offload_dir / "mine" / "photo.jpg").write_bytes(b"\xff\xd8")
    ours = {folder, other, temporary, offload_dir / f".{folder.name}.lock", offload_dir / f".{other.name}.lock"}
    before = listing(offload_dir)
    assert set(clean_folder(offload_dir, dry_run=True)) == ours
    assert listing(offload_dir) == before
    with caplog.at_level(logging.INFO, logger="accel_nvme.maintenance"):
        assert run_command("clean", offload_dir) == 0
    assert f"left alone, not written by accel_nvme: {offload_dir / 'notes.txt'}" in caplog.text
    assert sorted(os.listdir(offload_dir)) == ["mine", "notes.txt"]
    assert (offload_dir / "mine" / "photo.jpg").read_bytes() == b"\xff\xd8"
    assert f"removed {other}" in capsys.readouterr().out


def test_clean_one_model_folder_removes_it_and_its_lock_only(offload_dir):
    folder = dispatched(offload_dir)
    other = materialize(offload_dir, [GroupPlan("g", {"t": torch.ones(3)}, {"t": "t"})]).folder
    assert clean_folder(folder) == [folder, offload_dir / f".{folder.name}.lock"]
    assert sorted(os.listdir(offload_dir)) == sorted([other.name, f".{other.name}.lock"])
    assert verify_folder(offload_dir) == []


def test_clean_refuses_a_foreign_folder_and_deletes_nothing(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ValueError, match=str(tmp_path)):
        clean_folder(tmp_path)
    assert run_command("clean", tmp_path) == 2
    assert "nothing written by accel_nvme" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "photo.jpg"]


def test_clean_refuses_a_model_folder_holding_user_files_and_deletes_nothing(offload_dir):
    folder = dispatched(offload_dir)
    (folder / "notes.txt").write_text("mine")
    before = listing(offload_dir)
    for path in (offload_dir, folder):
        with pytest.raises(ValueError, match=f"{folder}.*notes.txt"):
            clean_folder(path)
    assert listing(offload_dir) == before


def test_clean_refuses_while_a_writer_holds_the_lock(offload_dir):
    folder = dispatched(offload_dir)
    before = listing(offload_dir)
    with open(offload_dir / f".{folder.name}.lock", "rb") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="held by a process"):
            clean_folder(offload_dir)
    assert listing(offload_dir) == before


def test_an_offload_folder_named_like_a_model_folder_is_cleaned_inside(tmp_path):
    offload_dir = tmp_path / f"{FOLDER_PREFIX}offload"
    offload_dir.mkdir()
    folder = dispatched(offload_dir)
    (offload_dir / "notes.txt").write_text("mine")
    assert inspect_folder(offload_dir)["kind"] == "offload folder"
    assert folder in clean_folder(offload_dir)
    assert os.listdir(offload_dir) == ["notes.txt"]
