"""What the bench runs: the synthetic models' shapes and sizes, the forwards timed, and the constants they rest on."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

RAM_HEADROOM_BYTES = 2_000_000_000  # beyond the weights: interpreter, torch, activations, outputs
LLAMA_VOCAB = 1024
LLAMA_MAX_HIDDEN = 2048  # keeps one decoder layer (one nvme group) near 200 MB, so the nvme worker's RSS stays small
LLAMA_MIN_LAYERS = 4
SQUEEZE_STAGING_SHARE = 0.15  # under --free-ram, nvme's staging buffers (3 decoder layers) stay within this share
STORAGE_DTYPES = {"float32": 4, "bfloat16": 2, "float8_e4m3fn": 1}  # --storage-dtype: bytes per stored value


@dataclass(frozen=True)
class LlamaShape:
    """The synthetic LlamaForCausalLM: tiny vocabulary, untied head, MLP 11/4 of hidden, fp32."""

    hidden: int
    layers: int
    vocab: int = LLAMA_VOCAB

    @property
    def intermediate(self) -> int:
        """MLP width (5632 for hidden 2048, as in Llama)."""
        return self.hidden * 11 // 4

    @property
    def layer_bytes(self) -> int:
        """Bytes of one decoder layer: q, k, v, o, gate, up, down and two norms."""
        return (4 * self.hidden**2 + 3 * self.hidden * self.intermediate + 2 * self.hidden) * 4

    @property
    def model_bytes(self) -> int:
        """Bytes of all tensors: embeddings, layers, final norm and head."""
        return self.layers * self.layer_bytes + (2 * self.vocab * self.hidden + self.hidden) * 4

    @classmethod
    def for_size(cls, size_bytes: int, max_hidden: int = LLAMA_MAX_HIDDEN) -> LlamaShape:
        """The shape closest to ``size_bytes``: hidden grows up to ``max_hidden`` (4 layers at least), then layers."""
        hidden = max(128, min(max_hidden, round((size_bytes / (LLAMA_MIN_LAYERS * 49)) ** 0.5 / 128) * 128))
        shape = cls(hidden=hidden, layers=1)
        return replace(shape, layers=max(1, round((size_bytes - shape.model_bytes) / shape.layer_bytes) + 1))


@dataclass(frozen=True)
class BenchConfig:
    """The synthetic model and the forwards timed on it.

    ``layers`` × Linear(hidden, hidden) fp32 in RAM, or with ``from_pretrained`` a Llama checkpoint of about the same
    size (``llama_shape``, hidden at most ``max_hidden``); ``forwards`` cold and then ``warm_forwards`` warm forwards
    per batch.
    """

    layers: int = 16
    hidden: int = 4096
    batches: tuple[int, ...] = (64, 512)
    forwards: int = 3
    seed: int = 0
    warm_forwards: int = 2
    from_pretrained: bool = False
    resident_shares: tuple[float, ...] = ()
    max_hidden: int = LLAMA_MAX_HIDDEN
    storage_dtype: str = "float32"  # weights stored so, computed in fp32 (layerwise casting); sizes stay fp32's

    @property
    def linear_bytes(self) -> int:
        """Bytes of the Linear model's weights and biases (also the size the Llama checkpoint aims at)."""
        return self.layers * (self.hidden * self.hidden + self.hidden) * 4

    @property
    def llama_shape(self) -> LlamaShape:
        """The Llama checkpoint's shape, for ``from_pretrained``."""
        return LlamaShape.for_size(self.linear_bytes, self.max_hidden)

    @property
    def model_bytes(self) -> int:
        """Bytes of the weights of the model the bench runs, as stored."""
        fp32 = self.llama_shape.model_bytes if self.from_pretrained else self.linear_bytes
        return fp32 * STORAGE_DTYPES[self.storage_dtype] // 4

    @property
    def model_kind(self) -> str:
        """``llama`` (a checkpoint loaded by from_pretrained) or ``linear`` (a Sequential built in RAM)."""
        return "llama" if self.from_pretrained else "linear"

    @classmethod
    def from_json(cls, entry: dict) -> BenchConfig:
        """The config of a JSON entry (a worker's ``--config``, or a report's ``config``; other keys ignored)."""
        values = {f.name: entry[f.name] for f in fields(cls) if f.name in entry}
        return cls(**values | {"batches": tuple(entry["batches"]), "resident_shares": tuple(entry["resident_shares"])})


def hidden_for_size(size_bytes: int, layers: int) -> int:
    """The hidden size (a multiple of 128) that makes ``layers`` fp32 Linear layers weigh about ``size_bytes``."""
    return max(128, round((size_bytes / (4 * layers)) ** 0.5 / 128) * 128)


def squeezed_max_hidden(free_ram: int, max_hidden: int = LLAMA_MAX_HIDDEN) -> int:
    """The largest Llama hidden size (a multiple of 128) whose 3 staging buffers (one decoder layer each, 49 bytes
    per hidden²) stay within ``SQUEEZE_STAGING_SHARE`` of ``free_ram``."""
    return max(128, min(max_hidden, int((SQUEEZE_STAGING_SHARE * free_ram / (3 * 49)) ** 0.5) // 128 * 128))


def fits_in_ram(model_bytes: int, available_bytes: int) -> bool:
    """Whether a model of ``model_bytes`` fits in ``available_bytes`` of RAM with 2 GB to spare."""
    return model_bytes + RAM_HEADROOM_BYTES <= available_bytes
