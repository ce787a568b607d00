"""Faults the nvme tier must survive: stale folders, odd or full filesystems, crashes, files changed under a running
model, concurrent users, resource leaks and bad arguments. Data served is never wrong, errors name the folder or
file, and a failed dispatch leaves the model usable from RAM."""

import gc
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import weakref
from pathlib import Path

import psutil
import pytest
import torch
from accelerate.hooks import remove_hook_from_submodules
from helpers import cached_bytes, open_fds, reference, tiny_lm
from safetensors import safe_open
from torch import nn

import accel_nvme
from accel_nvme import NvmeAlignDevicesHook, NvmeConfig
from accel_nvme.format import GroupFileError
from accel_nvme.store import FOLDER_PREFIX, MANIFEST_NAME, StoreError

TESTS = Path(__file__).parent
IDS = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
EVERY = {
    "embed": "nvme",
    **{f"body.layers.{i}": "nvme" for i in range(4)},
    "body.final": "nvme",
    "head": "nvme",
}


# ----------------------------------------------------------------------------------------------------- utilities


def big_model(layers: int = 16, width: int = 1024) -> nn.Sequential:
    """A stack of Linears, ``layers * width**2 * 4`` bytes of weights (deterministic)."""
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).eval().requires_grad_(False)


def per_layer_map(model: nn.Sequential) -> dict[str, str]:
    return {str(i): "nvme" for i in range(len(model))}


def model_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name.startswith(FOLDER_PREFIX))


def leftovers(root: Path) -> list[str]:
    """Everything a dispatch may have left behind except lock files."""
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def group_path(model: nn.Module, module_name: str) -> Path:
    return accel_nvme.group_files(model)[model.get_submodule(module_name)._hf_hook.group]


def forward(model: nn.Module, *inputs):
    with torch.inference_mode():
        return model(*inputs)


def within(seconds: float, fn, *args):
    """``fn(*args)`` on another thread; fails when it has not returned (or raised) after ``seconds``."""
    outcome = {}

    def target():
        try:
            outcome["value"] = fn(*args)
        except BaseException as e:  # re-raised on the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} hung for more than {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def assert_usable_from_ram(model: nn.Module, expected: torch.Tensor, *inputs) -> None:
    assert all(t.device.type == "cpu" for t in model.state_dict().values()), "weights were moved off RAM"
    assert torch.equal(forward(model, *inputs), expected)


def spawn(code: str, *args, stdin=None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith(prefix):
                return line
    proc.kill()
    raise AssertionError(f"no {prefix!r} line from the worker: {proc.stderr.read()[-2000:]}")


@pytest.fixture
def mount_tmpfs(tmp_path):
    """Mount a tmpfs with the given options (needs root); every mount is undone at teardown."""
    mounted = []

    def mount(options: str) -> Path:
        path = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount tmpfs -o {options} (needs root): {result.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield mount
    gc.collect()
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


# ---------------------------------------------------------------------------------------- 1. stale / foreign data


def _edit_version(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["version"] = 99
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def _point_at_missing_file(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["groups"][2]["file"] = "group-99999.safetensors"
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def _delete_a_group_file(folder: Path) -> None:
    (folder / "group-00003.safetensors").unlink()


@pytest.mark.parametrize(
    "spoil", [_edit_version, _point_at_missing_file, _delete_a_group_file], ids=lambda f: f.__name__.strip("_")
)
def test_stale_folder_is_rewritten_and_outputs_are_exact(offload_dir, spoil):
    """A folder with another format version or a missing group file is rewritten, never served."""
    expected = reference(tiny_lm(), IDS)
    accel_nvme.dispatch_model(tiny_lm(), EVERY, offload_dir=offload_dir)
    (folder,) = model_folders(offload_dir)
    spoil(folder)
    (folder / "marker").touch()  # inode numbers are reused on ext4: a marker shows the folder was replaced
    model = accel_nvme.dispatch_model(tiny_lm(), EVERY, offload_dir=offload_dir)
    assert model_folders(offload_dir) == [folder]
    assert not (folder / "marker").exists(), "the folder was not rewritten"
    assert json.loads((folder / MANIFEST_NAME).read_text())["version"] != 99
    assert len(list(folder.glob("group-*.safetensors"))) == 7
    for _ in range(3):
        assert torch.equal(forward(model, IDS), expected)


def test_foreign_models_folder_under_our_name_is_rewritten(offload_dir):
    """Another model's complete folder renamed to our fingerprint: valid files, wrong fingerprint, rewritten."""
    expected = reference(tiny_lm(), IDS)
    accel_nvme.dispatch_model(tiny_lm(), EVERY, offload_dir=offload_dir)
    (ours,) = model_folders(offload_dir)
    shutil.rmtree(ours)
    accel_nvme.dispatch_model(tiny_lm(seed=5), EVERY, offload_dir=offload_dir)
    (foreign,) = model_folders(offload_dir)
    os.rename(foreign, ours)
    model = accel_nvme.dispatch_model(tiny_lm(), EVERY, offload_dir=offload_dir)
    assert json.loads((ours / MANIFEST_NAME).read_text())["fingerprint"] == ours.name.removeprefix(FOLDER_PREFIX)
    for _ in range(2):
        assert torch.equal(forward(model, IDS), expected)


# -------------------------------------------------------------------------------- 2. filesystems and permissions


def test_missing_offload_folder_is_created(tmp_path):
    expected = reference(tiny_lm(), IDS)
    root = tmp_path / "not-yet"
    model = accel_nvme.dispatch_model(tiny_lm(), EVERY, offload_dir=root)
    assert len(model_folders(root)) == 1
    assert torch.equal(forward(model, IDS), expected)


def test_missing_parent_is_a_store_error_naming_the_folder(tmp_path):
    expected = reference(tiny_lm(), IDS)
    model = tiny_lm()
    root = tmp_path / "no-parent" / "offload"
    with pytest.raises(StoreError, match=re.escape(str(root))):
        accel_nvme.dispatch_model(model, EVERY, offload_dir=root)
    assert not root.parent.exists()
    assert_usable_from_ram(model, expected, IDS)


@pytest.mark.parametrize("sub", ["", "offload"], ids=["mountpoint", "below_mountpoint"])
def test_read_only_filesystem_is_a_clear_error_and_the_model_stays_in_ram(mount_tmpfs, sub):
    expected = reference(tiny_lm(), IDS)
    root = mount_tmpfs("size=1m,ro") / sub
    model = tiny_lm()
    with pytest.raises((StoreError, OSError), match=re.escape(str(root))) as raised:
        accel_nvme.dispatch_model(model, EVERY, offload_dir=root)
    assert "read-only" in str(raised.value).lower()
    assert not any(isinstance(getattr(m, "_hf_hook", None), NvmeAlignDevicesHook) for m in model.modules())
    assert_usable_from_ram(model, expected, IDS)


def test_prepared_folder_on_a_read_only_filesystem_is_reused(mount_tmpfs):
    expected = reference(tiny_lm(), IDS)
    root = mount_tmpfs("size=4m")
    accel_nvme.dispatch_model(tiny_lm(), EVERY, offload_dir=root)
    (folder,) = model_folders(root)
    before = snapshot(folder)
    gc.collect()
    subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
    model = accel_nvme.dispatch_model(tiny_lm(), EVERY, offload_dir=root)
    assert snapshot(folder) == before
    assert torch.equal(forward(model, IDS), expected)


def test_dispatch_writes_onto_ramfs(ramfs):
    expected = reference(tiny_lm(), IDS)
    model = accel_nvme.dispatch_model(tiny_lm(), EVERY, offload_dir=ramfs)
    assert torch.equal(forward(model, IDS), expected)


def test_ramfs_refusing_o_direct_streams_exactly_in_bounded_memory(offload_dir, ramfs):
    """ramfs refuses O_DIRECT: reads fall back to buffered ones; outputs exact and RSS does not grow per forward.

    ramfs pages are the files themselves, so the system page cache says nothing here (and is shared with other
    processes): the process's RSS is measured instead. The folder is written on the test disk and copied over
    (writing onto ramfs is tested above)."""
    expected = reference(tiny_lm(width=256, vocab=4000), IDS)
    accel_nvme.dispatch_model(tiny_lm(width=256, vocab=4000), EVERY, offload_dir=offload_dir)
    (written,) = model_folders(offload_dir)
    shutil.copytree(written, ramfs / written.name)
    model = accel_nvme.dispatch_model(tiny_lm(width=256, vocab=4000), EVERY, offload_dir=ramfs)
    try:
        (folder,) = model_folders(ramfs)
        assert accel_nvme.group_files(model)[0].parent == folder
        largest = max(p.stat().st_size for p in folder.glob("group-*.safetensors"))
        assert largest >= 4_000_000
        assert torch.equal(forward(model, IDS), expected)
        assert torch.equal(forward(model, IDS), expected)
        gc.collect()  # garbage of earlier tests must not be counted
        rss = psutil.Process().memory_info().rss
        for _ in range(6):
            assert torch.equal(forward(model, IDS), expected)
        grown = psutil.Process().memory_info().rss - rss
        reader = model.embed._hf_hook.prefetcher.reader
        opened = reader.opened()
        assert opened and not any(opened.values()), "expected the buffered fallback"
        assert grown < largest, f"RSS grew by {grown} bytes over 6 forwards (largest group {largest})"
    finally:
        remove_hook_from_submodules(model)  # close the files and drop the model: the ramfs fixture unmounts strictly
        del model
        gc.collect()


@pytest.mark.parametrize("direct_io", ["auto", "off"])
def test_streaming_from_a_disk_leaves_at_most_one_group_in_the_page_cache(offload_dir, direct_io):
    expected = reference(tiny_lm(width=256, vocab=4000), IDS)
    model = accel_nvme.dispatch_model(
        tiny_lm(width=256, vocab=4000), EVERY, offload_dir=offload_dir, config=NvmeConfig(direct_io=direct_io)
    )
    files = sorted(model_folders(offload_dir)[0].glob("group-*.safetensors"))
    for path in files:  # the write left them cached; start cold
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    for _ in range(3):
        assert torch.equal(forward(model, IDS), expected)
    resident = sum(cached_bytes(p) for p in files)
    largest = max(p.stat().st_size for p in files)
    assert resident <= largest, f"{resident} bytes of group files cached after streaming (largest group {largest})"


def test_disk_too_small_is_a_store_error_with_folder_and_space_and_nothing_left(mount_tmpfs):
    expected = reference(tiny_lm(width=256, vocab=2000), IDS)
    root = mount_tmpfs("size=2m")
    model = tiny_lm(width=256, vocab=2000)
    with pytest.raises(StoreError, match=rf"{re.escape(str(root))}.*needs \d+\.\d+ [MG]B.*free"):
        accel_nvme.dispatch_model(model, EVERY, offload_dir=root)
    assert leftovers(root) == []
    assert_usable_from_ram(model, expected, IDS)


@pytest.mark.parametrize(
    "inodes",
    [
        2,
        3,
        6,
        10,
    ],
)
def test_disk_filling_during_the_write_is_a_store_error_and_nothing_is_left(mount_tmpfs, inodes):
    """The byte check passes (64 MB free) but inodes run out: at the temp folder (2), the first group (3), midway
    (6), or the manifest (10). Deterministic stand-in for a disk that fills while the groups are written."""
    expected = reference(tiny_lm(), IDS)
    root = mount_tmpfs(f"size=64m,nr_inodes={inodes}")
    model = tiny_lm()
    with pytest.raises(StoreError, match=rf"{re.escape(str(root))}.*filled up.*[MG]B needed"):
        accel_nvme.dispatch_model(model, EVERY, offload_dir=root)
    assert leftovers(root) == []
    assert_usable_from_ram(model, expected, IDS)


FILLED_WORKER = """
    import os, sys, torch, accel_nvme
    from accel_nvme.store import StoreError
    from test_faults import big_model, per_layer_map
    root = sys.argv[1]
    model = big_model(layers=96, width=256)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(x)
    try:
        model = accel_nvme.dispatch_model(model, per_layer_map(model), offload_dir=root)
        outcome = "WROTE"
    except StoreError as e:
        assert str(root) in str(e) and ("MB needed" in str(e) or "GB needed" in str(e)), e
        left = [n for n in os.listdir(root) if not n.endswith(".lock") and n != "filler"]
        assert left == [], left
        outcome = "FULL"
    with torch.inference_mode():
        assert torch.equal(model(x), expected), "wrong outputs"
    print(outcome, flush=True)
"""


def test_disk_filled_by_another_writer_during_the_write_is_a_store_error_never_sigbus(mount_tmpfs):
    """A second writer fills the tmpfs as soon as the temp folder appears: the pre-check passed, the write fails.

    A race by nature (the filler may lose), so it is retried; every run must end cleanly (no SIGBUS)."""
    outcomes = []
    for _ in range(3):
        root = mount_tmpfs("size=40m")
        worker = spawn(FILLED_WORKER, root)
        deadline = time.monotonic() + 120
        while worker.poll() is None and time.monotonic() < deadline:
            if any(".tmp-" in name for name in os.listdir(root)):
                with open(root / "filler", "wb", buffering=0) as f:
                    try:
                        while True:
                            f.write(b"\xff" * (1 << 20))
                    except OSError:
                        pass
                break
        out, err = worker.communicate(timeout=120)
        assert worker.returncode != -signal.SIGBUS, "the writer died of SIGBUS"
        assert worker.returncode == 0, err[-3000:]
        outcomes.append(out.strip())
        if "FULL" in outcomes:
            break
    assert "FULL" in outcomes, f"the filler never won the race: {outcomes}"


# ------------------------------------------------------------------------------------------------------ 3. crashes

WRITER = """
    import sys, accel_nvme
    from test_faults import big_model, per_layer_map
    model = big_model(layers=16, width=2048)
    print("DISPATCHING", flush=True)
    accel_nvme.dispatch_model(model, per_layer_map(model), offload_dir=sys.argv[1])
    print("DONE", flush=True)
"""


def test_writer_killed_mid_write_is_repaired_by_the_next_process(offload_dir):
    """SIGKILL while a 256 MB model is written: no folder appears; the next process cleans the temp and rewrites."""
    writer = spawn(WRITER, offload_dir)
    wait_for_line(writer, "DISPATCHING")
    deadline = time.monotonic() + 120
    while not any(".tmp-" in p.name for p in offload_dir.iterdir()):
        assert writer.poll() is None and time.monotonic() < deadline, writer.stderr.read()[-2000:]
        time.sleep(0.001)
    time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.communicate(timeout=60)
    assert writer.returncode == -signal.SIGKILL
    assert [p for p in offload_dir.iterdir() if ".tmp-" in p.name], "the writer finished before it was killed"
    assert model_folders(offload_dir) == [], "a half-written folder appeared under its final name"

    model = big_model(layers=16, width=2048)
    x = torch.randn(2, 2048, generator=torch.Generator().manual_seed(0))
    expected = forward(model, x)
    model = accel_nvme.dispatch_model(model, per_layer_map(model), offload_dir=offload_dir)
    assert [p.name for p in offload_dir.iterdir() if ".tmp-" in p.name] == []
    assert len(model_folders(offload_dir)) == 1
    for _ in range(2):
        assert torch.equal(forward(model, x), expected)


READER = """
    import sys, torch, accel_nvme
    from accel_nvme import NvmeConfig
    from test_faults import big_model, per_layer_map
    model = big_model(layers=16, width=512)
    model = accel_nvme.dispatch_model(model, per_layer_map(model), offload_dir=sys.argv[1],
                                      config=NvmeConfig(prefetch_depth=3))
    x = torch.randn(2, 512)
    step = 0
    with torch.inference_mode():
        while True:
            model(x)
            step += 1
            print(f"STEP {step}", flush=True)
"""


def test_reader_killed_mid_forward_leaves_the_folder_valid_and_reused(offload_dir):
    model = big_model(layers=16, width=512)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(0))
    expected = forward(model, x)
    accel_nvme.dispatch_model(big_model(layers=16, width=512), per_layer_map(model), offload_dir=offload_dir)
    (folder,) = model_folders(offload_dir)
    before = snapshot(folder)
    reader = spawn(READER, offload_dir)
    wait_for_line(reader, "STEP 5")
    reader.send_signal(signal.SIGKILL)
    reader.communicate(timeout=60)
    assert reader.returncode == -signal.SIGKILL
    assert snapshot(folder) == before
    model = accel_nvme.dispatch_model(model, per_layer_map(model), offload_dir=offload_dir)
    assert snapshot(folder) == before, "a valid folder was rewritten"
    assert leftovers(offload_dir) == [folder.name]
    for _ in range(2):
        assert torch.equal(forward(model, x), expected)


# ------------------------------------------------------------------------------------------------ 4. runtime faults


def test_group_files_deleted_after_they_were_read_keep_serving_the_same_data(offload_dir):
    """Open descriptors keep a deleted file's inode: the data stays right; a new dispatch rewrites the folder."""
    expected = reference(tiny_lm(), IDS)
    model = accel_nvme.dispatch_model(tiny_lm(), EVERY, offload_dir=offload_dir, config=NvmeConfig(prefetch_depth=1))
    assert torch.equal(forward(model, IDS), expected)
    (folder,) = model_folders(offload_dir)
    for path in folder.glob("group-*.safetensors"):
        path.unlink()
    for _ in range(3):
        assert torch.equal(within(60, forward, model, IDS), expected)
    again = accel_nvme.dispatch_model(tiny_lm(), EVERY, offload_dir=offload_dir)
    assert len(list(folder.glob("group-*.safetensors"))) == 7
    assert torch.equal(forward(again, IDS), expected)
    assert torch.equal(forward(model, IDS), expected)


@pytest.mark.parametrize("depth", [1, 3])
def test_group_file_gone_before_its_first_read_raises_naming_it_then_recovers(offload_dir, depth):
    expected = reference(tiny_lm(), IDS)
    model = accel_nvme.dispatch_model(
        tiny_lm(), EVERY, offload_dir=offload_dir, config=NvmeConfig(prefetch_depth=depth)
    )
    path = group_path(model, "body.layers.2")
    away = path.with_name("moved-away")
    os.rename(path, away)
    for _ in range(2):
        with pytest.raises(GroupFileError, match=rf"{re.escape(str(path))}.*cannot open"):
            within(60, forward, model, IDS)
    os.rename(away, path)
    for _ in range(2):
        assert torch.equal(within(60, forward, model, IDS), expected)


@pytest.mark.parametrize("victim", ["embed", "body.layers.2", "body.final"])
@pytest.mark.parametrize("cut", ["empty", "header_only", "half_data", "one_byte_short"])
@pytest.mark.parametrize("depth", [1, 3])
def test_truncated_group_raises_naming_it_without_hanging_then_recovers(offload_dir, victim, cut, depth):
    """Truncated before any read (so descriptors are opened on the short file), at several points, for the first
    group (prefetched across forwards), a middle one and the last; restored in place, streaming recovers."""
    expected = reference(tiny_lm(), IDS)
    model = accel_nvme.dispatch_model(
        tiny_lm(), EVERY, offload_dir=offload_dir, config=NvmeConfig(prefetch_depth=depth)
    )
    path = group_path(model, victim)
    original = path.read_bytes()
    hook = model.get_submodule(victim)._hf_hook
    source = hook.prefetcher.sources[hook.group]
    data_offset, data_bytes = source.segments[0].file_offset, source.segments[0].needed
    length = {
        "empty": 0,
        "header_only": data_offset,
        "half_data": data_offset + data_bytes // 2,
        "one_byte_short": data_offset + data_bytes - 1,
    }[cut]
    os.truncate(path, length)
    for _ in range(2):
        with pytest.raises(GroupFileError, match=rf"{re.escape(str(path))}.*truncated"):
            within(60, forward, model, IDS)
    with open(path, "r+b") as f:  # same inode: the reader's open descriptor sees the restored bytes
        f.write(original)
    for _ in range(2):
        assert torch.equal(within(60, forward, model, IDS), expected)


# --------------------------------------------------------------------------------------------------- 5. concurrency

RACER = """
    import sys, torch, accel_nvme
    from test_faults import big_model, per_layer_map
    model = big_model(layers=8, width=768)
    x = torch.randn(2, 768)
    with torch.inference_mode():
        expected = model(x)
    print("READY", flush=True)
    sys.stdin.readline()
    model = accel_nvme.dispatch_model(model, per_layer_map(model), offload_dir=sys.argv[1])
    with torch.inference_mode():
        for _ in range(3):
            assert torch.equal(model(x), expected), "wrong outputs"
    print("OK", flush=True)
"""


def test_four_processes_dispatching_one_model_into_one_folder(offload_dir):
    workers = [spawn(RACER, offload_dir, stdin=subprocess.PIPE) for _ in range(4)]
    for worker in workers:
        wait_for_line(worker, "READY")
    for worker in workers:  # release them together
        worker.stdin.write("go\n")
        worker.stdin.flush()
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-3000:]
        assert out.strip().endswith("OK")
    (folder,) = model_folders(offload_dir)
    assert len(list(folder.glob("group-*.safetensors"))) == 8
    assert [p.name for p in offload_dir.rglob("*") if ".tmp-" in p.name] == []


def test_two_threads_forwarding_two_offloaded_models_stay_exact(offload_dir):
    a_expected = reference(tiny_lm(seed=1), IDS)
    b_expected = reference(tiny_lm(seed=2, width=48), IDS)
    a = accel_nvme.dispatch_model(tiny_lm(seed=1), EVERY, offload_dir=offload_dir, config=NvmeConfig(prefetch_depth=1))
    b = accel_nvme.dispatch_model(tiny_lm(seed=2, width=48), EVERY, offload_dir=offload_dir)
    failures = []
    start = threading.Barrier(2)

    def loop(model, expected, name):
        start.wait()
        try:
            for i in range(150):
                if not torch.equal(forward(model, IDS), expected):
                    failures.append(f"{name} differs at iteration {i}")
        except Exception as e:  # reported below
            failures.append(f"{name} raised {e!r}")

    threads = [
        threading.Thread(target=loop, args=(a, a_expected, "a")),
        threading.Thread(target=loop, args=(b, b_expected, "b")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads), "a forward hung"
    assert failures == []


# ------------------------------------------------------------------------------------------------------ 6. resources


def _maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def test_fifty_dispatch_and_release_cycles_leak_nothing(offload_dir):
    expected = reference(tiny_lm(width=128), IDS)
    config = NvmeConfig(prefetch_depth=2)

    def cycle():
        model = accel_nvme.dispatch_model(tiny_lm(width=128), EVERY, offload_dir=offload_dir, config=config)
        prefetcher = model.embed._hf_hook.prefetcher
        buffers = list(prefetcher.pool.buffers)
        assert torch.equal(forward(model, IDS), expected)
        accel_nvme.close(model)
        assert prefetcher.pool.buffers == [] and all(b._mmap.closed for b in buffers), "staging buffers not released"
        assert torch.equal(forward(model, IDS), expected)
        return weakref.ref(prefetcher)

    for _ in range(3):
        cycle()
    gc.collect()
    threads, fds, maps = {t.ident for t in threading.enumerate()}, open_fds(), _maps()
    rss = psutil.Process().memory_info().rss
    for _ in range(50):
        dead = cycle()
    gc.collect()
    assert dead() is None, "a released prefetcher is still referenced"
    assert {t.ident for t in threading.enumerate()} - threads == set()
    assert open_fds() == fds
    assert _maps() <= maps + 8, f"{_maps() - maps} more memory mappings after 50 cycles"
    grown = psutil.Process().memory_info().rss - rss
    assert grown < 64 << 20, f"RSS grew by {grown / 2**20:.0f} MiB over 50 cycles"


def test_dropping_a_dispatched_model_closes_its_files(offload_dir):
    model = accel_nvme.dispatch_model(tiny_lm(), EVERY, offload_dir=offload_dir)
    forward(model, IDS)
    gc.collect()
    fds = open_fds()
    for _ in range(5):
        model = accel_nvme.dispatch_model(tiny_lm(), EVERY, offload_dir=offload_dir)
        forward(model, IDS)
    del model
    gc.collect()
    assert open_fds() <= fds - 6


RELEASED = """
    import os, sys, torch, accel_nvme
    from accelerate.hooks import remove_hook_from_submodules
    from helpers import tiny_lm, reference
    from test_faults import EVERY, IDS
    root = sys.argv[1]
    expected = reference(tiny_lm(), IDS)
    model = accel_nvme.dispatch_model(tiny_lm(), EVERY, offload_dir=root)
    with torch.inference_mode():
        model(IDS)
    remove_hook_from_submodules(model)
    for folder in os.listdir(root):
        if folder.startswith("accel-nvme-"):
            for name in os.listdir(os.path.join(root, folder)):
                if name.startswith("group-"):
                    os.truncate(os.path.join(root, folder, name), 0)  # e.g. another process repairs the folder
    with torch.inference_mode():
        assert torch.equal(model(IDS), expected)
    print("OK", flush=True)
"""


def test_weights_restored_by_removing_hooks_no_longer_depend_on_the_group_files(offload_dir):
    worker = spawn(RELEASED, offload_dir)
    out, err = worker.communicate(timeout=120)
    assert worker.returncode != -signal.SIGBUS, "SIGBUS: restored weights are mmaps of the group files"
    assert worker.returncode == 0 and out.strip() == "OK", err[-3000:]


# -------------------------------------------------------------------------------------------------- 7. bad arguments


def test_unknown_device_value_names_the_entry_and_changes_nothing(offload_dir):
    expected = reference(tiny_lm(), IDS)
    model = tiny_lm()
    with pytest.raises(ValueError, match=r"device_map\['embed'\] is 'nvm': expected 'nvme', 'cpu'"):
        accel_nvme.dispatch_model(model, {"embed": "nvm", "body": "nvme", "head": "cpu"}, offload_dir=offload_dir)
    assert list(offload_dir.iterdir()) == []
    assert_usable_from_ram(model, expected, IDS)


@pytest.mark.parametrize(
    "device_map", [{"embed": "cpu", "body": "nvm", "head": "cpu"}, {"": "nvm"}], ids=["one_entry", "whole_model"]
)
def test_typo_nvm_without_any_nvme_entry_names_the_entry(offload_dir, device_map):
    with pytest.raises(ValueError, match=r"device_map\[.*\] is 'nvm': expected 'nvme', 'cpu'"):
        accel_nvme.dispatch_model(tiny_lm(), device_map, offload_dir=offload_dir)


@pytest.mark.parametrize(
    ("field", "value"),
    [("prefetch_depth", 0), ("prefetch_depth", -1), ("prefetch_depth", 1.5), ("io_threads", 0), ("io_threads", "2")],
)
def test_config_refuses_non_positive_depth_and_threads(field, value):
    with pytest.raises(ValueError, match=rf"NvmeConfig\.{field} must be an integer >= 1"):
        NvmeConfig(**{field: value})


@pytest.mark.parametrize(
    "device_map",
    [{"embed": "cpu", "body": "nvme", "head": "nvme"}, {"embed": "nvme", "body": "cpu", "head": "cpu"}],
    ids=["head_nvme_embed_cpu", "embed_nvme_head_cpu"],
)
def test_weight_tied_to_a_cpu_module_stays_resident_and_is_not_written(offload_dir, device_map):
    expected = reference(tiny_lm(), IDS)
    model = accel_nvme.dispatch_model(tiny_lm(), device_map, offload_dir=offload_dir, main_device="cpu")
    assert model.embed.weight.device.type == "cpu" and model.head.weight.device.type == "cpu"
    assert model.embed.weight is model.head.weight
    (folder,) = model_folders(offload_dir)
    for path in folder.glob("group-*.safetensors"):
        with safe_open(path, framework="pt") as f:
            assert not {"embed.weight", "head.weight"} & set(f.keys()), f"{path} stores the resident tied weight"
    for _ in range(3):
        assert torch.equal(forward(model, IDS), expected)
