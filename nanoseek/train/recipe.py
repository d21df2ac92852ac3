"""Training recipes: flat dataclasses on one base (RunRecipe), read from TOML or YAML, every field overridable by name.

    out = "runs/shakespeare"       # run folder
    data = "data/shakespeare"      # a folder written by `nanoseek data prepare`
    preset = "small"               # or config = "path/config.json", or init_from = "a/model/folder"
    [model]                        # optional ModelConfig overrides
    num_hidden_layers = 4
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ConfigError
from ..precision import PRECISIONS

MODES = ("pretrain", "sft")
SCHEDULES = ("cosine", "wsd", "constant")
CHECKPOINT_FORMATS = ("auto", "full", "sharded")  # see train/sharded.py


@dataclass
class RunRecipe:
    """The fields every training run shares: the run folder, AdamW and its schedule, DeepSeek's bias
    update, the loop's stopping, logging and checkpoint settings. The recipes derive from it and change
    defaults with `recipe_defaults`; `validate` checks these fields, the recipes' own check theirs."""

    WHAT: ClassVar[str] = "recipe"  # how errors name the recipe
    RESUME_KEYS: ClassVar[tuple[str, ...]] = ()  # fields a resumed run must keep (data order and math depend on them)

    out: str = "runs/run"  # run folder
    tokenizer: str | None = None  # copied into the model folder
    seed: int = 0
    max_steps: int = 100
    max_seconds: float = 0.0  # also stop after this much CPU time of the process (0: no limit)
    # AdamW and schedule
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    schedule: str = "cosine"
    wsd_decay_fraction: float = 0.2  # WSD: the last fraction of steps decays linearly
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    bias_update_speed: float = 0.001  # gamma of DeepSeek's aux-loss-free routing-bias update (0: off)
    # evaluation, logging, checkpoints
    eval_every: int = 50
    log_every: int = 1
    save_every: int = 50
    keep_last: int = 2
    checkpoint_format: str = "auto"  # full: HF model/ + optimizer file; sharded: per-rank DCP; auto: sharded under torchrun
    resume: bool = False
    device: str = "auto"  # auto: cuda if available, else cpu
    progress: bool = True
    # precision and memory (docs/precision.md)
    precision: str = "auto"  # fp32 | bf16 (autocast, fp32 master weights) | auto: bf16 where a probe shows it pays
    activation_checkpointing: bool = False  # recompute each block in the backward: less memory, ~1/3 more compute
    peak_flops: float | None = None  # per-device peak for MFU (default: datasheet for known GPUs, else a probe)

    def bad(self, name: str, why: str, source: str | None = None):
        where = f" in {source}" if source else ""
        raise ConfigError(f"invalid {self.WHAT} field '{name}'{where}: {why} (got {getattr(self, name)!r})")

    def validate(self, source: str | None = None):
        for name, kind in field_types(type(self)).items():  # NaN passes every `< 0` check below
            if kind is float and not math.isfinite(getattr(self, name)):
                self.bad(name, "must be a finite number", source)
        if self.schedule not in SCHEDULES:
            self.bad("schedule", f"must be one of {SCHEDULES}", source)
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            self.bad("checkpoint_format", f"must be one of {CHECKPOINT_FORMATS}", source)
        if self.precision not in PRECISIONS:
            self.bad("precision", f"must be one of {PRECISIONS}", source)
        if self.peak_flops is not None and not (math.isfinite(self.peak_flops) and self.peak_flops > 0):
            self.bad("peak_flops", "must be a positive number of FLOP/s per device", source)
        for name in ("max_steps", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                self.bad(name, "must be at least 1", source)
        for name in ("max_seconds", "warmup_steps", "eval_every", "save_every", "weight_decay", "grad_clip",
                     "bias_update_speed"):
            if getattr(self, name) < 0:
                self.bad(name, "must be non-negative", source)
        if not self.lr > 0:
            self.bad("lr", "must be positive", source)
        for name in ("min_lr_ratio", "wsd_decay_fraction", "beta1", "beta2"):
            if not 0 <= getattr(self, name) <= 1:
                self.bad(name, "must be in [0, 1]", source)
        return self

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def recipe_defaults(**defaults):
    """Class decorator, under @dataclass: other defaults for fields a recipe inherits from RunRecipe
    (the fields keep their place and type)."""
    def apply(cls):
        inherited = {f.name: f for f in dataclasses.fields(cls)}  # the base's: cls is no dataclass yet
        annotations = cls.__dict__.get("__annotations__", {})
        for name, value in defaults.items():
            annotations[name] = inherited[name].type
            setattr(cls, name, value)
        cls.__annotations__ = {**{n: annotations[n] for n in defaults}, **annotations}
        return cls
    return apply


@dataclass
class TrainRecipe(RunRecipe):
    """Pretraining or SFT of a new model (preset / config) or of init_from's weights."""

    RESUME_KEYS: ClassVar[tuple[str, ...]] = ("data", "mode", "seed", "batch_size", "seq_len", "grad_accum")

    data: str = ""
    mode: str = "pretrain"  # sft: whole examples per row, attention kept inside each example
    # model: exactly one of preset / config / init_from (init_from loads weights, e.g. for SFT)
    preset: str | None = None
    config: str | None = None
    init_from: str | None = None
    model: dict = field(default_factory=dict)  # ModelConfig overrides (new models only)
    # batch: batch_size x seq_len tokens per micro-batch, grad_accum micro-batches per step
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    # DeepSeek's losses besides the bias update (0 switches each off)
    aux_loss_alpha: float = 0.0001  # sequence-wise auxiliary loss
    mtp_loss_weight: float = 0.3  # lambda
    # evaluation and samples
    eval_batches: int = 8
    sample_every: int = 0
    sample_prompt: str = ""
    sample_tokens: int = 48
    compile: bool = False  # torch.compile the model (routed experts stay eager); no gain measured on CPU
    usd_per_hour: float = 2.0

    def validate(self, source: str | None = None) -> "TrainRecipe":
        if self.mode not in MODES:
            self.bad("mode", f"must be one of {MODES}", source)
        super().validate(source)
        sources = [n for n in ("preset", "config", "init_from") if getattr(self, n)]
        if len(sources) != 1:
            where = f" in {source}" if source else ""
            raise ConfigError(f"recipe{where} must set exactly one of preset, config, init_from "
                              f"(got {sources or 'none'})")
        if not self.data:
            self.bad("data", "a prepared data folder is required", source)
        for name in ("batch_size", "seq_len", "grad_accum", "eval_batches"):
            if getattr(self, name) < 1:
                self.bad(name, "must be at least 1", source)
        for name in ("sample_every", "sample_tokens", "aux_loss_alpha", "mtp_loss_weight", "usd_per_hour"):
            if getattr(self, name) < 0:
                self.bad(name, "must be non-negative", source)
        return self


def field_types(cls) -> dict[str, Any]:
    """Field name -> type of a recipe dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(name: str, value: Any, kind, where: str) -> Any:
    """Check (and from strings, convert) a value to the field's type; ConfigError names the field."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        kind = options[0]
    if kind is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(f"recipe field '{name}'{where} must be a JSON object, got {value!r}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"recipe field '{name}'{where} must be a table/mapping, got {value!r}")
        return value
    if isinstance(value, str) and kind is not str:
        if kind is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        else:
            try:
                return kind(float(value)) if kind is int and "e" in value.lower() else kind(value)
            except ValueError:
                pass
        raise ConfigError(f"recipe field '{name}'{where} must be {kind.__name__}, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"recipe field '{name}'{where} must be {kind.__name__}, got {value!r}")
    return value


def read_recipe_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"recipe file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except Exception as e:  # the parsers' own messages carry the line
        raise ConfigError(f"cannot parse recipe {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must hold a table/mapping of fields")
    return data


def load_recipe(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainRecipe:
    """Recipe from a TOML/YAML/JSON file (optional), then `overrides` (field -> value or string)."""
    return load_recipe_as(TrainRecipe, path, overrides)


def load_recipe_as(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                   what: str = "recipe"):
    """A recipe dataclass `cls` (with a validate(source) method) from a file, then `overrides`; every
    value checked (and converted from strings) against the field's type; errors name the field."""
    types_ = field_types(cls)
    values: dict[str, Any] = {}
    layers = []
    if path is not None:
        layers.append((read_recipe_file(path), f" in {path}"))
    if overrides:
        layers.append((overrides, " on the command line"))
    for data, where in layers:
        for name, value in data.items():
            if name not in types_:
                raise ConfigError(f"unknown {what} field '{name}'{where}; known fields: {', '.join(types_)}")
            values[name] = _coerce(name, value, types_[name], where)
    return cls(**values).validate(str(path) if path else None)


def recipe_fields() -> dict[str, Any]:
    """Field name -> type, for building command-line options."""
    return field_types(TrainRecipe)
