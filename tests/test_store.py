import os

import pytest
import torch

from accel_nvme.store import FOLDER_PREFIX, GroupPlan, StoredWeights, StoreError, load_manifest, materialize


def plans(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        w = torch.randn(16, 8, generator=g)
        out.append(GroupPlan(f"blocks.{i}", {f"blocks.{i}.w": w}, {f"blocks.{i}.w": f"blocks.{i}.w"}))
    return out


def folders(root):
    return sorted(p for p in root.iterdir() if p.name.startswith(FOLDER_PREFIX))


def snapshot(folder):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_same_weights_reuse_the_folder_without_writing(offload_dir):
    first = materialize(offload_dir, plans())
    before = snapshot(first.folder)
    second = materialize(offload_dir, plans())
    assert second.folder == first.folder
    assert snapshot(second.folder) == before


def test_changed_weights_get_a_new_folder(offload_dir):
    first = materialize(offload_dir, plans(seed=0))
    changed = plans(seed=0)
    changed[1].tensors["blocks.1.w"][0, 0] += 1
    second = materialize(offload_dir, changed)
    assert second.folder != first.folder
    weights = StoredWeights(second)
    assert torch.equal(weights["blocks.1.w"], changed[1].tensors["blocks.1.w"])
    assert torch.equal(StoredWeights(first)["blocks.1.w"], plans(seed=0)[1].tensors["blocks.1.w"])


def test_grouping_is_part_of_the_fingerprint(offload_dir):
    base = plans()
    merged = [
        GroupPlan("all", {k: v for p in base for k, v in p.tensors.items()}, {k: k for p in base for k in p.tensors})
    ]
    assert materialize(offload_dir, base).folder != materialize(offload_dir, merged).folder


def test_damaged_folder_is_rewritten_not_served(offload_dir):
    manifest = materialize(offload_dir, plans())
    victim = manifest.groups[1].path
    victim.write_bytes(victim.read_bytes()[:-4])
    again = materialize(offload_dir, plans())
    assert again.folder == manifest.folder
    assert torch.equal(StoredWeights(again)["blocks.1.w"], plans()[1].tensors["blocks.1.w"])


def test_folder_without_manifest_is_never_trusted(offload_dir):
    manifest = materialize(offload_dir, plans())
    (manifest.folder / "manifest.json").unlink()
    with pytest.raises(StoreError, match=r"no manifest\.json"):
        load_manifest(manifest.folder)
    again = materialize(offload_dir, plans())
    assert (again.folder / "manifest.json").exists()


def test_manifest_that_is_not_json_is_refused(offload_dir):
    manifest = materialize(offload_dir, plans())
    (manifest.folder / "manifest.json").write_text("{oops")
    with pytest.raises(StoreError, match="not valid JSON"):
        load_manifest(manifest.folder)


def test_no_temporary_files_remain(offload_dir):
    materialize(offload_dir, plans())
    leftovers = [p for p in offload_dir.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_missing_parent_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        materialize(tmp_path / "nope" / "offload", plans())


def test_stale_temporary_folder_from_a_crash_is_removed(offload_dir):
    fresh = materialize(offload_dir, plans())
    fp = fresh.fingerprint
    os.rename(fresh.folder, offload_dir / f".{FOLDER_PREFIX}{fp}.tmp-99999")
    again = materialize(offload_dir, plans())
    assert folders(offload_dir) == [again.folder]
    assert not (offload_dir / f".{FOLDER_PREFIX}{fp}.tmp-99999").exists()
