import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, ConfigError, apply_overrides, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["synthetic", "tiny", "mars", "dukev"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert isinstance(cfg, Config)
    assert cfg.data.height % 8 == 0


def test_paper_recipe_in_mars_config():
    cfg = load_config(ROOT / "configs" / "mars.yaml")
    assert (cfg.model.trunk, cfg.model.last_stride, cfg.model.num_blocks, cfg.model.embed_dim) == ("resnet50", 1, 4, 1024)
    assert (cfg.data.height, cfg.data.width, cfg.data.clip_len, cfg.data.p, cfg.data.k) == (256, 128, 4, 16, 4)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.milestones, cfg.optim.epochs) == (3e-4, 5e-4, [200, 400], 600)
    assert cfg.loss.margin == 0.3


def test_speed_knobs_defaults_and_gpu_recipes():
    cfg = load_config(None)
    assert (cfg.model.channels_last, cfg.model.compile, cfg.model.compile_mode) == (False, False, "default")
    assert (cfg.deepspeed.reduce_bucket_size, cfg.deepspeed.allgather_bucket_size) == (5e7, 5e7)
    for name in ("mars", "dukev"):  # the GPU recipes run NHWC
        gpu = load_config(ROOT / "configs" / f"{name}.yaml")
        assert gpu.scaling.use_gpu and gpu.model.channels_last and gpu.deepspeed.reduce_bucket_size == 5e6
    cfg = load_config(None, ["model.compile=true", "model.compile_mode=max-autotune",
                             "deepspeed.reduce_bucket_size=2e6"])
    assert cfg.model.compile and cfg.model.compile_mode == "max-autotune"
    assert cfg.deepspeed.reduce_bucket_size == 2e6


def test_overrides_types_and_precedence(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"optim": {"lr": 0.01}, "data": {"clip_len": 6}}))
    cfg = load_config(p, ["optim.lr=1e-4", "data.p=4", "data.hflip=false", "optim.milestones=[5, 9]",
                          "tracking.tags={team: reid}", "model.pretrained=/w/r50.pth"])
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.data.clip_len == 6 and cfg.data.p == 4 and cfg.data.hflip is False
    assert cfg.optim.milestones == [5, 9]
    assert cfg.tracking.tags == {"team": "reid"}
    assert cfg.model.pretrained == "/w/r50.pth"
    assert load_config(None, ["model.pretrained=null"]).model.pretrained is None


def test_yaml_float_without_dot(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 3e-4\n")
    assert load_config(p).optim.lr == pytest.approx(3e-4)


@pytest.mark.parametrize("overrides, key", [
    (["optim.lrr=1"], "optim.lrr"),
    (["nosection.x=1"], "nosection"),
    (["data.clip_len=abc"], "data.clip_len"),
    (["data.clip_len=2.5"], "data.clip_len"),
    (["data.hflip=3"], "data.hflip"),
    (["optim.milestones=3"], "optim.milestones"),
    (["model.kind=transformer"], "model.kind"),
    (["model.num_blocks=3"], "model.num_blocks"),  # synthetic default: 128/8 = 16 rows, not 3 stripes
    (["data.height=100"], "data.height"),
    (["deepspeed.zero_stage=7"], "deepspeed.zero_stage"),
    (["deepspeed.precision=fp16"], "deepspeed.precision"),  # CPU
    (["data.p=1"], "data.p"),
    (["model.fusion=[max, sum]"], "model.fusion"),
    (["optim.lr=0"], "optim.lr"),
    (["data.dataset=market"], "data.dataset"),
    (["optim"], "optim"),
    (["deepspeed.reduce_bucket_size=0"], "deepspeed.reduce_bucket_size"),
    (["deepspeed.allgather_bucket_size=-5e7"], "deepspeed.allgather_bucket_size"),
    (["deepspeed.reduce_bucket_size=2.5"], "deepspeed.reduce_bucket_size"),
    (["deepspeed.reduce_bucket_size=.inf"], "deepspeed.reduce_bucket_size"),
    (["model.compile_mode=fastest"], "model.compile_mode"),
    (["model.compile=yes please"], "model.compile"),
    (["model.channels_last=1"], "model.channels_last"),
    (["data.decode=gpu"], "data.decode"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "synthetic.yaml", overrides)
    msg = str(e.value)
    assert msg.startswith(key), msg
    assert "\n" not in msg


def test_unknown_key_in_yaml_named_with_its_section(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  clip_length: 4\n")
    with pytest.raises(ConfigError, match=r"^data\.clip_length: unknown key"):
        load_config(p)


def test_stripes_checked_against_trunk_resolution():
    # resnet50 with last stride 1: 256/16 = 16 rows -> K=4 fine, K=5 impossible; last stride 2: 8 rows.
    load_config(ROOT / "configs" / "mars.yaml", ["model.num_blocks=8"])
    with pytest.raises(ConfigError, match="model.num_blocks"):
        load_config(ROOT / "configs" / "mars.yaml", ["model.num_blocks=5"])
    with pytest.raises(ConfigError, match="model.num_blocks"):
        load_config(ROOT / "configs" / "mars.yaml", ["model.last_stride=2", "model.num_blocks=16"])
    # temporal pooling has no stripes
    load_config(ROOT / "configs" / "mars.yaml", ["model.kind=temporal_pooling", "model.num_blocks=5"])


def test_shard_cache_knobs():
    cfg = load_config(None, ["data.cache_dir=/nvme/shards", "data.cache_gb=20"])
    assert cfg.data.cache_dir == "/nvme/shards" and cfg.data.cache_gb == 20.0
    assert load_config(None).data.cache_dir == ""  # off by default: the default data is local
    with pytest.raises(ConfigError, match=r"^data\.cache_gb"):
        load_config(None, ["data.cache_gb=0"])


def test_apply_overrides_and_flat_roundtrip():
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    new = apply_overrides(cfg, {"data.clip_len": 3, "loss.w_tri": 0.5})
    assert new.data.clip_len == 3 and new.loss.w_tri == 0.5 and cfg.data.clip_len == 2
    flat = new.flat()
    assert flat["data.clip_len"] == 3 and flat["data.synthetic.num_ids"] == 8
    assert load_config(None) == Config()  # no file, no overrides: the dataclass defaults
    # YAML dump → load gives the same config
    assert yaml.safe_load(new.to_yaml()) == new.to_dict()


def test_parse_override():
    assert parse_override("a.b=1e-4") == ("a.b", 1e-4)
    assert parse_override("a.b=s3://x/y.z") == ("a.b", "s3://x/y.z")
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_cli_exit_code_2_before_ray(tmp_path):
    """Config errors exit 2 with the key named, and never start Ray (no ray import at all)."""
    code = ("import sys, runpy; sys.argv=['pipeline.train', 'optim.lrr=1'];\n"
            "try:\n runpy.run_module('pipeline.train', run_name='__main__')\n"
            "except SystemExit as e:\n print('ray' in sys.modules, e.code)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False 2", out.stdout + out.stderr
    assert "optim.lrr" in out.stderr


def test_cli_missing_dataset_exit_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", "configs/mars.yaml",
                          f"data.shards={tmp_path}/nothing"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "data.shards" in out.stderr and "manifest.json" in out.stderr


def test_print_config():
    out = subprocess.run([sys.executable, "-m", "pipeline.train", "--print-config", "data.clip_len=7"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["data"]["clip_len"] == 7


def test_relative_paths_pinned_for_workers(tmp_path, monkeypatch):
    """Ray workers run in another cwd: the driver makes local relative paths absolute."""
    from pipeline.train import absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(load_config(ROOT / "configs" / "synthetic.yaml",
                                     ["model.pretrained=weights/r50.pth", "data.shards=s3://b/x"]))
    assert cfg.data.root == str(tmp_path / "data" / "synthetic")
    assert cfg.model.pretrained == str(tmp_path / "weights" / "r50.pth")
    assert cfg.data.shards == "s3://b/x"
