"""Options of the nvme tier, in one dataclass, and where they come from: kwargs > environment > config file."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from .store import DEFAULT_LOCK_TIMEOUT

DIRECT_IO_CHOICES = ("auto", "on", "off")
COPY_CHOICES = ("auto", True, False)
ENV_PREFIX = "ACCEL_NVME_"
CONFIG_FILE_NAME = "accel_nvme.yaml"
MAX_REQUEST_BYTES = 1 << 30

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE_UNITS.update({"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40})


@dataclass(frozen=True)
class NvmeConfig:
    """How modules mapped to ``"nvme"`` are written and streamed back.

    ``offload_dir`` is where group files live; ``prefetch_depth`` groups are read ahead of the one in use;
    ``io_threads`` requests of ``io_request_bytes`` each are kept in flight; ``direct_io`` picks O_DIRECT
    ("on"), buffered reads that drop the page cache behind them ("off"), or O_DIRECT where the filesystem
    allows it ("auto"); consecutive device_map entries are merged into one group while it stays within ``group_bytes``
    (0: one group per entry); ``verify_on_read`` checks each group against its digest on every read (else on its
    first read after a launch only);
    ``resident_budget`` (host RAM) and ``device_resident_budget`` (CUDA memory) keep that many bytes of groups
    loaded once instead of streamed ("auto": the memory available at dispatch less the staging buffers and a
    headroom, see ``residency``);
    ``lock_timeout``: seconds to wait for another process writing the same weights before giving up with an error;
    ``expert_streaming``: MoE experts (fused modules, lists of expert modules) read only the experts each forward is
    routed to (CPU execution; False: they stream whole, with their block); ``expert_cache_bytes``: host RAM kept for
    the experts read last (an LRU over the experts of all layers; 0: every routed expert is read again). See
    ``docs/moe.md``.
    ``copy``: whether weights of a safetensors checkpoint are copied into group files (True) or streamed straight from
    the checkpoint (False); "auto" streams in place when the checkpoint and ``offload_dir`` share a filesystem.
    """

    offload_dir: str | os.PathLike | None = None
    prefetch_depth: int = 2
    io_threads: int = 4
    io_request_bytes: int = 4 << 20
    direct_io: str = "auto"
    group_bytes: int = 0
    verify_on_read: bool = False
    resident_budget: int | str = 0
    device_resident_budget: int | str = 0
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    expert_streaming: bool = True
    expert_cache_bytes: int | str = 256 << 20
    copy: bool | str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.prefetch_depth, int) or self.prefetch_depth < 1:
            raise ValueError(f"NvmeConfig.prefetch_depth must be an integer >= 1, got {self.prefetch_depth!r}")
        if not isinstance(self.io_threads, int) or self.io_threads < 1:
            raise ValueError(f"NvmeConfig.io_threads must be an integer >= 1, got {self.io_threads!r}")
        request = self.io_request_bytes
        if not isinstance(request, int) or request < 4096 or request % 4096 or request > MAX_REQUEST_BYTES:
            raise ValueError(
                f"NvmeConfig.io_request_bytes must be a multiple of 4096 between 4 KiB and 1 GiB, got {request!r}"
            )
        if self.direct_io not in DIRECT_IO_CHOICES:
            raise ValueError(f"NvmeConfig.direct_io must be one of {DIRECT_IO_CHOICES}, got {self.direct_io!r}")
        timeout = self.lock_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf:
            raise ValueError(f"NvmeConfig.lock_timeout must be a number of seconds > 0, got {self.lock_timeout!r}")
        if self.copy not in COPY_CHOICES or not isinstance(self.copy, bool | str):
            raise ValueError(f"NvmeConfig.copy must be one of {COPY_CHOICES}, got {self.copy!r}")
        if not isinstance(self.group_bytes, int) or self.group_bytes < 0:
            raise ValueError(f"NvmeConfig.group_bytes must be an integer >= 0, got {self.group_bytes!r}")
        if not isinstance(self.expert_streaming, bool):
            raise ValueError(f"NvmeConfig.expert_streaming must be True or False, got {self.expert_streaming!r}")
        cache = parse_size(self.expert_cache_bytes)
        if cache < 0:
            raise ValueError(f"NvmeConfig.expert_cache_bytes must be a size >= 0, got {self.expert_cache_bytes!r}")
        object.__setattr__(self, "expert_cache_bytes", cache)
        for name in ("resident_budget", "device_resident_budget"):
            value = getattr(self, name)
            if value != "auto":
                value = parse_size(value)
                if value < 0:
                    raise ValueError(f"NvmeConfig.{name} must be a size >= 0 or 'auto', got {getattr(self, name)!r}")
                object.__setattr__(self, name, value)

    def with_offload_dir(self, offload_dir: str | os.PathLike | None) -> NvmeConfig:
        """A copy with ``offload_dir`` set when one is given."""
        return self if offload_dir is None else replace(self, offload_dir=offload_dir)


FIELDS = {f.name: f for f in dataclasses.fields(NvmeConfig)}


def parse_size(text: str | int) -> int:
    """Bytes in a size such as ``1GB`` (decimal units), ``512MiB`` (binary units) or a plain integer."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as 1GB or 512MiB, got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def _coerce(name: str, value: Any, origin: str) -> Any:
    """A config value of the field's type, from a YAML value or an environment string."""
    try:
        if name in ("io_request_bytes", "group_bytes", "expert_cache_bytes"):
            return parse_size(value)
        if name in ("resident_budget", "device_resident_budget"):
            return "auto" if str(value).strip().lower() == "auto" else parse_size(value)
        if name in ("prefetch_depth", "io_threads"):
            return int(value)
        if name == "lock_timeout":
            return float(value)
        if name == "copy" and str(value).strip().lower() == "auto":
            return "auto"
        if name in ("verify_on_read", "expert_streaming", "copy"):
            if isinstance(value, bool):
                return value
            if str(value).strip().lower() in {"1", "true", "yes", "on"}:
                return True
            if str(value).strip().lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError(f"expected true or false, got {value!r}")
        return None if value in (None, "") else str(value)
    except ValueError as e:
        raise ValueError(f"{origin}: bad value for {name}: {e}") from e


def config_file_path() -> Path:
    """``$ACCEL_NVME_CONFIG_FILE``, else ``accel_nvme.yaml`` in accelerate's config folder (``$HF_HOME/accelerate``)."""
    explicit = os.environ.get(f"{ENV_PREFIX}CONFIG_FILE")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    hf_home = os.environ.get("HF_HOME", os.path.join(cache, "huggingface"))
    return Path(hf_home).expanduser() / "accelerate" / CONFIG_FILE_NAME


def _from_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of accel_nvme settings, found {type(raw).__name__}")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(FIELDS)}")
    return {k: _coerce(k, v, str(path)) for k, v in raw.items()}


def _from_env() -> dict[str, Any]:
    values = {}
    for name in FIELDS:
        variable = f"{ENV_PREFIX}{name.upper()}"
        if variable in os.environ:
            values[name] = _coerce(name, os.environ[variable], variable)
    if f"{ENV_PREFIX}OFFLOAD_FOLDER" in os.environ:
        values["offload_dir"] = os.environ[f"{ENV_PREFIX}OFFLOAD_FOLDER"]
    return values


def load_config(base: NvmeConfig | None = None, **overrides: Any) -> NvmeConfig:
    """The settings in force: ``overrides`` (kwargs) > ``ACCEL_NVME_*`` variables > config file > ``base``/defaults."""
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise TypeError(f"unknown accel_nvme settings {unknown}; known: {sorted(FIELDS)}")
    values = {} if base is None else dataclasses.asdict(base)
    values.update(_from_file(config_file_path()))
    values.update(_from_env())
    values.update({k: v for k, v in overrides.items() if v is not None})
    return NvmeConfig(**values)


def save_config(settings: dict[str, Any], path: Path | None = None) -> Path:
    """Write ``settings`` (merged over the file's current content) to the config file; returns its path."""
    path = path or config_file_path()
    current = _from_file(path)
    current.update({k: _coerce(k, v, "argument") for k, v in settings.items() if v is not None})
    NvmeConfig(**current)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in current.items()}))
    os.replace(tmp, path)
    return path
