"""`CodecSpec`: how a sender encodes its tensors (sparsify -> quantize -> zstd)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Mapping

from .errors import CodecError

__all__ = [
    "CodecSpec",
    "LOSSLESS",
    "QUANTIZATIONS",
    "TOP_K_SCOPES",
    "MAX_BLOCK_SIZE",
    "MAX_ZSTD_LEVEL",
    "MAX_BYTE_BUDGET",
]

QUANTIZATIONS = ("fp32", "fp16", "int8", "int4", "sign")
TOP_K_SCOPES = ("tensor", "global")
MAX_BLOCK_SIZE = 1 << 20
MAX_ZSTD_LEVEL = 22
_MAX_SEED = (1 << 64) - 1
MAX_BYTE_BUDGET = (1 << 63) - 1


@dataclass(frozen=True)
class CodecSpec:
    """Sender-side encoding settings; the receiver needs none of them (frames describe themselves).

    Attributes:
        top_k_fraction: fraction of each floating tensor's entries to send, in (0, 1]; the rest
            stay in the sender's error-feedback residual. 1.0 sends every entry (dense).
        top_k_scope: ``"tensor"`` keeps the largest ``ceil(fraction * n)`` magnitudes of each
            tensor; ``"global"`` keeps the largest ``ceil(fraction * N)`` over all floating
            tensors of the update (needs a first pass over the tensors to find the threshold).
        quantization: value format of the sent entries: ``"fp32"`` sends them losslessly in the
            tensor's own dtype, ``"fp16"`` as IEEE half, ``"int8"``/``"int4"`` as signed integer
            codes with one float32 scale (max magnitude) per ``block_size`` values, ``"sign"`` as
            one bit each, decoded as ``±`` the mean magnitude of the tensor's sent entries (one
            float32 per tensor). ``"sign"`` with top-k is Sparse Ternary Compression (Sattler et
            al. 2019), dense it is error-feedback signSGD's scaled sign (Karimireddy et al. 2019).
        block_size: values per quantization block (int8/int4), in [1, 2**20]; ``"sign"``
            keeps one scale per tensor, as published, and ignores it.
        stochastic_rounding: round int8/int4 codes up or down at random with probabilities that
            make the code unbiased; seeded by ``seed``, the tensor name and the part number.
        zstd_level: zstd level for frame payloads, 1..22; 0 disables zstd. Payloads zstd cannot
            shrink are sent uncompressed whatever the level.
        seed: seed of the stochastic rounding; vary it per round for independent rounding noise.
        byte_budget: bytes the update's frames may take in all (0 = off). When set, the encoder
            chooses how many entries of each floating tensor to send so that the frames fit
            (codec.budget: tensors get entries in proportion to their share of the update's
            energy); ``top_k_fraction`` then caps the share of each tensor's entries, and
            ``top_k_scope`` must stay ``"tensor"``. The residual keeps what is not sent.

    Integer and boolean tensors (e.g. BatchNorm's ``num_batches_tracked``) are always sent dense
    and lossless: sparsifying or quantizing a counter is meaningless.

    Protobuf mapping (``fedsegnet.v1.CodecSpec``, where a zero value means "default"): see
    :meth:`from_message` and :meth:`to_fields`.
    """

    top_k_fraction: float = 1.0
    top_k_scope: str = "tensor"
    quantization: str = "fp32"
    block_size: int = 256
    stochastic_rounding: bool = False
    zstd_level: int = 3
    seed: int = 0
    byte_budget: int = 0

    def __post_init__(self) -> None:
        fraction = self.top_k_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
            raise CodecError(f"top_k_fraction must be a number in (0, 1], got {fraction!r}")
        if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
            raise CodecError(f"top_k_fraction must be in (0, 1], got {fraction}")
        object.__setattr__(self, "top_k_fraction", float(fraction))
        if self.top_k_scope not in TOP_K_SCOPES:
            raise CodecError(f"top_k_scope must be one of {TOP_K_SCOPES}, got {self.top_k_scope!r}")
        if self.quantization not in QUANTIZATIONS:
            raise CodecError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        self._set_int("block_size", 1, MAX_BLOCK_SIZE)
        if not isinstance(self.stochastic_rounding, bool):
            raise CodecError(f"stochastic_rounding must be a bool, got {self.stochastic_rounding!r}")
        if self.stochastic_rounding and self.quantization not in ("int8", "int4"):
            raise CodecError(
                "stochastic_rounding applies to quantization 'int8' or 'int4' only, "
                f"got quantization={self.quantization!r}"
            )
        self._set_int("zstd_level", 0, MAX_ZSTD_LEVEL, note=" (0 = no zstd)")
        self._set_int("seed", 0, _MAX_SEED)
        self._set_int("byte_budget", 0, MAX_BYTE_BUDGET, note=" (0 = no budget)")
        if self.byte_budget and self.top_k_scope != "tensor":
            raise CodecError(
                "byte_budget allocates entries to tensors itself; top_k_scope must be 'tensor' with it, "
                f"got {self.top_k_scope!r}"
            )

    def _set_int(self, name: str, low: int, high: int, note: str = "") -> None:
        """Check an integer field (numpy integers accepted) and store it as a plain int."""
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise CodecError(f"{name} must be an integer in [{low}, {high}]{note}, got {value!r}")
        value = int(value)
        if not low <= value <= high:
            raise CodecError(f"{name} must be in [{low}, {high}]{note}, got {value}")
        object.__setattr__(self, name, value)

    @property
    def lossless(self) -> bool:
        """True when every entry is sent bit-exactly (dense, no quantization, no budget)."""
        return not self.sparse and self.quantization == "fp32"

    @property
    def sparse(self) -> bool:
        """True when top-k sparsification or a byte budget may drop entries."""
        return self.top_k_fraction < 1.0 or self.byte_budget > 0

    @classmethod
    def from_message(cls, msg: Any) -> "CodecSpec":
        """Build a spec from a ``fedsegnet.v1.CodecSpec`` message (or any object/mapping with its fields).

        Protobuf has no "unset" for scalars, so a zero value ("" / 0 / 0.0 / False) means the
        default here. Two fields need care:

        * ``zstd_level``: 0 means the default level (3); a negative level means "no zstd"
          (``CodecSpec.zstd_level == 0``).
        * ``top_k_fraction`` is a float32 on the wire, so 0.01 arrives as 0.009999999776...;
          it is snapped to 7 significant digits, which gives back the decimal a person wrote.

        Missing attributes also mean the default, so an older message still parses.
        """
        def get(name: str) -> Any:
            if isinstance(msg, Mapping):
                return msg.get(name)
            return getattr(msg, name, None)

        defaults = cls()
        kwargs: dict[str, Any] = {}
        fraction = get("top_k_fraction")
        if fraction:
            kwargs["top_k_fraction"] = float(f"{float(fraction):.7g}")
        for name in ("top_k_scope", "quantization", "block_size", "stochastic_rounding", "seed", "byte_budget"):
            value = get(name)
            kwargs[name] = value if value else getattr(defaults, name)
        level = get("zstd_level")
        if level is None or level == 0:
            kwargs["zstd_level"] = defaults.zstd_level
        elif isinstance(level, numbers.Integral) and not isinstance(level, bool) and level < 0:
            kwargs["zstd_level"] = 0
        else:
            kwargs["zstd_level"] = level
        return cls(**kwargs)

    def to_fields(self) -> dict[str, Any]:
        """Field values for ``fedsegnet.v1.CodecSpec(**spec.to_fields())``.

        The inverse of :meth:`from_message`: "no zstd" is written as ``zstd_level = -1`` because
        0 on the wire means the default level.
        """
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.zstd_level == 0:
            values["zstd_level"] = -1
        return values


LOSSLESS = CodecSpec(zstd_level=0)
"""Dense, bit-exact, no zstd: the global model and saved state use this.

No zstd because trained float32 weights are noise to it (measured: 7-8% smaller, on the demo
model and on a 100M-parameter one) while compressing and decompressing them was about 1.5 s of a
100M-parameter round close (benchmarks/README.md). Sites re-encode the global model with this spec
to check a delta download's digest, so it must not change within a release; the deltas themselves
are zstd-compressed (codec.delta)."""
