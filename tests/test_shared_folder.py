"""Offload folders on shared disks (issue 14.3) and waits that never hang (issue 14.4).

The second local user is a forked child that drops to uid 65534 (the tests run as root) and plants folders and
symlinks in a sticky, world-writable folder, as anyone can in /tmp."""

import logging
import os
import shutil
import signal
import stat
import tempfile
import time
from pathlib import Path

import pytest
import torch
from helpers import reference, tiny_lm
from test_faults import big_model, per_layer_map, spawn, wait_for_line, within
from test_integrity import (
    IDS,
    dispatch,
    forward,
    manifest_of,
    only_folder,
    time_limit,  # noqa: F401  (autouse: every test here has a time limit)
    write_manifest,
)

import accel_nvme
from accel_nvme import NvmeConfig
from accel_nvme.format import GroupFileError
from accel_nvme.io import FileReader, Segment
from accel_nvme.maintenance import clean_folder, inspect_folder, verify_folder
from accel_nvme.staging import StagingBuffer
from accel_nvme.store import FOLDER_PREFIX, MANIFEST_NAME, StoreError

NOBODY = 65534


@pytest.fixture
def shared():
    """A sticky, world-writable folder like /tmp, reachable by another user."""
    if os.geteuid() != 0:
        pytest.skip("planting files as another user needs root")
    path = Path(tempfile.mkdtemp(prefix="accel-nvme-shared-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path)


def as_nobody(action) -> None:
    """Run ``action()`` in a forked child as uid/gid 65534; fail if it raised."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            action()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the second user's action failed"


def folder_name(tmp_path) -> str:
    """The model folder name tiny_lm() gets (computable by anyone who has the weights)."""
    dispatch(tmp_path / "learn")
    return only_folder(tmp_path / "learn").name


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- 14.3 private files


def test_folders_and_files_are_private_to_the_user_whatever_the_umask(tmp_path):
    root = tmp_path / "offload"
    previous = os.umask(0)
    try:
        dispatch(root)
    finally:
        os.umask(previous)
    folder = only_folder(root)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [root, folder, *root.iterdir(), *folder.iterdir()]}
    assert modes.pop(root.name) == 0o700 and modes.pop(folder.name) == 0o700
    assert set(modes.values()) == {0o600}, modes


@pytest.mark.parametrize("verify_on_read", [False, True])
def test_a_folder_planted_by_another_user_is_refused_not_reused_not_deleted(tmp_path, shared, verify_on_read):
    name = folder_name(tmp_path)
    dispatch(tmp_path / "theirs", seed=5)
    theirs = only_folder(tmp_path / "theirs")
    manifest = manifest_of(theirs)
    manifest["fingerprint"] = name.removeprefix(FOLDER_PREFIX)
    write_manifest(theirs, manifest, redigest=True)  # a folder that would pass every check but its owner's
    planted = tree(theirs)

    def plant():
        folder = shared / name
        folder.mkdir(mode=0o755)
        for file, data in planted.items():
            (folder / file).write_bytes(data)

    as_nobody(plant)
    with pytest.raises(StoreError, match=rf"{shared / name} is owned by uid {NOBODY}, not by you.*refusing"):
        dispatch(shared, verify_on_read=verify_on_read)
    assert tree(shared / name) == planted and (shared / name).stat().st_uid == NOBODY


def test_a_folder_writable_by_others_is_refused(shared):
    dispatch(shared)
    folder = only_folder(shared)
    folder.chmod(0o777)
    before = tree(folder)
    with pytest.raises(StoreError, match=rf"{folder} has mode drwxrwxrwx, writable by others"):
        dispatch(shared)
    assert tree(folder) == before


@pytest.mark.parametrize("planter", ["another user", "the same user"])
def test_a_lock_path_planted_as_a_symlink_creates_nothing_elsewhere(tmp_path, shared, planter):
    """Another user's link in a sticky folder is refused by the kernel too (protected_symlinks); ours by O_NOFOLLOW."""
    name = folder_name(tmp_path)
    root = shared if planter == "another user" else tmp_path / "private"
    elsewhere = shared / "elsewhere"

    def plant():
        root.mkdir(exist_ok=True)
        elsewhere.mkdir()
        (root / f".{name}.lock").symlink_to(elsewhere / "created")

    as_nobody(plant) if planter == "another user" else plant()
    reason = "it is a symbolic link" if planter == "the same user" else "it is a symbolic link|Permission denied"
    with pytest.raises(StoreError, match=rf"{root}/\.{name}\.lock: cannot open the lock file \(({reason})\)"):
        dispatch(root)
    assert list(elsewhere.iterdir()) == []
    assert not (root / name).exists()


def test_a_planted_temporary_folder_symlink_is_never_written_through(tmp_path, shared):
    """The old temporary name was predictable (pid): a symlink there made the victim write through it."""
    name = folder_name(tmp_path)
    elsewhere = shared / "elsewhere"
    links = [shared / f".{name}.tmp-{pid}" for pid in range(os.getpid() - 3, os.getpid() + 30)]

    def plant():
        elsewhere.mkdir()
        (elsewhere / "group-00000.safetensors").write_bytes(b"precious")
        for link in links:
            link.symlink_to(elsewhere)

    as_nobody(plant)
    model = dispatch(shared)
    assert torch.equal(forward(model, IDS), reference(tiny_lm(), IDS))
    assert tree(elsewhere) == {"group-00000.safetensors": b"precious"}
    assert all(link.is_symlink() for link in links), "another user's entries were removed"


def test_clean_never_follows_a_link_out_of_the_folder(tmp_path, offload_dir):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "group-00000.safetensors").write_bytes(b"precious")
    dispatch(offload_dir)
    folder = only_folder(offload_dir)
    (folder / "group-00099.safetensors").symlink_to(outside / "group-00000.safetensors")
    (offload_dir / f"{FOLDER_PREFIX}linked").symlink_to(outside)
    (offload_dir / f".{FOLDER_PREFIX}linked.lock").symlink_to(outside / "group-00000.safetensors")
    with pytest.raises(ValueError, match=r"group-00099\.safetensors"):
        clean_folder(offload_dir)
    (folder / "group-00099.safetensors").unlink()
    removed = clean_folder(offload_dir)
    assert folder in removed and all(not p.name.endswith("linked") for p in removed)
    assert tree(outside) == {"group-00000.safetensors": b"precious"}
    assert (offload_dir / f"{FOLDER_PREFIX}linked").is_symlink()


def test_a_group_file_replaced_by_a_symlink_is_not_followed(tmp_path, offload_dir, caplog):
    dispatch(offload_dir)
    folder = only_folder(offload_dir)
    victim = folder / "group-00001.safetensors"
    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(victim, copy)
    victim.unlink()
    victim.symlink_to(copy)
    (problem,) = verify_folder(offload_dir)
    assert problem.file == victim and "symbolic link" in problem.message
    with caplog.at_level(logging.WARNING, logger="accel_nvme.store"):
        model = dispatch(offload_dir)
    assert "rewriting it" in caplog.text and not victim.is_symlink()
    assert torch.equal(forward(model, IDS), reference(tiny_lm(), IDS))


# ------------------------------------------------------------------------------------------------- 14.4 hangs

HOLDER = """
    import fcntl, sys, time
    lock = open(sys.argv[1], "a+b")
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    print("HELD", flush=True)
    time.sleep(600)
"""


class Timed(logging.Handler):
    """Keeps (time, message) of every record."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append((time.monotonic(), record.getMessage()))


@pytest.fixture
def timed_log():
    handler = Timed()
    logger = logging.getLogger("accel_nvme.store")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_a_lock_held_by_another_process_is_named_at_once_and_given_up_after_lock_timeout(tmp_path, timed_log):
    root = tmp_path / "offload"
    root.mkdir(mode=0o700)
    lock = root / f".{folder_name(tmp_path)}.lock"
    holder = spawn(HOLDER, lock)
    try:
        wait_for_line(holder, "HELD")
        started = time.monotonic()
        with pytest.raises(StoreError, match=rf"{lock}: still held by pid {holder.pid} after 1.5 s \(lock_timeout\)"):
            within(30, lambda: dispatch(root, lock_timeout=1.5))
        elapsed = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    (when, message), *_ = timed_log.records
    assert when - started < 1.0 and f"waiting for {lock}, held by pid {holder.pid}" in message
    assert 1.5 <= elapsed < 10
    assert torch.equal(forward(within(60, dispatch, root), IDS), reference(tiny_lm(), IDS))


WRITER = """
    import sys, accel_nvme
    from test_faults import big_model, per_layer_map
    model = big_model(layers=int(sys.argv[2]), width=1024)
    accel_nvme.dispatch_model(model, per_layer_map(model), offload_dir=sys.argv[1])
    print("DONE", flush=True)
"""


def test_a_stopped_writer_makes_the_next_process_give_up_with_its_pid_not_hang(tmp_path):
    for attempt in range(4):  # the writer may finish before it is caught mid-write: try again, bigger
        root = tmp_path / f"offload-{attempt}"
        root.mkdir()
        layers = 24 * (attempt + 1)
        writer = spawn(WRITER, root, layers)
        deadline = time.monotonic() + 120
        while writer.poll() is None and not any(".tmp-" in n for n in os.listdir(root)):
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.002)
        writer.send_signal(signal.SIGSTOP)
        if not any(n.startswith(FOLDER_PREFIX) for n in os.listdir(root)):
            break
        writer.kill()
        writer.wait()
    else:
        pytest.fail("the writer always finished before it could be stopped")
    try:
        model = big_model(layers=layers, width=1024)
        config = NvmeConfig(lock_timeout=1)
        with pytest.raises(StoreError, match=rf"still held by pid {writer.pid} after 1 s"):
            within(60, lambda: accel_nvme.dispatch_model(model, per_layer_map(model), offload_dir=root, config=config))
    finally:
        writer.send_signal(signal.SIGCONT)
    out, err = writer.communicate(timeout=120)
    assert "DONE" in out, err[-2000:]
    x = torch.randn(2, 1024, generator=torch.Generator().manual_seed(0))
    expected = forward(big_model(layers=layers, width=1024), x)
    model = within(60, lambda: accel_nvme.dispatch_model(model, per_layer_map(model), offload_dir=root))
    assert torch.equal(forward(model, x), expected)


def test_a_fifo_in_place_of_a_group_file_blocks_nothing(offload_dir, caplog):
    dispatch(offload_dir)
    folder = only_folder(offload_dir)
    victim = folder / "group-00002.safetensors"
    victim.unlink()
    os.mkfifo(victim)
    (problem,) = within(20, verify_folder, offload_dir)
    assert problem.file == victim and "FIFO" in problem.message
    (model,) = within(20, inspect_folder, offload_dir)["models"]
    assert "FIFO" in model["groups"][2]["problem"]
    reader = FileReader()
    try:
        (future,) = reader.submit([Segment(victim, 0, 4096, 0, 1)], StagingBuffer(4096))
        with pytest.raises(GroupFileError, match=rf"{victim}: expected a regular file, found a FIFO"):
            within(20, future.result)
    finally:
        reader.close()
    with caplog.at_level(logging.WARNING, logger="accel_nvme.store"):
        model = within(60, dispatch, offload_dir)
    assert "rewriting it" in caplog.text and stat.S_ISREG(victim.stat().st_mode)
    assert torch.equal(forward(model, IDS), reference(tiny_lm(), IDS))


def test_a_manifest_fifo_blocks_nothing(offload_dir):
    dispatch(offload_dir)
    folder = only_folder(offload_dir)
    (folder / MANIFEST_NAME).unlink()
    os.mkfifo(folder / MANIFEST_NAME)
    (problem,) = within(20, verify_folder, offload_dir)
    assert "FIFO" in problem.message
    assert torch.equal(forward(within(60, dispatch, offload_dir), IDS), reference(tiny_lm(), IDS))


def test_an_offload_folder_anyone_can_rename_in_is_refused_unless_sticky(tmp_path):
    root = tmp_path / "open"
    root.mkdir()
    root.chmod(0o777)
    with pytest.raises(StoreError, match=rf"offload folder {root} has mode drwxrwxrwx: anyone can rename"):
        dispatch(root)
    assert list(root.iterdir()) == []
    root.chmod(0o1777)
    assert torch.equal(forward(dispatch(root), IDS), reference(tiny_lm(), IDS))
