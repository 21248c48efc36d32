"""The one typed configuration object: every knob of a run lives here.

A config is built from defaults, then a YAML file, then dotted ``key=value`` overrides
(``optim.lr=1e-4 data.clip_len=8``). Unknown keys, wrong types and impossible values raise
:class:`ConfigError` with a one-line message naming the key, before any cluster work starts.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

DATASETS = ("synthetic", "mars", "dukev")
MODEL_KINDS = ("sta", "temporal_pooling")
TRUNKS = ("resnet50", "resnet18", "tiny")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile
OPTIMIZERS = ("adam", "adamw", "sgd")
FUSIONS = ("max", "avg")
ATTENTION_MAPS = ("energy", "l2")


class ConfigError(ValueError):
    """A bad configuration: the message is one line and starts with the offending key."""


@dataclass
class SyntheticConfig:
    """Size of the procedurally generated embedded dataset (``data.dataset=synthetic``)."""

    num_ids: int = 96
    num_test_ids: int = 64
    tracklets_per_id: int = 4
    min_frames: int = 8
    max_frames: int = 16
    height: int = 128
    width: int = 64
    num_cameras: int = 4
    occlusion_prob: float = 0.3
    seed: int = 0


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    root: str = "data/synthetic"  # raw dataset on disk (packed by `pipeline.pack`; synthetic generated here)
    shards: str = "data/shards/synthetic"  # shard prefix URL: path, file://, s3://bucket/prefix
    prepare: bool = True  # synthetic only: generate + pack when the manifest is missing
    clip_len: int = 4  # N frames per training clip
    height: int = 256
    width: int = 128
    p: int = 16  # identities per batch
    k: int = 4  # tracklets per identity
    batches_per_epoch: int = 0  # per rank; 0 = one pass over identities: ceil(train ids / (P * workers))
    num_workers: int = 2  # DataLoader processes per training worker
    prefetch_factor: int = 2
    # loader processes forked once and kept for every epoch (with their batch buffers), instead of
    # a fork per epoch; false: a fresh loader per epoch (its start still overlaps the previous epoch)
    persistent_workers: bool = True
    hflip: bool = True
    random_erasing: float = 0.0
    # where JPEGs are decoded: "loader" (DataLoader workers, libjpeg-turbo) or "device" (workers ship
    # the sampled JPEGs; the training process decodes on its device: nvJPEG on a GPU, needs torchvision)
    decode: str = "loader"
    # s3:// shards: local directory that keeps a copy of each shard after its first read (checked
    # against the manifest's sha256), so later epochs read local disk; "" streams every epoch
    cache_dir: str = ""
    cache_gb: float = 100.0  # the cache's size limit (least recently used shards are removed)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    kind: str = "sta"
    trunk: str = "resnet50"
    # trunk weights: an ImageNet state_dict (torchvision layout; path or URL), or an earlier run's export
    # (<run>/final or <run>/best, local or s3://), of which only the trunk is loaded
    pretrained: Optional[str] = None
    last_stride: int = 1
    num_blocks: int = 4  # K horizontal stripes
    embed_dim: int = 1024
    fusion: list[str] = field(default_factory=lambda: ["max", "avg"])
    attention_map: str = "energy"  # STA spatial map: "energy" (sum_c f^2, paper) or "l2" (its sqrt, AGRL)
    # Frames enter the trunk as NHWC (channels_last): cuDNN's fastest conv layout with bf16/fp16
    # tensor cores; the GPU recipes (mars.yaml, dukev.yaml) set it, CPU runs gain nothing from it.
    channels_last: bool = False
    compile: bool = False  # torch.compile the model (DeepSpeed's engine.compile, inductor)
    compile_mode: str = "default"  # torch.compile mode


@dataclass
class LossConfig:
    w_tri: float = 1.0
    margin: float = 0.3
    soft_margin: bool = False
    w_ce: float = 1.0
    label_smoothing: float = 0.0
    lambda_reg: float = 3e-4


@dataclass
class OptimConfig:
    optimizer: str = "adam"
    lr: float = 3e-4
    weight_decay: float = 5e-4
    momentum: float = 0.9  # sgd only
    warmup_epochs: int = 0
    warmup_factor: float = 0.01
    milestones: list[int] = field(default_factory=lambda: [200, 400])
    gamma: float = 0.1
    epochs: int = 600


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    precision: str = "auto"  # bf16 on GPUs that have it, fp16 (dynamic loss scale) on older GPUs, fp32 on CPU
    grad_clip: float = 0.0  # 0 = off
    grad_accum: int = 1
    # ZeRO 1/2 bucket sizes in elements (floats so 5e6 parses); docs/performance.md says why these.
    reduce_bucket_size: float = 5e7  # gradient reduce buckets; the GPU recipes set 5e6 to overlap backward
    allgather_bucket_size: float = 5e7  # parameter all-gather after the step: nothing to overlap


@dataclass
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # only used with use_gpu
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # extra custom resources


@dataclass
class CheckpointConfig:
    storage_path: str = "runs"  # Ray RunConfig storage: local path or s3://bucket/prefix
    every_epochs: int = 1
    keep: int = 2  # last N kept, plus the best by `best_metric`
    best_metric: str = "mAP"


@dataclass
class EvalConfig:
    every_epochs: int = 10  # 0 = only at the end
    clip_len: int = 4  # N for test clips (all frames of a tracklet, cut into clips of N)
    clips_per_batch: int = 32
    rerank: bool = False
    rerank_k1: int = 20  # k-reciprocal re-ranking (Zhong et al. 2017) parameters
    rerank_k2: int = 6
    rerank_lambda: float = 0.3
    num_workers: int = 1


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working dir
    experiment: Optional[str] = None  # default: sta-<dataset>
    run_name: Optional[str] = None
    tags: dict[str, str] = field(default_factory=dict)
    log_model: bool = True
    registered_model: Optional[str] = None  # register the final model under this name
    heatmaps: int = 4  # query clips drawn with their attention
    log_every_steps: int = 20  # step metrics are reduced across ranks this often (one sync each)


@dataclass
class FailureConfig:
    max_failures: int = 2  # Ray Train restarts from the latest checkpoint this many times
    inject_at_epoch: int = 0  # testing: rank 1 (or 0) exits after saving this epoch's checkpoint, once


@dataclass
class Config:
    name: str = "sta"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted ``section.key -> value`` pairs (MLflow params, Tune search keys)."""
        return _flatten(self.to_dict())


# --------------------------------------------------------------------------- type checking

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against annotation ``tp``; the only conversions are int→float and list→tuple-free."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if errors else ConfigError(f"{key}: must not be null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {type(value).__name__}")
        return _build(tp, value, prefix=key + ".")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(f"{key}.<key>", k, args[0]): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool (true/false), got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # programming error


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key (valid: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v) and k not in ("tags", "resources_per_worker"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("tags", "resources_per_worker"):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = d
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            if child is None and part not in node:
                raise ConfigError(f"{'.'.join(parts[:i + 1])}: unknown key")
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: is not a section, cannot set {dotted}")
        node = child
    if parts[-1] not in node:
        raise ConfigError(f"{dotted}: unknown key")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-4"`` → ``("optim.lr", 0.0001)``; values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"{text}: override must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{text}: empty key in override")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads 1e-4 as a string; accept the usual float spellings.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") and not value.startswith(("/", "s3:", "file:")) else value
        except ValueError:
            pass
    return key, value


def _yaml_floats(obj: Any) -> Any:
    """PyYAML leaves ``3e-4`` (no dot) as a string: turn such scalars into floats."""
    if isinstance(obj, dict):
        return {k: _yaml_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_yaml_floats(v) for v in obj]
    if isinstance(obj, str):
        s = obj.strip().lower()
        if s and s[0] in "+-.0123456789" and "e" in s:
            try:
                return float(s)
            except ValueError:
                return obj
    return obj


# --------------------------------------------------------------------------- semantic checks

def _trunk_stride(trunk: str, last_stride: int) -> int:
    """Total downsampling of a trunk, computed without allocating weights."""
    import torch

    from sta_model.backbone import build_trunk

    with torch.device("meta"):
        return int(build_trunk(trunk, last_stride=last_stride).stride)


def validate(cfg: Config) -> Config:
    """Impossible values → ConfigError naming the key."""
    d, m, o = cfg.data, cfg.model, cfg.optim

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    need(d.dataset in DATASETS, "data.dataset", f"must be one of {DATASETS}, got {d.dataset!r}")
    need(bool(d.shards), "data.shards", "shard URL must be set")
    need(d.clip_len >= 1, "data.clip_len", f"must be >= 1, got {d.clip_len}")
    need(d.p >= 2, "data.p", f"need at least 2 identities per batch for the triplet loss, got {d.p}")
    need(d.k >= 1, "data.k", f"must be >= 1, got {d.k}")
    need(d.height > 0 and d.width > 0, "data.height", "image size must be positive")
    need(d.batches_per_epoch >= 0, "data.batches_per_epoch", "must be >= 0 (0 = derived)")
    need(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    need(0.0 <= d.random_erasing <= 1.0, "data.random_erasing", "is a probability in [0, 1]")
    need(d.decode in ("loader", "device"), "data.decode", f"must be 'loader' or 'device', got {d.decode!r}")
    need(d.cache_gb > 0, "data.cache_gb", f"must be > 0, got {d.cache_gb}")
    s = d.synthetic
    need(s.num_ids >= 2 and s.num_test_ids >= 2, "data.synthetic.num_ids", "need >= 2 train and test ids")
    need(1 <= s.min_frames <= s.max_frames, "data.synthetic.min_frames", "need 1 <= min_frames <= max_frames")
    need(s.num_cameras >= 2, "data.synthetic.num_cameras", "need >= 2 cameras (query and gallery differ)")
    need(m.kind in MODEL_KINDS, "model.kind", f"must be one of {MODEL_KINDS}, got {m.kind!r}")
    need(m.trunk in TRUNKS, "model.trunk", f"must be one of {TRUNKS}, got {m.trunk!r}")
    need(m.last_stride in (1, 2), "model.last_stride", "must be 1 or 2")
    need(m.num_blocks >= 1, "model.num_blocks", "must be >= 1")
    need(m.embed_dim >= 1, "model.embed_dim", "must be >= 1")
    need(bool(m.fusion) and all(f in FUSIONS for f in m.fusion) and len(set(m.fusion)) == len(m.fusion),
         "model.fusion", f"a non-empty subset of {FUSIONS}, got {m.fusion}")
    need(m.attention_map in ATTENTION_MAPS, "model.attention_map",
         f"must be one of {ATTENTION_MAPS}, got {m.attention_map!r}")
    need(m.compile_mode in COMPILE_MODES, "model.compile_mode", f"must be one of {COMPILE_MODES}, got {m.compile_mode!r}")
    stride = _trunk_stride(m.trunk, m.last_stride)
    need(d.height % stride == 0 and d.width % stride == 0, "data.height",
         f"{d.height}x{d.width} is not divisible by the {m.trunk} trunk's stride {stride}")
    if m.kind == "sta":
        need((d.height // stride) % m.num_blocks == 0, "model.num_blocks",
             f"feature map height {d.height // stride} (data.height {d.height} / stride {stride}) "
             f"is not divisible into {m.num_blocks} stripes")
    L = cfg.loss
    need(L.w_tri >= 0 and L.w_ce >= 0 and L.lambda_reg >= 0, "loss", "weights must be >= 0")
    need(L.w_tri > 0 or L.w_ce > 0, "loss.w_tri", "w_tri and w_ce cannot both be 0")
    need(L.margin >= 0, "loss.margin", "must be >= 0")
    need(0 <= L.label_smoothing < 1, "loss.label_smoothing", "must be in [0, 1)")
    need(o.optimizer in OPTIMIZERS, "optim.optimizer", f"must be one of {OPTIMIZERS}")
    need(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    need(o.epochs >= 1, "optim.epochs", "must be >= 1")
    need(o.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
    need(list(o.milestones) == sorted(o.milestones), "optim.milestones", "must be increasing")
    ds = cfg.deepspeed
    need(ds.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be 0..3, got {ds.zero_stage}")
    need(ds.precision in PRECISIONS, "deepspeed.precision", f"must be one of {PRECISIONS}")
    need(ds.grad_accum >= 1, "deepspeed.grad_accum", "must be >= 1")
    need(ds.grad_clip >= 0, "deepspeed.grad_clip", "must be >= 0")
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        v = getattr(ds, key)
        need(v >= 1 and float(v).is_integer(), f"deepspeed.{key}", f"must be a whole number of elements > 0, got {v}")
    sc = cfg.scaling
    need(sc.num_workers >= 1, "scaling.num_workers", "must be >= 1")
    need(sc.cpus_per_worker > 0, "scaling.cpus_per_worker", "must be > 0")
    need(not sc.use_gpu or sc.gpus_per_worker > 0, "scaling.gpus_per_worker", "must be > 0 with use_gpu")
    need(not (ds.precision == "fp16" and not sc.use_gpu), "deepspeed.precision",
         "fp16 needs GPUs (use auto, bf16 or fp32 on CPU)")
    ck = cfg.checkpoint
    need(bool(ck.storage_path), "checkpoint.storage_path", "must be set")
    need(ck.keep >= 1, "checkpoint.keep", "must be >= 1")
    need(ck.every_epochs >= 1, "checkpoint.every_epochs", "must be >= 1")
    need(ck.best_metric in ("mAP", "rank1"), "checkpoint.best_metric", "must be mAP or rank1")
    ev = cfg.eval
    need(ev.every_epochs >= 0, "eval.every_epochs", "must be >= 0")
    need(ev.clip_len >= 1, "eval.clip_len", "must be >= 1")
    need(ev.clips_per_batch >= 1, "eval.clips_per_batch", "must be >= 1")
    need(1 <= ev.rerank_k2 <= ev.rerank_k1 + 1, "eval.rerank_k2", "need 1 <= rerank_k2 <= rerank_k1 + 1")
    need(0.0 <= ev.rerank_lambda <= 1.0, "eval.rerank_lambda", "must be in [0, 1]")
    need(cfg.failure.max_failures >= -1, "failure.max_failures", "must be >= -1 (-1 = unlimited)")
    need(cfg.tracking.heatmaps >= 0, "tracking.heatmaps", "must be >= 0")
    need(cfg.tracking.log_every_steps >= 1, "tracking.log_every_steps", "must be >= 1")
    return cfg


# --------------------------------------------------------------------------- entry points

def config_from_dict(values: dict[str, Any]) -> Config:
    return validate(_build(Config, _yaml_floats(values)))


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults ← YAML file ← dotted overrides, type-checked and validated."""
    merged = dataclasses.asdict(Config())
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config: {p} is not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config: {p} must hold a mapping of sections")
        # Build once to get unknown-key errors with their full dotted name.
        _build(Config, _yaml_floats(loaded))
        merged = _deep_merge(merged, loaded)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(merged, key, value)
    return config_from_dict(merged)


def apply_overrides(cfg: Config, values: dict[str, Any]) -> Config:
    """A new config with dotted ``key -> value`` pairs applied (used by Ray Tune trials)."""
    merged = cfg.to_dict()
    for key, value in values.items():
        _set_dotted(merged, key, value)
    return config_from_dict(merged)
