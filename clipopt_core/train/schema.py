"""One way to turn user settings into the frozen configs of :mod:`clipopt_core.train.config`.

The launchpad (Dagster), a Pipes/torchrun stage request and the CLI's ``--config`` file all go
through :func:`stage_config`: the defaults are the dataclasses' own (per stage kind, the paper's
recipe), and every value is checked against :data:`RANGES` here, so an error names the field,
the value and what is allowed, wherever it came from. Settings are *flat*: the fields of
:class:`TrainConfig` sit beside the stage's own (``{"lr": 1e-4, "last_blocks": 2}``); a nested
``{"train": {...}}`` is accepted too.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Mapping, Union

from clipopt_core.train.config import MiningConfig, RealignConfig, RetrievalConfig, TrainConfig

StageConfig = Union[RetrievalConfig, RealignConfig]

# Allowed ranges: ge/gt/le/lt as in pydantic's Field (the launchpad uses the same dict).
RANGES: dict[str, dict[str, float]] = {
    "epochs": {"ge": 1}, "batch_size": {"ge": 2}, "lr": {"gt": 0.0}, "lr_floor": {"ge": 0.0},
    "weight_decay": {"ge": 0.0}, "eps": {"gt": 0.0}, "grad_clip": {"gt": 0.0}, "accumulation_steps": {"ge": 1},
    "eval_every_steps": {"ge": 1}, "patience": {"ge": 1}, "checkpoint_every_steps": {"ge": 1}, "max_steps": {"ge": 1},
    "proxy_lr_multiplier": {"gt": 0.0}, "arc_scale": {"gt": 0.0}, "arc_margin": {"ge": 0.0, "lt": 1.5},
    "mc_weight": {"ge": 0.0, "lt": 1.0}, "max_negative_weight": {"ge": 0.0}, "num_workers": {"ge": 0},
    "patch_dropout": {"ge": 0.0, "lt": 1.0}, "last_blocks": {"ge": 0}, "max_logit_scale": {"gt": 1.0},
    "top_k": {"ge": 1, "le": 1000}, "threshold": {"ge": -1.0, "le": 1.0}, "threshold_quantile": {"gt": 0.0, "lt": 1.0},
    "chunk_size": {"ge": 1},
    "val_max_images": {"ge": 1}, "val_max_pairs": {"ge": 1},  # None = the whole split (docs/method.md#validation)
}
# Fields a kind does not expose: stage 1 has no multi-caption term.
HIDDEN: dict[str, frozenset[str]] = {
    "retrieval": frozenset({"mc_weight", "max_negative_weight", "max_negative"}),
    "mcip": frozenset(), "realign": frozenset(),
}
_CHECKS = {"ge": (lambda v, b: v >= b, "≥"), "gt": (lambda v, b: v > b, ">"),
           "le": (lambda v, b: v <= b, "≤"), "lt": (lambda v, b: v < b, "<")}


def default_config(kind: str) -> StageConfig:
    """The paper's recipe for a stage kind (``retrieval``, ``mcip`` or ``realign``)."""
    if kind == "retrieval":
        return RetrievalConfig()
    if kind == "mcip":
        return RetrievalConfig(mc_weight=0.25)
    if kind == "realign":
        return RealignConfig()
    raise ValueError(f"unknown stage kind {kind!r}; one of retrieval, mcip, realign")


def flat_defaults(kind: str) -> dict[str, Any]:
    """``{field: default}`` of a kind's settings, train fields first (what the launchpad shows)."""
    config = default_config(kind)
    stage_fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "train"}
    return {k: v for k, v in {**_as_dict(config.train), **stage_fields}.items() if k not in HIDDEN[kind]}


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a config dataclass (its module uses postponed annotations)."""
    return typing.get_type_hints(cls)


def stage_config(kind: str, settings: Mapping[str, Any] | None = None) -> StageConfig:
    """``settings`` (flat or with a nested ``train``) over :func:`default_config`, validated."""
    settings = dict(settings or {})
    nested = settings.pop("train", None) or {}
    defaults = default_config(kind)
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    train = {**_as_dict(defaults.train), **nested, **{k: v for k, v in settings.items() if k in train_names}}
    own = {k: v for k, v in settings.items() if k not in train_names}
    hidden = sorted(HIDDEN[kind] & set(own))
    if hidden:
        raise ValueError(f"{kind} stage: {', '.join(hidden)} cannot be set (only MCIP has a multi-caption term)")
    config = from_dict(type(defaults), {**{f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)},
                                        **own, "train": from_dict(TrainConfig, train)})
    if kind == "mcip" and not config.mc_weight > 0:
        raise ValueError(f"mcip stage: mc_weight must be > 0 (the paper uses 0.25), got {config.mc_weight}")
    return config


def mining_config(settings: Mapping[str, Any] | None = None) -> MiningConfig:
    """``settings`` over :class:`MiningConfig`'s defaults, validated."""
    return from_dict(MiningConfig, {**_as_dict(MiningConfig()), **(settings or {})})


def from_dict(cls: type, values: Mapping[str, Any]) -> Any:
    """Build config dataclass ``cls`` from ``values``: unknown keys, wrong types and out-of-range
    values raise ``ValueError`` naming the field; lists become tuples where the field is a tuple."""
    types_ = field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {', '.join(unknown)}; known: {', '.join(sorted(types_))}")
    checked = {name: _check(cls.__name__, name, types_[name], value) for name, value in values.items()}
    return cls(**checked)


def _check(owner: str, name: str, annotation: Any, value: Any) -> Any:
    """``value`` converted to ``annotation`` (int→float, list→tuple), else ``ValueError``."""
    if dataclasses.is_dataclass(value):
        return value
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check(owner, name, inner[0], value) if len(inner) == 1 else value
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{owner}.{name} must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{owner}.{name} must be a list of {len(args)} numbers; got {value!r}")
        return tuple(_check(owner, name, arg, item) for arg, item in zip(args, value))
    if annotation is bool and not isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be true or false; got {value!r}")
    if annotation in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                        or (annotation is int and not float(value).is_integer())):
        raise ValueError(f"{owner}.{name} must be {'an integer' if annotation is int else 'a number'}; got {value!r}")
    if annotation is str and not isinstance(value, str):
        raise ValueError(f"{owner}.{name} must be a string; got {value!r}")
    value = annotation(value) if annotation in (int, float) else value
    for bound, limit in RANGES.get(name, {}).items():
        test, sign = _CHECKS[bound]
        if not test(value, limit):
            raise ValueError(f"{owner}.{name} must be {sign} {limit}; got {value!r}")
    return value


def _as_dict(config: Any) -> dict[str, Any]:
    """Top-level fields of a dataclass instance (not recursive, unlike ``dataclasses.asdict``)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
