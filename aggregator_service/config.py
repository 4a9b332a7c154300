"""The federation's configuration: one TOML file, read by the aggregator and by ``fedseg simulate``.

Sites never read this file: they receive what they need (model, training and codec settings) in
every round's ``TrainingConfig``, so one file at the aggregator configures the whole federation.

Example (every key optional; the defaults are below)::

    [federation]
    id = "demo"
    rounds = 3
    min_clients = 2          # a deadline can close a round once this many submitted
    max_clients = 3          # this many submissions close a round at once
    round_timeout_s = 600
    sites = ["site-1", "site-2", "site-3"]   # empty: any site may join
    max_update_bytes = 0     # 0: 2 x the dense fp32 model + 1 MiB

    [aggregation]
    strategy = "fedavg"      # fedavg | mean | median | trimmed_mean | fedadam | aam
    # and that strategy's own parameters only (strategies.py), e.g. trim_fraction = 0.2 for
    # trimmed_mean, or [aggregation.aam] max_weight = 0.5 for aam (aam.AAMConfig)

    [training]
    local_epochs = 1
    optimizer = "adam"       # adam | sgd (sgd's updates suit a top-k codec far better)
    learning_rate = 1e-4
    momentum = 0.0           # sgd only, in [0, 1)
    lr_schedule = "constant" # constant | cosine: round r trains with the rate the aggregator sends
    final_learning_rate = 0.0  # cosine: the rate it anneals towards by the last round
    batch_size = 2
    fedprox_mu = 0.0
    lambda_dice = 0.5
    seed = 0
    momentum_correction = 0.0  # DGC momentum correction over round updates, in [0, 1) (docs/compression.md)
    clip_norm = 0.0          # local gradient clipping (global L2 norm per step); 0: off
    keep_optimizer_state = false  # keep the site's optimizer state across rounds
    augmentation = "standard"  # standard | synthseg | contrast | none (client_agent/data/augment.py)

    [model]
    architecture = "transformer_unet"
    in_channels = 1
    out_channels = 4
    img_size = [48, 48, 48]
    patch_size = []          # train and predict on windows of this size (e.g. [32, 32, 32]); []: whole volumes
    [model.options]
    channels = [8, 16, 32]

    [codec]
    top_k_fraction = 1.0
    quantization = "fp32"    # fp32 | fp16 | int8 | int4 | sign (with top-k: STC; dense: EF-signSGD)
    zstd_level = 3
    byte_budget = 0          # bytes per update (0: off); k per tensor is then chosen to fit
    warmup_rounds = 0        # DGC sparsity warm-up: top_k_fraction falls from warmup_start_fraction
    warmup_start_fraction = 0.25  # to top_k_fraction over the first warmup_rounds rounds
    warmup_start_budget = 0  # byte-budget warm-up (0: off): byte_budget falls from this many bytes
                             # to byte_budget over the first warmup_rounds rounds

Every table is strict: a key it does not know is refused by name, with the allowed ones. This
module is the only reader of the file: :func:`read_config_tables` parses it once, and a program
that keeps tables of its own in the same file (``fedseg simulate``'s ``[simulation]``) names them
as ``extensions`` and gets them back raw (:func:`load_federation_file`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from aggregator_service import strategies
from codec import CodecSpec
from codec.spec import MAX_BYTE_BUDGET
from protos.fedsegnet.v1.training_options import AUGMENTATIONS, check_optimizer

# The local optimizers a site can run (client_agent.training.make_optimizer builds them; the
# aggregator does not import torch, so the names are repeated here and a test keeps them equal).
LR_SCHEDULES = ("constant", "cosine")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A federation configuration that cannot be used; the message names the key and what is allowed."""


@dataclass(frozen=True)
class ModelConfig:
    """The network every site builds (see ``model.build_model``)."""

    architecture: str = "transformer_unet"
    in_channels: int = 1
    out_channels: int = 4
    img_size: tuple[int, int, int] = (48, 48, 48)
    options: Mapping[str, Any] = field(default_factory=dict)
    # The voxel spacing (mm, isotropic) the model sees its scans at; recorded so that inference
    # (`fedseg segment`) resamples any scan to it. 0: unknown (whole scans resized to img_size).
    spacing_mm: float = 0.0
    # The window (D, H, W) the network trains and predicts on (ModelSpec field 7): sites train on
    # random windows of it and every prediction slides windows of it over the volume. () = the whole
    # img_size volume. Smaller windows make a step cheaper (about in proportion to their voxels).
    patch_size: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not (isinstance(self.spacing_mm, (int, float)) and 0.0 <= float(self.spacing_mm) < 100.0):
            raise ConfigError(f"model.spacing_mm must be a number of mm in [0, 100) (0: unknown), got {self.spacing_mm!r}")
        if not self.architecture:
            raise ConfigError("model.architecture must name a registered network, got an empty string")
        if self.in_channels < 1:
            raise ConfigError(f"model.in_channels must be >= 1, got {self.in_channels}")
        if self.out_channels < 2:
            raise ConfigError(f"model.out_channels must be >= 2 (background + a class), got {self.out_channels}")
        if len(self.img_size) != 3 or any(int(s) < 1 for s in self.img_size):
            raise ConfigError(f"model.img_size must be three positive sizes (D, H, W), got {list(self.img_size)}")
        object.__setattr__(self, "img_size", tuple(int(s) for s in self.img_size))
        patch = tuple(self.patch_size)
        if patch:
            if len(patch) != 3 or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in patch):
                raise ConfigError(f"model.patch_size must be three positive sizes (D, H, W) or [] (the whole "
                                  f"img_size volume), got {list(patch)}")
            if any(p > s for p, s in zip(patch, self.img_size)):
                raise ConfigError(f"model.patch_size {list(patch)} must fit in model.img_size {list(self.img_size)} "
                                  "along every axis")
        object.__setattr__(self, "patch_size", patch)


@dataclass(frozen=True)
class TrainingSettings:
    """What each site does in a round."""

    local_epochs: int = 1
    learning_rate: float = 1e-4
    batch_size: int = 2
    fedprox_mu: float = 0.0
    lambda_dice: float = 0.5
    seed: int = 0
    optimizer: str = "adam"
    momentum: float = 0.0
    lr_schedule: str = "constant"
    final_learning_rate: float = 0.0
    # Sparse-update techniques (docs/compression.md), carried in TrainingConfig fields 11-13.
    momentum_correction: float = 0.0
    clip_norm: float = 0.0
    keep_optimizer_state: bool = False
    # The sites' on-the-fly augmentation recipe (TrainingConfig field 20).
    augmentation: str = "standard"

    def __post_init__(self) -> None:
        if self.augmentation not in AUGMENTATIONS:
            raise ConfigError(f"training.augmentation must be one of {list(AUGMENTATIONS)}, got {self.augmentation!r}")
        if not (isinstance(self.momentum_correction, (int, float)) and 0.0 <= self.momentum_correction < 1.0):
            raise ConfigError(f"training.momentum_correction must be in [0, 1) (0: off), got {self.momentum_correction!r}")
        if not (isinstance(self.clip_norm, (int, float)) and math.isfinite(self.clip_norm) and self.clip_norm >= 0.0):
            raise ConfigError(f"training.clip_norm must be a finite number >= 0 (0: off), got {self.clip_norm!r}")
        if not isinstance(self.keep_optimizer_state, bool):
            raise ConfigError(f"training.keep_optimizer_state must be true or false, got {self.keep_optimizer_state!r}")
        if self.local_epochs < 1:
            raise ConfigError(f"training.local_epochs must be >= 1, got {self.local_epochs}")
        if not self.learning_rate > 0:
            raise ConfigError(f"training.learning_rate must be > 0, got {self.learning_rate}")
        try:
            check_optimizer(self.optimizer, self.momentum)
        except ValueError as exc:
            raise ConfigError(f"training.{exc}") from None
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"training.lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0.0 <= self.final_learning_rate <= self.learning_rate:
            raise ConfigError(
                f"training.final_learning_rate must be in [0, learning_rate = {self.learning_rate}], "
                f"got {self.final_learning_rate}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"training.batch_size must be >= 1, got {self.batch_size}")
        if self.fedprox_mu < 0:
            raise ConfigError(f"training.fedprox_mu must be >= 0, got {self.fedprox_mu}")
        if not 0.0 <= self.lambda_dice <= 1.0:
            raise ConfigError(f"training.lambda_dice must be in [0, 1], got {self.lambda_dice}")

    def learning_rate_at(self, round_id: int, rounds: int) -> float:
        """The learning rate sites train round ``round_id`` (1-based) of ``rounds`` with.

        ``cosine`` anneals from ``learning_rate`` in round 1 towards ``final_learning_rate``:
        ``final + (lr - final) * (1 + cos(pi * (r - 1) / rounds)) / 2``, so the last round still
        trains (a little above ``final``). The aggregator computes it from the round number alone
        and sends it in the round's ``TrainingConfig``: it keeps no state, and a site resuming a
        round gets the same rate.
        """
        if self.lr_schedule == "constant":
            return self.learning_rate
        r = min(max(round_id, 1), rounds)  # rounds >= 1: FederationConfig checks it
        cosine = (1.0 + math.cos(math.pi * (r - 1) / rounds)) / 2.0
        return self.final_learning_rate + (self.learning_rate - self.final_learning_rate) * cosine


@dataclass(frozen=True)
class SparsityWarmup:
    """``[codec] warmup_rounds`` / ``warmup_start_fraction``: DGC's sparsity warm-up (Lin et al. 2018).

    Over the first ``warmup_rounds`` rounds the top-k fraction the aggregator sends falls
    exponentially from ``warmup_start_fraction`` to the configured ``top_k_fraction``:
    ``f_r = start * (target / start) ** ((r - 1) / warmup_rounds)`` for ``r <= warmup_rounds``,
    the target from round ``warmup_rounds + 1`` on (so round 1 sends ``start``). Like the
    learning-rate schedule it is a function of the round number alone (no aggregator state).

    ``warmup_start_budget`` is the same schedule for ``byte_budget``: with a budget ``B`` and a
    start ``B0 > B``, round ``r <= warmup_rounds`` sends ``round(B0 * (B / B0) ** ((r - 1) /
    warmup_rounds))`` bytes, ``B`` after. A budget that suits a long run lets too few entries
    through for a short one to move far from the initial model; the early, larger budgets do
    that moving while the update is large, and cost bytes only in the first rounds.
    :class:`FederationConfig` checks it against the codec (it needs a budget below it).
    """

    rounds: int = 0
    start_fraction: float = 0.25
    start_budget: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 0:
            raise ConfigError(f"codec.warmup_rounds must be an integer >= 0 (0: off), got {self.rounds!r}")
        if not (isinstance(self.start_fraction, (int, float)) and 0.0 < self.start_fraction <= 1.0):
            raise ConfigError(f"codec.warmup_start_fraction must be in (0, 1], got {self.start_fraction!r}")
        budget = self.start_budget
        if isinstance(budget, bool) or not isinstance(budget, int) or not 0 <= budget <= MAX_BYTE_BUDGET:
            raise ConfigError(
                f"codec.warmup_start_budget must be an integer number of bytes in [0, {MAX_BYTE_BUDGET}] "
                f"(0: off), got {budget!r}"
            )

    def fraction_at(self, round_id: int, target: float) -> float:
        """The top-k fraction of round ``round_id`` (1-based) when the configured one is ``target``."""
        if self.rounds == 0 or round_id > self.rounds or self.start_fraction <= target:
            return target
        step = (max(round_id, 1) - 1) / self.rounds
        return float(self.start_fraction * (target / self.start_fraction) ** step)

    def budget_at(self, round_id: int, target: int) -> int:
        """The byte budget of round ``round_id`` (1-based) when the configured one is ``target``.

        ``target`` 0 (no budget) stays 0: a warm-up cannot turn a dense codec into a budgeted one.
        """
        if self.rounds == 0 or round_id > self.rounds or target <= 0 or self.start_budget <= target:
            return target
        step = (max(round_id, 1) - 1) / self.rounds
        # Between target and start_budget whatever the rounding: target/start < 1, step in [0, 1).
        return int(round(self.start_budget * (target / self.start_budget) ** step))


WARMUP_KEYS = {
    "warmup_rounds": "rounds",
    "warmup_start_fraction": "start_fraction",
    "warmup_start_budget": "start_budget",
}


@dataclass(frozen=True)
class FederationConfig:
    """Everything the aggregator needs to run a federation."""

    federation_id: str = "fedsegnet"
    rounds: int = 3
    min_clients: int = 2
    max_clients: int = 2
    round_timeout_s: float = 600.0
    sites: tuple[str, ...] = ()
    max_update_bytes: int = 0
    strategy: str = "fedavg"
    strategy_options: Mapping[str, Any] = field(default_factory=dict)
    """The ``[aggregation]`` table's other keys, as written (the stored form compares them)."""
    training: TrainingSettings = field(default_factory=TrainingSettings)
    model: ModelConfig = field(default_factory=ModelConfig)
    codec: CodecSpec = field(default_factory=CodecSpec)
    warmup: SparsityWarmup = field(default_factory=SparsityWarmup)
    aggregation: strategies.Strategy = field(init=False, repr=False, compare=False)
    """The strategy object ``strategy`` and ``strategy_options`` configure (built and checked once)."""

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"federation.rounds must be >= 1, got {self.rounds}")
        if self.min_clients < 1:
            raise ConfigError(f"federation.min_clients must be >= 1, got {self.min_clients}")
        if self.max_clients < self.min_clients:
            raise ConfigError(
                f"federation.max_clients ({self.max_clients}) must be >= min_clients ({self.min_clients})"
            )
        if self.sites and len(self.sites) < self.min_clients:
            raise ConfigError(
                f"federation.sites lists {len(self.sites)} sites but min_clients is {self.min_clients}"
            )
        if len(set(self.sites)) != len(self.sites):
            raise ConfigError(f"federation.sites has duplicates: {list(self.sites)}")
        if not self.round_timeout_s > 0:
            raise ConfigError(f"federation.round_timeout_s must be > 0, got {self.round_timeout_s}")
        if self.max_update_bytes < 0:
            raise ConfigError(f"federation.max_update_bytes must be >= 0, got {self.max_update_bytes}")
        self._check_budget_warmup()
        if "strategy" in self.strategy_options:
            raise ConfigError("[aggregation]: give the strategy as `strategy`, not inside its options")
        try:
            built = strategies.from_table({"strategy": self.strategy, **self.strategy_options})
        except ValueError as exc:
            raise ConfigError(f"[aggregation]: {exc}") from None
        object.__setattr__(self, "aggregation", built)

    def _check_budget_warmup(self) -> None:
        """``codec.warmup_start_budget`` only makes sense above a byte budget, with warm-up rounds."""
        start, budget = self.warmup.start_budget, self.codec.byte_budget
        if start == 0:
            return
        if budget <= 0:
            raise ConfigError(
                f"codec.warmup_start_budget = {start} warms up a byte budget, but codec.byte_budget is 0 "
                "(off): set codec.byte_budget to the bytes per update after the warm-up, or "
                "warmup_start_budget = 0"
            )
        if start <= budget:
            raise ConfigError(
                f"codec.warmup_start_budget = {start} must be larger than codec.byte_budget = {budget} "
                "(the warm-up starts above the budget and falls to it), or 0 for no budget warm-up"
            )
        if self.warmup.rounds <= 0:
            raise ConfigError(
                f"codec.warmup_start_budget = {start} needs codec.warmup_rounds > 0 (the rounds over "
                "which the budget falls to codec.byte_budget), got warmup_rounds = 0"
            )
        if self.max_update_bytes and start > self.max_update_bytes:
            raise ConfigError(
                f"codec.warmup_start_budget = {start} is above federation.max_update_bytes = "
                f"{self.max_update_bytes}: round 1's uploads would be refused; lower it or raise the limit"
            )

    def codec_at(self, round_id: int) -> CodecSpec:
        """The codec sites encode round ``round_id`` with (the sparsity and budget warm-ups applied)."""
        fraction = self.warmup.fraction_at(round_id, self.codec.top_k_fraction)
        budget = self.warmup.budget_at(round_id, self.codec.byte_budget)
        if fraction == self.codec.top_k_fraction and budget == self.codec.byte_budget:
            return self.codec
        return dataclasses.replace(self.codec, top_k_fraction=fraction, byte_budget=budget)

    def to_json(self) -> str:
        """A canonical JSON form, stored with the federation so a restart can detect a changed config."""
        fields_ = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        data = {k: asdict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in fields_.items()}
        if not self.warmup.start_budget:
            # Off: written as before the key existed, so a store created then still restarts.
            del data["warmup"]["start_budget"]
        if not self.model.patch_size:
            del data["model"]["patch_size"]  # whole volumes: as before the key existed
        return json.dumps(data, sort_keys=True, default=list)


_SECTION_KEYS: dict[str, set[str]] = {
    "federation": {"id", "rounds", "min_clients", "max_clients", "round_timeout_s", "sites", "max_update_bytes"},
    "aggregation": set(),  # the chosen strategy's parameters: checked by strategies.from_table
    "training": {f.name for f in fields(TrainingSettings)},
    "model": {f.name for f in fields(ModelConfig)},
    "codec": {f.name for f in fields(CodecSpec)} | set(WARMUP_KEYS),
}


def read_config_tables(path: str | Path | None = None, *, text: str | None = None, source: str = "") -> dict[str, Any]:
    """Parse a federation TOML file (or its ``text``) into its tables, without checking them.

    The one place the federation file is parsed; callers then build the configuration with
    :func:`parse_federation_config` (which checks every table).

    Raises:
        ConfigError: the file does not exist or is not TOML (named).
    """
    source = source or str(path or "<config>")
    if text is None:
        if path is None:
            raise ValueError("give a path or the text")
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"federation config {path} does not exist") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"federation config {source} is not valid TOML: {exc}") from None


def parse_federation_config(
    data: Mapping[str, Any], *, source: str = "<config>", extensions: tuple[str, ...] = ()
) -> FederationConfig:
    """Build a :class:`FederationConfig` from parsed TOML, refusing unknown sections and keys.

    ``extensions`` names tables another program keeps in the same file (e.g. ``simulation``):
    they are skipped here, and that program checks them.
    """
    unknown_sections = set(data) - set(_SECTION_KEYS) - set(extensions)
    if unknown_sections:
        raise ConfigError(
            f"{source}: unknown section(s) {sorted(unknown_sections)}; allowed: {sorted(_SECTION_KEYS)}"
        )
    for section, allowed in _SECTION_KEYS.items():
        if not isinstance(data.get(section, {}), Mapping):
            raise ConfigError(f"{source}: [{section}] must be a table, got {data[section]!r}")
        if section == "aggregation":
            continue
        extra = set(data.get(section, {})) - allowed
        if extra:
            raise ConfigError(f"{source}: unknown key(s) {sorted(extra)} in [{section}]; allowed: {sorted(allowed)}")

    fed = dict(data.get("federation", {}))
    agg = dict(data.get("aggregation", {}))
    try:
        model_data = dict(data.get("model", {}))
        if "img_size" in model_data:
            model_data["img_size"] = tuple(model_data["img_size"])
        if "patch_size" in model_data:
            if not isinstance(model_data["patch_size"], (list, tuple)):
                raise ConfigError(f"model.patch_size must be a list of three sizes, e.g. [32, 32, 32], or [] "
                                  f"(whole volumes), got {model_data['patch_size']!r}")
            model_data["patch_size"] = tuple(model_data["patch_size"])
        codec_data = dict(data.get("codec", {}))
        warmup = SparsityWarmup(**{WARMUP_KEYS[k]: codec_data.pop(k) for k in list(codec_data) if k in WARMUP_KEYS})
        return FederationConfig(
            federation_id=str(fed.get("id", "fedsegnet")),
            rounds=int(fed.get("rounds", 3)),
            min_clients=int(fed.get("min_clients", 2)),
            max_clients=int(fed["max_clients"] if "max_clients" in fed else fed.get("min_clients", 2)),
            round_timeout_s=float(fed.get("round_timeout_s", 600.0)),
            sites=tuple(str(s) for s in fed.get("sites", ())),
            max_update_bytes=int(fed.get("max_update_bytes", 0)),
            strategy=str(agg.pop("strategy", "fedavg")),
            strategy_options=agg,
            training=TrainingSettings(**data.get("training", {})),
            model=ModelConfig(**model_data),
            codec=CodecSpec(**codec_data),
            warmup=warmup,
        )
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from None


@dataclass(frozen=True)
class FederationFile:
    """A federation TOML file read once: its configuration, and the raw tables of ``extensions``."""

    config: FederationConfig
    extensions: Mapping[str, Mapping[str, Any]]
    tables: Mapping[str, Any]
    """Every table as parsed (for programs that rewrite the file, e.g. the experiments)."""


def load_federation_file(
    path: str | Path | None = None, *, text: str | None = None, source: str = "", extensions: tuple[str, ...] = ()
) -> FederationFile:
    """Read and check a federation TOML file that may also hold the tables ``extensions`` names."""
    source = source or str(path or "<config>")
    data = read_config_tables(path, text=text, source=source)
    config = parse_federation_config(data, source=source, extensions=extensions)
    return FederationFile(config, {name: dict(data.get(name, {})) for name in extensions}, data)


def load_federation_config(path: str | Path, *, extensions: tuple[str, ...] = ()) -> FederationConfig:
    """Read and validate a federation TOML file."""
    return load_federation_file(path, extensions=extensions).config
