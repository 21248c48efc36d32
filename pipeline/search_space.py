"""The tune YAML (``base`` + ``search`` + ``tune``): parsing and validation, without Ray.

Everything here runs before Ray starts, so a bad search space costs nothing but a one-line error::

    base:                      # the training config every trial starts from
      config: configs/synthetic.yaml
      overrides: {eval.every_epochs: 1, optim.epochs: 6}
    search:                    # dotted config key -> one distribution
      data.clip_len: {choice: [2, 4, 8]}
      loss.lambda_reg: {loguniform: [1.0e-5, 1.0e-2]}
      variant:                 # reserved key: named bundles of overrides (model variants)
        grid:
          - {name: temporal_pooling, model.kind: temporal_pooling}
          - {name: sta}
    tune: {num_samples: 4, search_alg: random, metric: mAP, scheduler: asha}

Each key of the space is checked by applying every value it can take (choice/grid values, the bounds
of ranges) to the base config through ``apply_overrides``: unknown keys, wrong types and impossible
values fail here with the config's own message.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError, field_validator

from pipeline.config import (Config, ConfigError, Section, apply_overrides, config_error, load_config, parse_override,
                             parse_text, read_yaml, yaml_load, yaml_problem)

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "grid", "randint")
EVAL_METRICS = ("mAP", "rank1", "rank5", "rank10", "rank20")
VARIANT_KEY = "variant"  # reserved search key: a named bundle of overrides per value


class SearchSpaceError(ConfigError):
    """A bad tune YAML: one line, starting with the offending key."""


@dataclass
class Dist:
    kind: str  # one of DISTRIBUTIONS
    args: list  # choice/grid: the values; ranges: [lo, hi]


class TuneSettings(Section):
    """The ``tune:`` section: how many trials, which search algorithm and scheduler, where results go."""

    num_samples: int = Field(1, ge=1)  # random: trials; grid: repeats of the whole grid
    seed: int = 0  # seeds the sampler (trial configs are reproducible)
    search_alg: Literal["random", "grid", "optuna"] = "random"
    metric: str = Field("mAP", min_length=1)
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1)  # epochs before ASHA may stop a trial
    max_t: int = Field(0, ge=0)  # 0 = the base config's optim.epochs
    reduction_factor: float = Field(2.0, gt=1)
    max_concurrent: int = Field(0, ge=0)  # 0 = derived from the cluster's CPUs/GPUs and one trial's needs
    storage_path: str = Field("runs/tune", min_length=1)  # local path or s3://bucket/prefix; trial checkpoints go below it
    name: str = "sta-tune"  # the search's folder under storage_path
    out: str = ""  # best_config.yaml, trials.csv/md, sweep.png; default: <storage_path>/<name> when local
    # the trial's driver function (resource -> amount)
    resources: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=lambda: {"CPU": 1.0})

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or "/" in v:
            raise ValueError(f"must be a non-empty name without '/', got {v!r}")
        return v


@dataclass
class TuneSpec:
    base: Config  # base config with the base overrides applied
    search: dict[str, Dist]
    variants: dict[str, dict[str, Any]]  # variant name -> overrides (empty without a variant key)
    tune: TuneSettings
    source: dict[str, Any]  # the YAML as read (logged as params of the parent run)


def _fail(key: str, msg: str) -> SearchSpaceError:
    return SearchSpaceError(f"{key}: {msg}")


def _number(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(key, f"bounds must be numbers, got {v!r}")
    return float(v)


def parse_dist(key: str, spec: Any) -> Dist:
    """``{choice: [...]}`` etc. → :class:`Dist`; bad shapes and bounds raise :class:`SearchSpaceError`."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise _fail(key, f"expected one distribution mapping like {{choice: [...]}} ({', '.join(DISTRIBUTIONS)}), "
                         f"got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        raise _fail(key, f"unknown distribution {kind!r} (valid: {', '.join(DISTRIBUTIONS)})")
    if not isinstance(args, list) or not args:
        raise _fail(key, f"{kind} needs a non-empty list, got {args!r}")
    if kind in ("choice", "grid"):
        return Dist(kind, list(args))
    if len(args) != 2:
        raise _fail(key, f"{kind} needs [lo, hi], got {args!r}")
    lo, hi = (_number(key, v) for v in args)
    if not lo < hi:
        raise _fail(key, f"{kind} needs lo < hi, got [{args[0]}, {args[1]}]")
    if kind == "loguniform" and lo <= 0:
        raise _fail(key, f"loguniform needs lo > 0, got {args[0]}")
    if kind == "randint":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in args):
            raise _fail(key, f"randint bounds must be integers, got {args!r}")
        return Dist(kind, [int(args[0]), int(args[1])])
    return Dist(kind, [lo, hi])


def probe_values(d: Dist) -> list[Any]:
    """Values a distribution can produce that are worth checking against the config (all, or the bounds)."""
    if d.kind in ("choice", "grid"):
        return d.args
    if d.kind == "randint":  # Ray's randint excludes hi
        return [d.args[0], d.args[1] - 1]
    return [d.args[0], d.args[1]]


def _variant_table(d: Dist) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for i, item in enumerate(d.args):
        where = f"search.{VARIANT_KEY}[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise _fail(where, f"a variant is a mapping with a 'name' and dotted overrides, got {item!r}")
        if item["name"] in table:
            raise _fail(where, f"duplicate variant name {item['name']!r}")
        table[item["name"]] = {k: v for k, v in item.items() if k != "name"}
    return table


def check_search(base: Config, search: dict[str, Dist], variants: dict[str, dict[str, Any]]) -> None:
    """Apply every probe value of every key to ``base``; a failure names ``search.<key>`` and the value."""
    for key, d in search.items():
        if key == VARIANT_KEY:
            for name, overrides in variants.items():
                try:
                    apply_overrides(base, overrides)
                except ConfigError as exc:
                    raise _fail(f"search.{VARIANT_KEY}[{name}]", str(exc)) from None
            continue
        for value in probe_values(d):
            try:
                apply_overrides(base, {key: value})
            except ConfigError as exc:
                raise _fail(f"search.{key}", f"value {value!r} rejected: {exc}") from None


def _settings(raw: Any) -> TuneSettings:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _fail("tune", f"expected a mapping, got {type(raw).__name__}")
    try:
        return TuneSettings.model_validate(raw)
    except ValidationError as exc:
        raise SearchSpaceError(str(config_error(exc, TuneSettings, "tune"))) from None


def _check_alg(settings: TuneSettings, search: dict[str, Dist]) -> None:
    if settings.search_alg == "grid":
        for key, d in search.items():
            if d.kind not in ("grid", "choice"):
                raise _fail(f"search.{key}", f"{d.kind} cannot be enumerated with tune.search_alg=grid "
                                             f"(use grid or choice)")
    if settings.search_alg == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise _fail("tune.search_alg", "optuna is not installed (pip install optuna), use random or grid") from None
        for key, d in search.items():
            if d.kind == "grid":
                raise _fail(f"search.{key}", "grid cannot be combined with tune.search_alg=optuna (use choice)")


def _resolve_base_path(path: str, yaml_path: Optional[Path]) -> Path:
    """A base config path is relative to the working directory, else to the tune YAML's folder."""
    p = Path(path)
    if p.is_absolute() or p.exists() or yaml_path is None:
        return p
    beside = yaml_path.parent / p
    return beside if beside.exists() else p


def _split_overrides(overrides: list[str]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """CLI ``key=value``: ``tune.x`` → settings, ``search.<key>`` → space entry, the rest → base config."""
    tune_kv: dict[str, Any] = {}
    search_kv: dict[str, Any] = {}
    base: list[str] = []
    for text in overrides:
        key, raw = parse_override(text)
        if key.startswith("tune."):
            try:  # parsed by the setting's own type
                tune_kv[key[len("tune."):]] = parse_text(TuneSettings, key[len("tune."):], raw)
            except ConfigError as exc:
                raise SearchSpaceError(f"tune.{exc}") from None
        elif key.startswith("search."):
            try:  # a distribution is a YAML mapping: {choice: [1, 2]}
                search_kv[key[len("search."):]] = yaml_load(raw, key)
            except yaml.YAMLError as exc:
                raise _fail(key, f"{raw!r} is not valid YAML: {yaml_problem(exc)}") from None
        else:
            base.append(text)
    return tune_kv, search_kv, base


def parse_tune_config(raw: dict[str, Any], *, yaml_path: Optional[Path] = None,
                      overrides: Optional[list[str]] = None) -> TuneSpec:
    """A tune YAML mapping (+ CLI overrides) → validated :class:`TuneSpec`."""
    if not isinstance(raw, dict):
        raise _fail("--config", "a tune YAML is a mapping with base, search and tune sections")
    for k in raw:
        if k not in ("base", "search", "tune"):
            raise _fail(k, "unknown section (valid: base, search, tune)")
    tune_kv, search_kv, cli_base = _split_overrides(overrides or [])

    base_raw = raw.get("base") or {}
    if not isinstance(base_raw, dict) or set(base_raw) - {"config", "overrides"}:
        raise _fail("base", f"expected {{config: PATH, overrides: {{dotted.key: value}}}}, got {base_raw!r}")
    base_over = base_raw.get("overrides") or {}
    if not isinstance(base_over, dict):
        raise _fail("base.overrides", f"expected a mapping of dotted keys, got {base_over!r}")
    path = base_raw.get("config")
    base_path = _resolve_base_path(path, yaml_path) if path else None
    try:
        base = load_config(base_path)
        base = apply_overrides(base, base_over)
        if cli_base:
            base = _apply_cli(base, cli_base)
    except ConfigError as exc:
        raise _fail("base", str(exc)) from None

    if not isinstance(raw.get("search") or {}, dict):
        raise _fail("search", "expected a mapping of dotted config keys to distributions")
    search_raw = {**(raw.get("search") or {}), **search_kv}
    if not search_raw:
        raise _fail("search", "the search space is empty")
    search = {str(k): parse_dist(f"search.{k}", v) for k, v in search_raw.items()}
    if VARIANT_KEY in search and search[VARIANT_KEY].kind not in ("choice", "grid"):
        raise _fail(f"search.{VARIANT_KEY}", "variants are enumerated: use choice or grid")
    variants = _variant_table(search[VARIANT_KEY]) if VARIANT_KEY in search else {}
    check_search(base, search, variants)

    if not isinstance(raw.get("tune") or {}, dict):
        raise _fail("tune", "expected a mapping")
    settings = _settings({**(raw.get("tune") or {}), **tune_kv})
    _check_alg(settings, search)
    if settings.max_t and settings.max_t > base.optim.epochs:
        raise _fail("tune.max_t", f"{settings.max_t} exceeds the base optim.epochs {base.optim.epochs}")
    if settings.scheduler == "asha" and base.eval.every_epochs != 1 and settings.metric in EVAL_METRICS:
        raise _fail("base.overrides", f"ASHA on {settings.metric} needs a value every epoch: set eval.every_epochs: 1")
    source = {"base": {"config": str(base_path) if base_path else None, "overrides": base_over,
                       "cli": cli_base},
              "search": {k: {d.kind: d.args} for k, d in search.items()},
              "tune": settings.model_dump()}
    return TuneSpec(base=base, search=search, variants=variants, tune=settings, source=source)


def _apply_cli(base: Config, texts: list[str]) -> Config:
    return apply_overrides(base, dict(parse_override(t) for t in texts))


def load_tune_config(path: Union[str, Path], overrides: Optional[list[str]] = None) -> TuneSpec:
    """Read and validate a tune YAML; every problem is a one-line :class:`SearchSpaceError`/ConfigError."""
    try:
        raw = read_yaml(path)
    except ConfigError as exc:
        raise SearchSpaceError(str(exc)) from None
    return parse_tune_config(raw or {}, yaml_path=Path(path), overrides=overrides)


def trial_overrides(spec: TuneSpec, params: dict[str, Any]) -> dict[str, Any]:
    """A trial's sampled params → dotted overrides (a variant name expands to its bundle)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key == VARIANT_KEY:
            out.update(spec.variants[value])
        else:
            out[key] = value
    return out


def to_ray_space(spec: TuneSpec) -> dict[str, Any]:
    """The ``param_space`` for ``ray.tune.Tuner`` (imports Ray: call after validation only)."""
    from ray import tune

    out: dict[str, Any] = {}
    grid_mode = spec.tune.search_alg == "grid"
    for key, d in spec.search.items():
        values = list(spec.variants) if key == VARIANT_KEY else d.args
        if d.kind == "grid" or (grid_mode and d.kind == "choice"):
            out[key] = tune.grid_search(values)
        elif d.kind == "choice":
            out[key] = tune.choice(values)
        elif d.kind == "uniform":
            out[key] = tune.uniform(*d.args)
        elif d.kind == "loguniform":
            out[key] = tune.loguniform(*d.args)
        else:
            out[key] = tune.randint(*d.args)
    return out


def num_trials(spec: TuneSpec) -> int:
    """How many trials the search runs (grid entries multiply; num_samples repeats)."""
    grid_mode = spec.tune.search_alg == "grid"
    n = 1
    for d in spec.search.values():
        if d.kind == "grid" or (grid_mode and d.kind == "choice"):
            n *= len(d.args)
    return n * spec.tune.num_samples


def is_finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
