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
    (["model.channels_last=2"], "model.channels_last"),
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
    # the value stays text: the field's type parses it (test_overrides_parsed_by_the_field_type)
    assert parse_override("a.b=1e-4") == ("a.b", "1e-4")
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
                          f"data.shards={tmp_path}/nothing", f"checkpoint.storage_path={tmp_path}/runs"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)  # local runs: no S3 credentials asked
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


# --------------------------------------------------------------------------- pydantic schema (issue 14 §1, 15 §D)

def test_overrides_parsed_by_the_field_type():
    """Text after ``=`` is parsed by the field's own type: numbers-looking text stays a string in str fields."""
    cfg = load_config(None, ["name=2024", "data.root=1.5", "tracking.run_name=2024", "optim.lr=1e-4",
                             "optim.milestones=[10,20]", "scaling.cpus_per_worker=1", "data.shards=s3://b/x.y",
                             "model.channels_last=1", "data.hflip=off"])
    assert (cfg.name, cfg.data.root, cfg.tracking.run_name) == ("2024", "1.5", "2024")
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.milestones == [10, 20]
    assert cfg.scaling.cpus_per_worker == 1.0 and isinstance(cfg.scaling.cpus_per_worker, float)
    assert cfg.data.shards == "s3://b/x.y"
    with pytest.raises(ConfigError, match=r"^tracking\.tags\.run: expected str"):  # YAML inside a dict field: typed
        load_config(None, ["tracking.tags={run: 7}"])
    assert cfg.model.channels_last is True and cfg.data.hflip is False  # pydantic's bool text: 1/0, on/off, true/false
    # apply_overrides: text is parsed the same way, typed values are checked as they are
    new = apply_overrides(cfg, {"data.clip_len": "3", "name": "7", "optim.gamma": 0.5})
    assert (new.data.clip_len, new.name, new.optim.gamma) == (3, "7", 0.5)


def test_yaml_values_are_typed_strictly(tmp_path):
    """A YAML file's values are taken as typed: no int from 2.5 or bool from 1, no str from a number."""
    p = tmp_path / "c.yaml"
    for text, key in [("data:\n  clip_len: 2.5\n", "data.clip_len"), ("model:\n  channels_last: 1\n", "model.channels_last"),
                      ("name: 2024\n", "name"), ("data:\n  hflip: 'true'\n", "data.hflip")]:
        p.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_config(p)
        assert str(e.value).startswith(f"{key}: expected"), str(e.value)
    p.write_text("name: '2024'\noptim:\n  lr: 1e-3\n  weight_decay: 5E-4\nscaling:\n  cpus_per_worker: 2\n")
    cfg = load_config(p)
    assert cfg.name == "2024" and (cfg.optim.lr, cfg.optim.weight_decay, cfg.scaling.cpus_per_worker) == (1e-3, 5e-4, 2.0)


def test_duplicate_yaml_key_is_an_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1.0e-3\n  epochs: 3\n  lr: 1.0e-2\n")
    with pytest.raises(ConfigError, match=r"^optim\.lr: duplicate key in .*c\.yaml \(lines 2 and 4\)$"):
        load_config(p)
    p.write_text("data:\n  p: 4\ndata:\n  k: 2\n")
    with pytest.raises(ConfigError, match=r"^data: duplicate key"):
        load_config(p)


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", b"\x00\x01\x02\x03", b"data: [1, 2\n"])
def test_unreadable_config_file_is_one_line(tmp_path, content):
    p = tmp_path / "c.yaml"
    p.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith("--config: ") and str(p) in msg and "\n" not in msg, msg


def test_commented_out_section_means_defaults(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ndata:\n#  p: 4\n#  k: 2\nmodel:\n  trunk: tiny\n  embed_dim: 32\noptim:\n")
    cfg = load_config(p)
    assert cfg.data == Config().data and cfg.optim == Config().optim and cfg.model.trunk == "tiny"
    assert load_config(p, ["data.p=4"]).data.p == 4  # an override into the empty section
    p.write_text("data:\n  synthetic:\n")
    assert load_config(p).data.synthetic == Config().data.synthetic


def test_unknown_keys_list_the_valid_ones(tmp_path):
    for overrides in (["optim.lrr=1"], ["data.synthetic.idz=1"]):
        with pytest.raises(ConfigError, match=r": unknown key \(valid: .*\)$") as e:
            load_config(None, overrides)
        assert ("epochs, gamma, lr" in str(e.value)) or ("num_ids" in str(e.value))
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"^optim\.lrr: unknown key \(valid: epochs, gamma, lr, milestones"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"^name: is not a section, cannot set name\.x"):
        load_config(None, ["name.x=1"])


@pytest.mark.parametrize("overrides, message", [
    (["seed=-1"], "seed: must be >= 0, got -1"),
    (["eval.num_workers=-1"], "eval.num_workers: must be >= 0, got -1"),
    (["data.num_workers=2", "data.prefetch_factor=0"],
     "data.prefetch_factor: must be >= 1 with num_workers=2 loader processes, got 0"),
    (["data.p=6", "scaling.num_workers=4"],
     "data.p: 6 identities per global batch do not divide over scaling.num_workers=4 ranks"),
    (["optim.lr=-1"], "optim.lr: must be > 0, got -1"),
    (["model.kind=lstm"], "model.kind: must be one of sta or temporal_pooling, got 'lstm'"),
    (["data.clip_len=2.5"], "data.clip_len: expected int, got '2.5'"),
    (["model.fusion=[]"], "model.fusion: must not be empty, got []"),
    (["data.shards="], "data.shards: must not be empty, got ''"),
    (["data.synthetic.min_frames=9", "data.synthetic.max_frames=8"],
     "data.synthetic.min_frames: need min_frames <= max_frames, got 9 > 8"),
])
def test_errors_are_one_line_with_the_key_first(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value) == message


def test_new_checks_accept_the_valid_side():
    load_config(None, ["data.num_workers=0", "data.prefetch_factor=0"])  # no loader processes: unused
    cfg = load_config(None, ["data.p=8", "scaling.num_workers=4", "seed=3", "eval.num_workers=0"])
    assert (cfg.data.p, cfg.scaling.num_workers) == (8, 4)


def test_stride_table_matches_the_trunks():
    """validate() uses a table instead of building a trunk: the table must agree with sta_model."""
    import torch

    from pipeline.config import TRUNK_STRIDE
    from sta_model.backbone import TRUNKS, build_trunk

    assert set(TRUNK_STRIDE) == set(TRUNKS)
    for name in TRUNKS:
        for last in (1, 2):
            with torch.device("meta"):
                assert build_trunk(name, last_stride=last).stride == TRUNK_STRIDE[name] * last, (name, last)


def test_loading_a_config_imports_no_torch():
    code = ("import sys; from pipeline.config import load_config; load_config('configs/mars.yaml', "
            "['model.num_blocks=8']); print('torch' in sys.modules, 'sta_model' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False False", out.stdout + out.stderr


def test_models_stay_mutable_and_validate_checks_again():
    from pipeline.config import validate

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    cfg.model.pretrained = "/w.pth"
    cfg.tracking.tags = {"a": "b"}
    assert validate(cfg) is cfg
    cfg.optim.lr = -1.0
    with pytest.raises(ConfigError, match=r"^optim\.lr: must be > 0"):
        validate(cfg)


def test_flat_keeps_mapping_fields_whole():
    flat = load_config(None, ["tracking.tags={team: reid}", "scaling.resources_per_worker={ssd: 1}"]).flat()
    assert flat["tracking.tags"] == {"team": "reid"} and flat["scaling.resources_per_worker"] == {"ssd": 1.0}
    assert flat["data.synthetic.num_ids"] == 96 and "data.synthetic" not in flat


@pytest.mark.parametrize("path", sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if p.name != "tune.yaml"))
def test_to_yaml_loads_back_equal(tmp_path, path):
    cfg = load_config(ROOT / "configs" / path, ["name=2024", "tracking.run_name=1e5", "tracking.tags={k: '3'}"])
    p = tmp_path / "back.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(p) == cfg


def test_print_config_loads_back_equal(tmp_path):
    overrides = ["name=2024", "optim.lr=1e-5", "data.root=1.5", "tracking.tags={team: reid}"]
    out = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", "configs/mars.yaml", "--print-config",
                          *overrides], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    p = tmp_path / "printed.yaml"
    p.write_text(out.stdout)
    assert load_config(p) == load_config(ROOT / "configs" / "mars.yaml", overrides)


@pytest.mark.parametrize("write, args, fragment", [
    (lambda p: p.write_text("optim:\n  lr: 1.0e-3\n  lr: 2.0e-3\n"), [], "config error: optim.lr: duplicate key"),
    (lambda p: p.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"), [], "config error: --config: "),
    (lambda p: p.write_text("{}\n"), ["optim.lrr=1"], "config error: optim.lrr: unknown key (valid: epochs, gamma"),
    (lambda p: p.write_text("{}\n"), ["seed=-1"], "config error: seed: must be >= 0, got -1"),
])
def test_cli_one_line_exit_2(tmp_path, write, args, fragment):
    p = tmp_path / "c.yaml"
    write(p)
    out = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", str(p), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(fragment), out.stderr


def test_public_names_stay_in_pipeline_config():
    """YAML, overrides and error rendering live in pipeline.config_io; callers keep importing pipeline.config."""
    import pipeline.config as config
    import pipeline.config_io as config_io

    for name in config.__all__:
        assert hasattr(config, name), name
    for name in ("ConfigError", "parse_override", "parse_text", "read_yaml", "yaml_load", "config_error"):
        assert getattr(config, name) is getattr(config_io, name), name
    with pytest.raises(config.ConfigError, match="optim.lr: duplicate key"):
        config_io.yaml_load("optim:\n  lr: 1\n  lr: 2\n")
