"""The ballast: a helper process holding all but ``--free-ram`` of the available RAM, so each mode runs in a squeezed
machine; and the process plumbing the bench's children share (die with the parent, the environment they get).

Standard library only: the ballast runs this file alone (``runpy.run_path``), not the package, which imports torch,
so that its own RSS stays a few MB.
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

logger = logging.getLogger(__name__)

PAGE = 4096
MIN_FREE_RAM_BYTES = 800_000_000  # one worker: interpreter, torch and transformers (~0.3 GB), staging, activations
BALLAST_CHUNK_BYTES = 64 << 20
BALLAST_POLL_S = 0.05  # while a mode runs, the ballast takes back what other processes free this often


class BallastError(RuntimeError):
    """The ballast could not be started or died: the machine is not squeezed as asked."""


def meminfo_bytes(field: str) -> int:
    """The ``field`` line of /proc/meminfo (``MemAvailable``, ``Cached``...), in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/meminfo has no '{field}:' line")


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (PR_SET_PDEATHSIG), and exit if it is already gone."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError) as e:
        logger.debug("prctl(PR_SET_PDEATHSIG) failed: %s", e)
    if os.getppid() != parent_pid:
        os._exit(1)


def child_env() -> dict[str, str]:
    """The environment of a child process: this one, with this package first on PYTHONPATH."""
    package_parent = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}


class _Hold:
    """Touched anonymous chunks, topped up or released to keep MemAvailable at ``free_bytes``."""

    def __init__(self, free_bytes: int):
        self.free_bytes = free_bytes
        self.chunks: list[mmap.mmap] = []
        self.fill = b"\x5a" * BALLAST_CHUNK_BYTES

    def adjust(self, release: bool) -> None:
        """Take chunks while more than ``free_bytes`` is available; with ``release``, give back while less is."""
        for _ in range(100_000):  # measured again after each step: other processes allocate and free meanwhile
            excess = meminfo_bytes("MemAvailable") - self.free_bytes
            if excess >= BALLAST_CHUNK_BYTES // 4:
                size = min(BALLAST_CHUNK_BYTES, excess - excess % PAGE)
                chunk = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                chunk.write(self.fill[:size])  # touched: every page is resident, not a promise
                self.chunks.append(chunk)
            elif release and self.chunks and excess < -BALLAST_CHUNK_BYTES // 2:
                self.chunks.pop().close()
            else:
                break

    def reply(self) -> None:
        """Print ``<held bytes> <available bytes>`` for the parent."""
        print(sum(len(c) for c in self.chunks), meminfo_bytes("MemAvailable"), flush=True)


def ballast_main(free_bytes: int, parent_pid: int) -> None:
    """The ballast process: hold touched anonymous pages so that ``free_bytes`` stay available, until stdin ends.

    Its oom_score_adj is 1000, so under memory pressure the OOM killer takes the ballast, never a mode or another
    process. Each line ``adjust`` on stdin tops it up or releases chunks to bring MemAvailable back to ``free_bytes``;
    each reply on stdout is ``<held bytes> <available bytes>``. Between lines (while a mode runs) it only takes: what
    other processes free is held at once, so a mode never gets more than ``free_bytes`` (plus a margin) for its
    page cache. End of stdin (the parent closed it, exited or was killed) ends the process, and with it the memory.
    """
    die_with_parent(parent_pid)
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
    hold = _Hold(free_bytes)
    hold.adjust(release=True)
    hold.reply()
    while True:
        if select.select([sys.stdin], [], [], BALLAST_POLL_S)[0]:
            if not sys.stdin.readline():
                return
            hold.adjust(release=True)
            hold.reply()
        else:
            hold.adjust(release=False)


class Ballast:
    """A helper process holding all but ``free_bytes`` of the available RAM, so each mode runs in a squeezed machine.

    Refuses a ``free_bytes`` larger than what is available or below ``MIN_FREE_RAM_BYTES``. ``adjust()`` before each
    mode brings the available RAM back to ``free_bytes`` (other processes come and go); ``close()`` releases it all,
    and so does the end of this process, however it ends (the ballast reads a pipe from it and dies with it).
    """

    def __init__(self, free_bytes: int):
        self.check(free_bytes, meminfo_bytes("MemAvailable"))
        self.free_bytes = free_bytes
        run = "import runpy, sys; runpy.run_path(sys.argv[1])['ballast_main'](int(sys.argv[2]), int(sys.argv[3]))"
        command = [sys.executable, "-c", run, __file__, str(free_bytes), str(os.getpid())]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env()
        )
        self.held_bytes, self.available_bytes = self._reply()
        logger.info(
            "ballast (pid %d) holds %.2f GB; %.2f GB available for the modes",
            self.process.pid,
            self.held_bytes / 1e9,
            self.available_bytes / 1e9,
        )

    @staticmethod
    def check(free_bytes: int, available: int) -> None:
        """Refuse a ``free_bytes`` above ``available`` or below ``MIN_FREE_RAM_BYTES``, saying why."""
        if free_bytes > available:
            raise BallastError(
                f"--free-ram {free_bytes / 1e9:.2f} GB is more than the {available / 1e9:.2f} GB available now:"
                " give a smaller size, or --no-squeeze"
            )
        if free_bytes < MIN_FREE_RAM_BYTES:
            raise BallastError(
                f"--free-ram {free_bytes / 1e9:.2f} GB is too small to run a mode: give at least"
                f" {MIN_FREE_RAM_BYTES / 1e9:.1f} GB (interpreter, torch, transformers, staging buffers)"
            )

    def _reply(self) -> tuple[int, int]:
        line = self.process.stdout.readline()
        if not line:
            status = self.process.wait()
            raise BallastError(
                f"the ballast process (pid {self.process.pid}) exited with status {status}"
                f"{' (SIGKILL: the OOM killer, most likely)' if status == -9 else ''}; the machine is not squeezed"
            )
        held, available = line.split()
        return int(held), int(available)

    def adjust(self) -> tuple[int, int]:
        """Top up or release so that ``free_bytes`` are available again; returns (held, available) bytes."""
        try:
            self.process.stdin.write("adjust\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # _reply says how it died
        self.held_bytes, self.available_bytes = self._reply()
        return self.held_bytes, self.available_bytes

    def check_alive(self, mode: str) -> None:
        """Raise ``BallastError`` when the ballast died while ``mode`` ran: the machine was no longer squeezed."""
        if self.process.poll() is not None:
            raise BallastError(
                f"the ballast process died (status {self.process.returncode}) while mode {mode} ran:"
                " the machine was no longer squeezed"
            )

    def close(self) -> None:
        """Release the memory: close the pipe, and kill the process if it does not exit at once."""
        if self.process.stdin and not self.process.stdin.closed:
            with suppress(BrokenPipeError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
