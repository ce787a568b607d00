"""The modes the bench compares, one ``Mode`` record each: how its worker sets it up, what it needs, how the report
reads it. Mode names (``nvme_resident_25`` included) are parsed into records once, at the CLI and at the JSON."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from accel_nvme.bench import setups
from accel_nvme.bench.config import BenchConfig

RESIDENT_PREFIX = "nvme_resident_"


@dataclass(frozen=True)
class Mode:
    """One way of running the model, with its parameters as fields.

    ``needs_ram_from_checkpoint``: the Llama too is loaded whole into RAM (the Linear model always is);
    ``writes_files`` / ``writes_files_from_checkpoint``: its worker writes offload files (a progress bar follows
    them); ``raw``: reads without compute, the same at any batch; ``disk_anchor``: a disk offload nvme is measured
    against; ``warm_anchor``: a buffered path the page cache speeds up once warm; ``resident``: for nvme modes, the
    resident budget, as a share of the model or ``"auto"``; ``copy``: for nvme modes, the ``copy`` setting (None: the
    one in force, ``ACCEL_NVME_COPY`` or "auto"); ``requires``: a module that must import to run it.
    """

    name: str
    linear_setup: setups.Setup
    llama_setup: setups.Setup
    needs_ram_from_checkpoint: bool = False
    writes_files: bool = True
    writes_files_from_checkpoint: bool = False
    raw: bool = False
    nvme: bool = False
    disk_anchor: bool = False
    warm_anchor: bool = False
    resident: float | str | None = None
    offload_type: str | None = None
    copy: bool | None = None
    requires: str | None = None

    def needs_ram(self, config: BenchConfig) -> bool:
        """Whether the whole model must sit in RAM to run this mode on ``config``'s model."""
        return not config.from_pretrained or self.needs_ram_from_checkpoint

    def writes(self, config: BenchConfig) -> bool:
        """Whether the worker writes offload files for ``config``'s model."""
        return self.writes_files_from_checkpoint if config.from_pretrained else self.writes_files

    @property
    def folder_name(self) -> str:
        """The worker's folder under the bench root: nvme modes share theirs (group files reused, not rewritten), but
        for the one that copies the checkpoint."""
        if self.nvme:
            return "nvme_copy" if self.copy else "nvme"
        return self.name

    def resident_budget(self, model_bytes: int) -> int | str:
        """The ``resident_budget`` setting of an nvme mode on a model of ``model_bytes``."""
        if self.resident == "auto":
            return "auto"
        return int((self.resident or 0) * model_bytes)

    def setup(self, config: BenchConfig) -> Callable:
        """The function that sets this mode up for ``config``'s model (its parameters bound)."""
        setup = self.llama_setup if config.from_pretrained else self.linear_setup
        if self.nvme:
            copy = {} if self.copy is None else {"copy": self.copy}
            return functools.partial(setup, resident_budget=self.resident_budget(config.model_bytes), **copy)
        return setup

    def skip_reason(self) -> str | None:
        """Why this mode cannot run here (its ``requires`` does not import), or None."""
        if self.requires is None:
            return None
        try:
            importlib.import_module(self.requires)
        except ImportError as e:
            return f"{self.requires.split('.')[0]} is not importable: {e}"
        return None


NVME = Mode(
    "nvme",
    setups.setup_nvme,
    setups.setup_llama_nvme,
    writes_files_from_checkpoint=True,
    nvme=True,
    resident=0.0,
)
BASE_MODES = (
    Mode("ram", setups.setup_ram, setups.setup_llama_ram, needs_ram_from_checkpoint=True, writes_files=False),
    Mode("raw_direct", setups.setup_raw_direct, setups.setup_raw_direct, raw=True),
    Mode("raw_buffered", setups.setup_raw_buffered, setups.setup_raw_buffered, raw=True, warm_anchor=True),
    Mode(
        "accelerate_disk",
        setups.setup_accelerate_disk,
        setups.setup_llama_accelerate_disk,
        disk_anchor=True,
        warm_anchor=True,
    ),
    Mode(
        "diffusers_disk",
        setups.setup_diffusers_disk,
        setups.setup_llama_diffusers_disk,
        needs_ram_from_checkpoint=True,
        writes_files_from_checkpoint=True,
        disk_anchor=True,
        offload_type=setups.DIFFUSERS_OFFLOAD_TYPE,
        requires="diffusers.hooks",
    ),
    NVME,
    replace(NVME, name="nvme_auto", resident="auto"),
)
MODES = tuple(m.name for m in BASE_MODES)
# run when asked for: nvme with the checkpoint copied into group files (the Linear model's weights always are)
OPTIONAL_MODES = (replace(NVME, name="nvme_copy", copy=True),)


def nvme_resident(share: float) -> Mode:
    """nvme with ``share`` of the model kept resident, named e.g. ``nvme_resident_25``."""
    return parse_mode(f"{RESIDENT_PREFIX}{round(share * 100)}")


def parse_mode(name: str) -> Mode:
    """The record of the mode called ``name``: one of ``MODES``, ``nvme_copy`` or ``nvme_resident_<percent>``."""
    base = {m.name: m for m in (*BASE_MODES, *OPTIONAL_MODES)}
    if name in base:
        return base[name]
    percent = name.removeprefix(RESIDENT_PREFIX)
    if name.startswith(RESIDENT_PREFIX) and percent.isdigit():
        return replace(NVME, name=name, resident=int(percent) / 100)
    known = ", ".join((*MODES, *(m.name for m in OPTIONAL_MODES)))
    raise ValueError(f"expected a bench mode among {known} or {RESIDENT_PREFIX}<percent>, got {name!r}")


def selected_modes(names: Iterable[str], shares: Iterable[float]) -> list[Mode]:
    """The modes a run measures, in ``MODES`` order, then ``nvme_copy``, then nvme at each resident share above 0."""
    wanted = set(names)
    chosen = [m for m in (*BASE_MODES, *OPTIONAL_MODES) if m.name in wanted]
    return chosen + [nvme_resident(s) for s in shares if s > 0]
