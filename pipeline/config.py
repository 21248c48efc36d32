"""The one typed configuration object: every knob of a run lives here.

A config is built from defaults, then a YAML file, then dotted ``key=value`` overrides
(``optim.lr=1e-4 data.clip_len=8``). The sections are pydantic models: each field's type parses and
checks its value, and cross-field rules are model validators. Unknown keys, wrong types and impossible
values raise :class:`ConfigError` with a one-line message naming the key, before any cluster work starts.

The field comments below are the config reference. Reading YAML, parsing ``key=value`` text and
rendering pydantic's errors as one line are in :mod:`pipeline.config_io`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# YAML, override parsing and error rendering live in config_io; they are re-exported here, so callers
# import every config name from this one module.
from pipeline.config_io import (ConfigError, KeyedError, config_error, field_of, parse_override, parse_text, read_yaml,
                                section_type, set_values, yaml_dump, yaml_load, yaml_problem)

__all__ = ["Config", "ConfigError", "KeyedError", "Section", "TRUNK_STRIDE", "apply_overrides", "config_error",
           "config_from_dict", "field_of", "load_config", "parse_override", "parse_text", "read_yaml", "set_values",
           "validate", "yaml_dump", "yaml_load", "yaml_problem"]


class Section(BaseModel):
    """Base of every config model: unknown keys are errors; YAML values are taken as typed (strict), so
    ``clip_len: 2.5`` or ``hflip: 1`` fail instead of being coerced. ``key=value`` text goes through
    :func:`parse_text` first, which parses it with the field's own type."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_are_defaults(cls, data: Any) -> Any:
        # `data:` with everything below it commented out loads as None: use the section's defaults.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and section_type(cls, k) is not None)}
        return data


# Total downsampling of each trunk with last_stride=1 (sta_model/backbone.py; last_stride=2 doubles it).
# A table, so validation never builds a model; tests/test_config.py checks it against the real trunks.
TRUNK_STRIDE = {"tiny": 8, "resnet18": 16, "resnet50": 16}


class SyntheticConfig(Section):
    """Size of the procedurally generated embedded dataset (``data.dataset=synthetic``)."""

    num_ids: int = Field(96, ge=2)
    num_test_ids: int = Field(64, ge=2)
    tracklets_per_id: int = Field(4, ge=1)
    min_frames: int = Field(8, ge=1)
    max_frames: int = 16
    height: int = Field(128, gt=0)
    width: int = Field(64, gt=0)
    num_cameras: int = Field(4, ge=2)  # query and gallery need different cameras
    occlusion_prob: float = Field(0.3, ge=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _frames(self) -> SyntheticConfig:
        if self.min_frames > self.max_frames:
            raise KeyedError("min_frames", f"need min_frames <= max_frames, got {self.min_frames} > {self.max_frames}")
        return self


class DataConfig(Section):
    dataset: Literal["synthetic", "mars", "dukev"] = "synthetic"
    root: str = "data/synthetic"  # raw dataset on disk (packed by `pipeline.pack`; synthetic generated here)
    shards: str = Field("data/shards/synthetic", min_length=1)  # shard prefix URL: path, file://, s3://bucket/prefix
    prepare: bool = True  # synthetic only: generate + pack when the manifest is missing
    clip_len: int = Field(4, ge=1)  # N frames per training clip
    height: int = Field(256, gt=0)
    width: int = Field(128, gt=0)
    # identities per GLOBAL batch (P x K clips over all ranks; each rank draws p / scaling.num_workers);
    # at least 2 for the triplet loss
    p: int = Field(16, ge=2)
    k: int = Field(4, ge=1)  # tracklets per identity
    batches_per_epoch: int = Field(0, ge=0)  # per rank; 0 = one pass over the train identities
    num_workers: int = Field(2, ge=0)  # DataLoader processes per training worker
    prefetch_factor: int = 2  # batches each loader process keeps ready (>= 1 with num_workers > 0)
    # loader processes forked once and kept for every epoch (with their batch buffers), instead of
    # a fork per epoch; false: a fresh loader per epoch (its start still overlaps the previous epoch)
    persistent_workers: bool = True
    hflip: bool = True
    random_erasing: float = Field(0.0, ge=0, le=1)  # a probability
    # where JPEGs are decoded: "loader" (DataLoader workers, libjpeg-turbo) or "device" (workers ship
    # the sampled JPEGs; the training process decodes on its device: nvJPEG on a GPU, needs torchvision)
    decode: Literal["loader", "device"] = "loader"
    # s3:// shards: local directory that keeps a copy of each shard after its first read (checked
    # against the manifest's sha256), so later epochs read local disk; "" streams every epoch
    cache_dir: str = ""
    cache_gb: float = Field(100.0, gt=0)  # the cache's size limit (least recently used shards are removed)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    @model_validator(mode="after")
    def _prefetch(self) -> DataConfig:
        if self.num_workers > 0 and self.prefetch_factor < 1:
            raise KeyedError("prefetch_factor", f"must be >= 1 with num_workers={self.num_workers} loader "
                                                f"processes, got {self.prefetch_factor}")
        return self


class ModelConfig(Section):
    kind: Literal["sta", "temporal_pooling"] = "sta"
    trunk: Literal["resnet50", "resnet18", "tiny"] = "resnet50"
    # trunk weights: an ImageNet state_dict (torchvision layout; path or URL), or an earlier run's export
    # (<run>/final or <run>/best, local or s3://), of which only the trunk is loaded
    pretrained: Optional[str] = None
    last_stride: int = Field(1, ge=1, le=2)  # 1 in the paper, 2 in the stock ResNet
    num_blocks: int = Field(4, ge=1)  # K horizontal stripes
    embed_dim: int = Field(1024, ge=1)
    fusion: list[Literal["max", "avg"]] = Field(default_factory=lambda: ["max", "avg"], min_length=1)
    attention_map: Literal["energy", "l2"] = "energy"  # STA spatial map: "energy" (sum_c f^2, paper) or "l2" (its sqrt, AGRL)
    # Frames enter the trunk as NHWC (channels_last): cuDNN's fastest conv layout with bf16/fp16
    # tensor cores; the GPU recipes (mars.yaml, dukev.yaml) set it, CPU runs gain nothing from it.
    channels_last: bool = False
    compile: bool = False  # torch.compile the model (DeepSpeed's engine.compile, inductor)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = "default"  # torch.compile mode

    @field_validator("fusion")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"each fusion appears once, got {v}")
        return v


class LossConfig(Section):
    w_tri: float = Field(1.0, ge=0)
    margin: float = Field(0.3, ge=0)
    soft_margin: bool = False
    w_ce: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    lambda_reg: float = Field(3e-4, ge=0)

    @model_validator(mode="after")
    def _some_loss(self) -> LossConfig:
        if self.w_tri == 0 and self.w_ce == 0:
            raise KeyedError("w_tri", "w_tri and w_ce cannot both be 0")
        return self


class OptimConfig(Section):
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = 0.9  # sgd only
    warmup_epochs: int = Field(0, ge=0)
    warmup_factor: float = 0.01
    milestones: list[int] = Field(default_factory=lambda: [200, 400])
    gamma: float = 0.1
    epochs: int = Field(600, ge=1)

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if v != sorted(v):
            raise ValueError(f"must be increasing, got {v}")
        return v


class DeepSpeedConfig(Section):
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # bf16 on GPUs that have it, fp16 (dynamic loss scale) on older GPUs, fp32 on CPU
    grad_clip: float = Field(0.0, ge=0)  # 0 = off
    grad_accum: int = Field(1, ge=1)
    # ZeRO 1/2 bucket sizes in elements (floats so 5e6 parses); docs/performance.md says why these.
    reduce_bucket_size: float = 5e7  # gradient reduce buckets; the GPU recipes set 5e6 to overlap backward
    allgather_bucket_size: float = 5e7  # parameter all-gather after the step: nothing to overlap

    @field_validator("reduce_bucket_size", "allgather_bucket_size")
    @classmethod
    def _whole(cls, v: float) -> float:
        if not (v >= 1 and float(v).is_integer()):
            raise ValueError(f"must be a whole number of elements > 0, got {v:g}")
        return v


class ScalingConfig(Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = 1.0  # only used with use_gpu
    resources_per_worker: dict[str, float] = Field(default_factory=dict)  # extra custom resources

    @model_validator(mode="after")
    def _gpus(self) -> ScalingConfig:
        if self.use_gpu and self.gpus_per_worker <= 0:
            raise KeyedError("gpus_per_worker", f"must be > 0 with use_gpu, got {self.gpus_per_worker:g}")
        return self


class CheckpointConfig(Section):
    storage_path: str = Field("runs", min_length=1)  # Ray RunConfig storage: local path or s3://bucket/prefix
    every_epochs: int = Field(1, ge=1)
    keep: int = Field(2, ge=1)  # last N kept, plus the best by `best_metric`
    best_metric: Literal["mAP", "rank1"] = "mAP"


class EvalConfig(Section):
    every_epochs: int = Field(10, ge=0)  # 0 = only at the end
    clip_len: int = Field(4, ge=1)  # N for test clips (all frames of a tracklet, cut into clips of N)
    clips_per_batch: int = Field(32, ge=1)
    rerank: bool = False
    rerank_k1: int = 20  # k-reciprocal re-ranking (Zhong et al. 2017) parameters
    rerank_k2: int = 6
    rerank_lambda: float = Field(0.3, ge=0, le=1)
    num_workers: int = Field(1, ge=0)

    @model_validator(mode="after")
    def _rerank(self) -> EvalConfig:
        if not 1 <= self.rerank_k2 <= self.rerank_k1 + 1:
            raise KeyedError("rerank_k2", f"need 1 <= rerank_k2 <= rerank_k1 + 1, got {self.rerank_k2} "
                                          f"with rerank_k1={self.rerank_k1}")
        return self


class TrackingConfig(Section):
    enabled: bool = True
    uri: Optional[str] = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working dir
    experiment: Optional[str] = None  # default: sta-<dataset>
    run_name: Optional[str] = None
    tags: dict[str, str] = Field(default_factory=dict)
    log_model: bool = True
    registered_model: Optional[str] = None  # register the final model under this name
    heatmaps: int = Field(4, ge=0)  # query clips drawn with their attention
    log_every_steps: int = Field(20, ge=1)  # step metrics are reduced across ranks this often (one sync each)


class FailureConfig(Section):
    max_failures: int = Field(2, ge=-1)  # Ray Train restarts from the latest checkpoint this many times (-1 = unlimited)


class Config(Section):
    name: str = "sta"
    seed: int = Field(0, ge=0)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    failure: FailureConfig = Field(default_factory=FailureConfig)

    @model_validator(mode="after")
    def _across_sections(self) -> Config:
        d, m = self.data, self.model
        stride = TRUNK_STRIDE[m.trunk] * m.last_stride
        if d.height % stride or d.width % stride:
            raise KeyedError("data.height", f"{d.height}x{d.width} is not divisible by the {m.trunk} trunk's "
                                            f"stride {stride}")
        if m.kind == "sta" and (d.height // stride) % m.num_blocks:
            raise KeyedError("model.num_blocks", f"feature map height {d.height // stride} (data.height {d.height} "
                                                 f"/ stride {stride}) is not divisible into {m.num_blocks} stripes")
        if self.deepspeed.precision == "fp16" and not self.scaling.use_gpu:
            raise KeyedError("deepspeed.precision", "fp16 needs GPUs (use auto, bf16 or fp32 on CPU)")
        if d.p % self.scaling.num_workers:
            raise KeyedError("data.p", f"{d.p} identities per global batch do not divide over "
                                       f"scaling.num_workers={self.scaling.num_workers} ranks")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def to_yaml(self) -> str:
        """YAML that loads back to an equal config (``--print-config``, checkpoints' config.yaml)."""
        return yaml_dump(self.to_dict())

    def flat(self) -> dict[str, Any]:
        """Dotted ``section.key -> value`` pairs (MLflow params, Tune search keys)."""
        return _flatten(type(self), self.to_dict())


def _flatten(cls: type[BaseModel], d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        sub = section_type(cls, k)
        out.update(_flatten(sub, v, f"{prefix}{k}.") if sub else {f"{prefix}{k}": v})
    return out


# --------------------------------------------------------------------------- entry points

def config_from_dict(values: Any) -> Config:
    """A nested mapping (YAML document, ``to_dict()``) → validated :class:`Config`."""
    if not isinstance(values, dict):
        raise ConfigError(f"--config: a config is a mapping of sections, got {type(values).__name__}")
    try:
        return Config.model_validate(values)
    except ValidationError as exc:
        raise config_error(exc, Config) from None


def validate(cfg: Config) -> Config:
    """Check a config again after attribute assignments (models do not validate on assignment)."""
    config_from_dict(cfg.to_dict())
    return cfg


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults ← YAML file ← dotted ``key=value`` overrides, type-checked and validated.

    Args:
        path: YAML file, or None for the defaults.
        overrides: ``section.key=value`` texts, applied in order.
    """
    tree = read_yaml(path) if path is not None else None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of sections, got {type(tree).__name__}")
    for text in overrides or []:
        set_values(Config, tree, dict([parse_override(text)]))
    return config_from_dict(tree)


def apply_overrides(cfg: Config, values: dict[str, Any]) -> Config:
    """A new config with dotted ``key -> value`` pairs applied (Ray Tune trials); text is parsed by type."""
    return config_from_dict(set_values(Config, cfg.to_dict(), values))
