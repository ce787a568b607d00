"""``accel-nvme inspect | verify | clean``: look at, check and remove what accel_nvme wrote in an offload folder.

A path is either an offload folder (holding ``accel-nvme-<fingerprint>/`` model folders, their
``.accel-nvme-<fingerprint>.lock`` files and ``.accel-nvme-<fingerprint>.tmp-<pid>/`` leftovers of interrupted
writers) or one model folder. Anything else found there belongs to the user: it is reported, never deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .format import (
    DIGEST_NAME,
    DTYPE_TO_SAFETENSORS,
    GroupFileError,
    align_up,
    new_digest,
    open_regular,
    parse_json,
    read_layout,
)
from .residency import spread_resident
from .sources import DIGESTS_NAME, RangeDigests, checkpoint_source
from .store import (
    CLEAN_ADVICE,
    FOLDER_PREFIX,
    GROUP_FILE,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    CheckpointGroup,
    Manifest,
    StoreError,
    load_manifest,
)

logger = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20
OUR_FILE_NAMES = re.compile(
    rf"{re.escape(MANIFEST_NAME)}|group-\d+\.safetensors|\.group-\d+\.safetensors\.tmp-\d+|"
    rf"{re.escape(DIGESTS_NAME)}|\.{re.escape(DIGESTS_NAME)}\.tmp-\d+"
)
COMMANDS = ("inspect", "verify", "clean")


@dataclass(frozen=True)
class Problem:
    """Something wrong with one file of a model folder."""

    file: Path
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


@dataclass(frozen=True)
class _Contents:
    """What a path holds, sorted by who wrote it."""

    models: list[Path]
    locks: list[Path]
    temporaries: list[Path]
    foreign: list[Path]


def _kind(entry: Path) -> str:
    """``model``, ``lock`` or ``temporary`` for what accel_nvme writes in an offload folder, else ``foreign``."""
    if entry.is_symlink():
        return "foreign"
    name = entry.name
    if name.startswith(FOLDER_PREFIX) and entry.is_dir():
        return "model"
    if name.startswith(f".{FOLDER_PREFIX}") and name.endswith(".lock") and entry.is_file():
        return "lock"
    if name.startswith(f".{FOLDER_PREFIX}") and ".tmp-" in name and entry.is_dir():
        return "temporary"
    return "foreign"


def _is_model_folder(path: Path) -> bool:
    """A folder named ``accel-nvme-*`` that does not itself hold model folders, locks or temporaries."""
    return _kind(path) == "model" and all(_kind(child) == "foreign" for child in path.iterdir())


def _scan(path: Path) -> _Contents:
    """Sort the entries of an offload folder; for a model folder, itself plus its own lock and temporaries."""
    if not path.is_dir():
        raise ValueError(f"{path}: not a folder")
    if _is_model_folder(path):
        siblings = [
            p
            for p in path.parent.iterdir()
            if p.name == f".{path.name}.lock" or p.name.startswith(f".{path.name}.tmp-")
        ]
        entries, foreign = [path, *siblings], []
    else:
        entries = list(path.iterdir())
        foreign = sorted(p for p in entries if _kind(p) == "foreign")
    by_kind = {kind: sorted(p for p in entries if _kind(p) == kind) for kind in ("model", "lock", "temporary")}
    return _Contents(by_kind["model"], by_kind["lock"], by_kind["temporary"], foreign)


def _foreign_inside(folder: Path) -> list[Path]:
    """Entries of a model or temporary folder that accel_nvme does not write there."""
    return sorted(
        p for p in folder.iterdir() if p.is_symlink() or not p.is_file() or not OUR_FILE_NAMES.fullmatch(p.name)
    )


def _disk_bytes(path: Path) -> int:
    """Bytes allocated on disk (``st_blocks * 512``) by a file, or by every file under a folder."""
    if not path.is_dir():
        return path.lstat().st_blocks * 512
    return sum(os.lstat(os.path.join(root, name)).st_blocks * 512 for root, _, files in os.walk(path) for name in files)


def _manifest_json(folder: Path) -> dict | None:
    """The manifest as JSON, or None when it is missing, unreadable or not an object (never through a symlink)."""
    try:
        with open(open_regular(folder / MANIFEST_NAME), "rb") as f:
            raw = parse_json(f.read(MAX_MANIFEST_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    return raw if isinstance(raw, dict) else None


def _files_named(names: list[str]) -> str:
    return names[0][:200] + (f" +{len(names) - 1} more" if len(names) > 1 else "") if names else "-"


def _checkpoint_info(g: dict) -> dict:
    """What inspect shows of a group streamed in place: its checkpoint files, bytes, dtypes and tensor count."""
    tensors = [t for t in g["tensors"].values() if isinstance(t, dict)]
    return {
        "name": str(g.get("name"))[:200],
        "file": _files_named(sorted({Path(str(t.get("file"))).name for t in tensors})),
        "source": "checkpoint",
        "data_bytes": sum(t["offsets"][1] - t["offsets"][0] for t in tensors),
        "dtypes": sorted({str(t.get("dtype")) for t in tensors}),
        "tensors": len(tensors),
        "problem": None,
    }


def _group_info(folder: Path, file: str, name: str | None) -> dict:
    info = {"name": name, "file": file, "source": "group file", "data_bytes": None, "dtypes": [], "tensors": None}
    info["problem"] = None
    if not GROUP_FILE.fullmatch(file):
        return {**info, "problem": "not a group file name of this folder"}
    path = folder / file
    try:
        layout = read_layout(path)
    except (GroupFileError, OSError) as e:
        return {**info, "problem": str(e).removeprefix(f"{path}: ")}
    dtypes = sorted({DTYPE_TO_SAFETENSORS[entry.dtype] for entry in layout.entries})
    return {**info, "data_bytes": layout.data_bytes, "dtypes": dtypes, "tensors": len(layout.entries)}


def _inspect_model(folder: Path, resident_budget: int) -> dict:
    raw = _manifest_json(folder)
    try:
        groups = [
            _checkpoint_info(g)
            if g.get("source") == "checkpoint"
            else _group_info(folder, str(g["file"])[:200], str(g["name"])[:200])
            for g in raw["groups"]
        ]
    except (KeyError, TypeError, AttributeError, IndexError):
        groups = [_group_info(folder, p.name, None) for p in sorted(folder.glob("group-*.safetensors"))]
    resident = spread_resident([align_up(g["data_bytes"] or 0) for g in groups], resident_budget)
    for index, group in enumerate(groups):
        group["resident"] = index in resident
    try:
        load_manifest(folder)
        problem = None
    except (StoreError, ValueError, OSError) as e:
        problem = str(e)
    fingerprint = raw.get("fingerprint") if raw else None
    return {
        "folder": str(folder),
        "fingerprint": str(fingerprint or folder.name.removeprefix(FOLDER_PREFIX))[:200],
        "version": raw.get("version") if raw and isinstance(raw.get("version"), int) else None,
        "complete": problem is None,
        "problem": problem,
        "groups": groups,
        "total_bytes": sum(g["data_bytes"] or 0 for g in groups),
        "streamed_bytes": sum(g["data_bytes"] or 0 for g in groups if not g["resident"]),
        "disk_bytes": _disk_bytes(folder),
        "foreign": [str(p) for p in _foreign_inside(folder)],
    }


def inspect_folder(path: str | os.PathLike, resident_budget: int = 0) -> dict:
    """Describe an offload folder or one model folder: groups, sizes, dtypes, validity, leftovers, foreign entries.

    With ``resident_budget``, each group says whether that budget would keep it resident, and each model how many
    bytes a forward would still stream.
    """
    path = Path(os.path.abspath(path))
    contents = _scan(path)
    leftovers = [
        {"path": str(p), "kind": kind, "disk_bytes": _disk_bytes(p)}
        for kind, paths in (("lock", contents.locks), ("temporary", contents.temporaries))
        for p in paths
    ]
    return {
        "path": str(path),
        "kind": "model folder" if contents.models == [path] else "offload folder",
        "models": [_inspect_model(folder, resident_budget) for folder in contents.models],
        "leftovers": leftovers,
        "foreign": [str(p) for p in contents.foreign],
    }


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], indent: str) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def format_inspect(report: dict) -> str:
    """The report of ``inspect_folder`` as readable text: one table of groups per model folder."""
    lines = [
        f"{report['kind']} {report['path']}: {len(report['models'])} model folder(s), "
        f"{len(report['leftovers'])} leftover(s), {len(report['foreign'])} entry(ies) not written by accel_nvme"
    ]
    for model in report["models"]:
        state = "complete" if model["complete"] else f"NOT USABLE: {model['problem']}"
        lines += [
            "",
            f"{Path(model['folder']).name}",
            f"  fingerprint {model['fingerprint']}, format version {model['version']}, {state}",
            f"  {len(model['groups'])} group(s), {model['total_bytes']:,} data bytes, "
            f"{model['disk_bytes']:,} bytes on disk, {model['streamed_bytes']:,} streamed per forward",
        ]
        rows = [
            (
                str(g["name"]),
                g["source"],
                g["file"],
                "-" if g["data_bytes"] is None else f"{g['data_bytes']:,}",
                ",".join(g["dtypes"]) or "-",
                "-" if g["tensors"] is None else str(g["tensors"]),
                "resident" if g["resident"] else "streamed",
                g["problem"] or "",
            )
            for g in model["groups"]
        ]
        lines += _table(
            ("group", "reads from", "file", "data bytes", "dtypes", "tensors", "kept", "problem"), rows, "  "
        )
        lines += [f"  not written by accel_nvme: {p}" for p in model["foreign"]]
    if report["leftovers"]:
        lines += ["", "leftovers of writers (accel-nvme clean removes them):"]
        rows = [(Path(e["path"]).name, e["kind"], f"{e['disk_bytes']:,} bytes on disk") for e in report["leftovers"]]
        lines += _table(("entry", "kind", "size"), rows, "  ")
    if report["foreign"]:
        lines += ["", "not written by accel_nvme (never touched):", *(f"  {Path(p).name}" for p in report["foreign"])]
    return "\n".join(lines)


def _data_digest(path: Path, offset: int, length: int) -> str:
    """Digest of ``length`` bytes at ``offset``, read in chunks, each dropped from the page cache once hashed."""
    hasher = new_digest()
    view = memoryview(bytearray(CHUNK_BYTES))
    with open(open_regular(path), "rb", buffering=0) as f:
        fd = f.fileno()
        f.seek(offset)
        position, end = offset, offset + length
        while position < end:
            n = f.readinto(view[: min(CHUNK_BYTES, end - position)])
            if not n:
                raise GroupFileError(f"{path}: ends at byte {position}, its header says data runs to {end}")
            hasher.update(view[:n])
            os.posix_fadvise(fd, position, n, os.POSIX_FADV_DONTNEED)
            position += n
        os.posix_fadvise(fd, 0, offset, os.POSIX_FADV_DONTNEED)
    return hasher.hexdigest()


def _problem(file: Path, error: Exception) -> Problem:
    return Problem(file, str(error).removeprefix(f"{file}: "))


def _problem_in(folder: Path, error: Exception) -> Problem:
    """A problem naming the file inside ``folder`` that the error's message starts with, else the folder."""
    named = Path(str(error).split(": ", 1)[0])
    return _problem(named if named.parent == folder else folder, error)


def _verify_model(folder: Path) -> list[Problem]:
    """Check a model folder as a load would (ownership, manifest digest, headers), then every data section's digest."""
    manifest_path = folder / MANIFEST_NAME
    if not os.path.lexists(manifest_path) and os.path.isdir(folder) and not os.path.islink(folder):
        count = len(list(folder.glob("group-*.safetensors")))
        return [
            Problem(manifest_path, f"missing ({count} group file(s) present): the folder is incomplete, never used")
        ]
    try:
        manifest = load_manifest(folder)
    except (StoreError, ValueError, OSError) as e:
        return [_problem_in(folder, e)]
    problems = []
    digests = RangeDigests(folder, manifest.fingerprint)
    for group in manifest.groups:
        if isinstance(group, CheckpointGroup):
            problems += _verify_in_place(manifest, group, digests)
            continue
        try:
            actual = _data_digest(group.path, group.data_offset, group.data_bytes)
        except (GroupFileError, OSError) as e:
            problems.append(_problem(group.path, e))
            continue
        if actual != group.data_digest:
            problems.append(
                Problem(
                    group.path,
                    f"data {DIGEST_NAME} digest is {actual}, the manifest records {group.data_digest} "
                    f"(damaged or replaced data): {CLEAN_ADVICE}",
                )
            )
    return problems


def _verify_in_place(manifest: Manifest, group: CheckpointGroup, digests: RangeDigests) -> list[Problem]:
    """Re-read each checkpoint range of a group streamed in place whose digest a first read recorded."""
    problems = []
    for read in checkpoint_source(manifest, group, False, digests).after_read.ranges:
        recorded = digests.recorded(read)
        if recorded is None:
            continue  # not read yet: its digest is recorded on its first read
        try:
            actual = _data_digest(read.path, read.start, read.end - read.start)
        except (GroupFileError, OSError) as e:
            problems.append(_problem(read.path, e))
            continue
        if actual != recorded:
            problems.append(
                Problem(
                    read.path,
                    f"bytes {read.start}:{read.end} have {DIGEST_NAME} digest {actual}, {digests.path} records "
                    f"{recorded} (the checkpoint changed): {CLEAN_ADVICE}",
                )
            )
    return problems


def verify_folder(path: str | os.PathLike) -> list[Problem]:
    """Re-read every group file of every model folder under ``path`` in full; an empty list means all is sound.

    Checks what a load checks (folder private to this user, manifest digest, group file names, each header against
    its digest) and each data section against its digest; reports missing, truncated, replaced or damaged files.
    """
    path = Path(os.path.abspath(path))
    contents = _scan(path)
    if not contents.models:
        return [Problem(path, "holds no accel_nvme model folder")]
    return [p for folder in contents.models for p in _verify_model(folder)]


@contextlib.contextmanager
def _holding(locks: list[Path]) -> Iterator[None]:
    """Hold every lock, so no writer works on a folder while it is removed; refuse when one is taken."""
    with contextlib.ExitStack() as stack:
        for lock in locks:
            fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            stack.callback(os.close, fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise ValueError(f"{lock}: held by a process writing that model folder; refusing to clean now") from e
        yield


def clean_folder(path: str | os.PathLike, dry_run: bool = False) -> list[Path]:
    """Remove what accel_nvme wrote under ``path`` (model folders, lock files, temporaries); return those paths.

    Raises ``ValueError`` naming the folder, deleting nothing, when ``path`` holds nothing of ours or a model or
    temporary folder holds files accel_nvme does not write. Other entries beside our folders are left alone.
    """
    path = Path(os.path.abspath(path))
    contents = _scan(path)
    if not (contents.models or contents.locks or contents.temporaries):
        raise ValueError(f"{path}: holds nothing written by accel_nvme; refusing to delete anything")
    for folder in contents.models + contents.temporaries:
        foreign = _foreign_inside(folder)
        if foreign:
            names = ", ".join(p.name for p in foreign)
            raise ValueError(f"{folder}: holds entries accel_nvme did not write ({names}); refusing to delete anything")
    removed = contents.models + contents.temporaries + contents.locks
    for entry in contents.foreign:
        logger.info("left alone, not written by accel_nvme: %s", entry)
    if dry_run:
        return removed
    with _holding(contents.locks):
        for folder in contents.models + contents.temporaries:
            shutil.rmtree(folder)
        for lock in contents.locks:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
    logger.info("removed %d entries from %s", len(removed), path)
    return removed


def run_command(name: str, path: str | os.PathLike, **opts: bool | int) -> int:
    """Run the ``inspect``, ``verify`` or ``clean`` command on ``path``: print its outcome, return its exit code.

    ``inspect`` takes ``resident_budget`` (bytes); ``clean`` takes ``dry_run=True`` to only list what it would
    remove. Exit codes: inspect 0, or 1 when the path holds nothing of ours; verify 0 when every group file is sound,
    1 when problems were found (each printed naming its file); clean 0 when removed (or, dry run, removable), 2 when
    refused.
    """
    if name not in COMMANDS:
        raise ValueError(f"unknown command {name!r}, expected one of {', '.join(COMMANDS)}")
    failure = 2 if name == "clean" else 1
    try:
        if name == "inspect":
            report = inspect_folder(path, **opts)
            print(format_inspect(report))
            return 0 if report["models"] or report["leftovers"] else 1
        if name == "verify":
            problems = verify_folder(path)
            for problem in problems:
                print(problem)
            print(f"{path}: {len(problems)} problem(s) found" if problems else f"{path}: every group file is sound")
            return 1 if problems else 0
        removed = clean_folder(path, **opts)
        verb = "would remove" if opts.get("dry_run") else "removed"
        for entry in removed:
            print(f"{verb} {entry}")
        return 0
    except ValueError as e:
        print(f"error: {e}")
        return failure
