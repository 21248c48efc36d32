"""Tune YAML parsing and validation (no Ray started; the CLI check proves Ray is not even imported)."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config
from pipeline.search_space import (SearchSpaceError, load_tune_config, num_trials, parse_dist, parse_tune_config,
                                   probe_values, to_ray_space, trial_overrides)

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def spec_dict(search, tune=None, overrides=None):
    return {"base": {"config": TINY, "overrides": overrides or {"eval.every_epochs": 1}},
            "search": search, "tune": tune or {}}


def test_shipped_tune_configs_parse():
    for path in [ROOT / "configs" / "tune.yaml", *sorted((ROOT / "configs" / "ablation").glob("*.yaml"))]:
        if path.name == "base.yaml":
            load_config(path)  # the ablation's training config
            continue
        spec = load_tune_config(path)
        assert spec.search and num_trials(spec) >= 1, path
    spec = load_tune_config(ROOT / "configs" / "ablation" / "variants.yaml")
    # variants x seeds (the grids multiply); counted from the file, which the ablation edits
    assert num_trials(spec) == len(spec.variants) * len(spec.search["seed"].args) * spec.tune.num_samples
    assert len(spec.variants) >= 2 and spec.tune.search_alg == "grid"
    assert spec.variants["temporal_pooling"] == {"model.kind": "temporal_pooling"}


def test_distributions_and_overrides():
    spec = parse_tune_config(spec_dict({
        "data.clip_len": {"choice": [2, 4]}, "loss.w_tri": {"uniform": [0.5, 2]},
        "optim.lr": {"loguniform": [1e-4, 1e-2]}, "model.num_blocks": {"grid": [1, 2]},
        "loss.margin": {"randint": [0, 2]},
        "variant": {"grid": [{"name": "tp", "model.kind": "temporal_pooling"}, {"name": "sta"}]},
    }, tune={"num_samples": 3}), overrides=["optim.epochs=3", "tune.seed=7", "search.loss.w_ce={choice: [1.0]}"])
    assert spec.base.optim.epochs == 3 and spec.tune.seed == 7
    assert spec.search["loss.w_tri"].args == [0.5, 2.0]
    assert spec.search["loss.w_ce"].kind == "choice"
    assert num_trials(spec) == 2 * 2 * 3  # grid x variant grid x num_samples
    assert trial_overrides(spec, {"variant": "tp", "optim.lr": 1e-3}) == {"model.kind": "temporal_pooling",
                                                                           "optim.lr": 1e-3}
    from ray.tune.search.sample import Categorical, Float, Integer

    space = to_ray_space(spec)
    assert isinstance(space["data.clip_len"], Categorical) and isinstance(space["optim.lr"], Float)
    assert isinstance(space["loss.margin"], Integer)
    assert space["model.num_blocks"] == {"grid_search": [1, 2]}
    assert space["variant"] == {"grid_search": ["tp", "sta"]}
    assert probe_values(parse_dist("k", {"randint": [1, 5]})) == [1, 4]


def test_grid_mode_enumerates_choices():
    spec = parse_tune_config(spec_dict({"data.clip_len": {"choice": [2, 4, 6]}}, tune={"search_alg": "grid"}))
    assert num_trials(spec) == 3 and to_ray_space(spec)["data.clip_len"] == {"grid_search": [2, 4, 6]}


@pytest.mark.parametrize("search, tune, key, fragment", [
    ({"optim.lr": {"normal": [0, 1]}}, {}, "search.optim.lr", "unknown distribution 'normal'"),
    ({"optim.lr": {"uniform": [0.1, 0.01]}}, {}, "search.optim.lr", "lo < hi"),
    ({"optim.lr": {"uniform": [0.1, 0.1]}}, {}, "search.optim.lr", "lo < hi"),
    ({"optim.lr": {"loguniform": [0, 0.1]}}, {}, "search.optim.lr", "lo > 0"),
    ({"optim.lr": {"loguniform": [-1, 0.1]}}, {}, "search.optim.lr", "lo > 0"),
    ({"optim.lr": {"uniform": [0.1]}}, {}, "search.optim.lr", "[lo, hi]"),
    ({"optim.lr": {"uniform": ["a", 1]}}, {}, "search.optim.lr", "numbers"),
    ({"optim.lr": [1, 2]}, {}, "search.optim.lr", "one distribution mapping"),
    ({"optim.lr": {"choice": []}}, {}, "search.optim.lr", "non-empty list"),
    ({"data.clip_len": {"randint": [1.5, 4]}}, {}, "search.data.clip_len", "integers"),
    ({"optim.lrr": {"choice": [1e-3]}}, {}, "search.optim.lrr", "unknown key"),
    ({"nosection.x": {"choice": [1]}}, {}, "search.nosection.x", "unknown key"),
    ({"data.clip_len": {"uniform": [2, 8]}}, {}, "search.data.clip_len", "expected int"),
    ({"data.hflip": {"choice": [1, 0]}}, {}, "search.data.hflip", "expected bool"),
    ({"model.num_blocks": {"choice": [2, 3]}}, {}, "search.model.num_blocks", "stripes"),
    ({"model.kind": {"grid": ["sta", "lstm"]}}, {}, "search.model.kind", "must be one of"),
    ({"optim.lr": {"uniform": [1e-4, 1e-2]}}, {"search_alg": "grid"}, "search.optim.lr", "search_alg=grid"),
    ({"optim.lr": {"choice": [1e-3]}}, {"search_alg": "bayes"}, "tune.search_alg", "must be one of"),
    ({"optim.lr": {"choice": [1e-3]}}, {"num_sample": 3}, "tune.num_sample", "unknown key"),
    ({"optim.lr": {"choice": [1e-3]}}, {"num_samples": 0}, "tune.num_samples", ">= 1"),
    ({"optim.lr": {"choice": [1e-3]}}, {"reduction_factor": 1}, "tune.reduction_factor", "> 1"),
    ({"optim.lr": {"choice": [1e-3]}}, {"max_t": 99}, "tune.max_t", "exceeds"),
    ({"optim.lr": {"choice": [1e-3]}}, {"mode": "up"}, "tune.mode", "max or min"),
    ({"variant": {"grid": [{"model.kind": "temporal_pooling"}]}}, {}, "search.variant[0]", "'name'"),
    ({"variant": {"grid": [{"name": "a", "model.knd": "sta"}]}}, {}, "search.variant[a]", "model.knd"),
    ({"variant": {"uniform": [0, 1]}}, {}, "search.variant", "choice or grid"),
    ({}, {}, "search", "empty"),
])
def test_errors_are_one_line_and_name_the_key(search, tune, key, fragment):
    with pytest.raises(SearchSpaceError) as e:
        parse_tune_config(spec_dict(search, tune))
    msg = str(e.value)
    assert msg.startswith(key + ":"), msg
    assert fragment in msg, msg
    assert "\n" not in msg


def test_base_errors_and_asha_needs_per_epoch_eval():
    with pytest.raises(ConfigError, match=r"^base: data\.clip_len: expected int"):
        parse_tune_config(spec_dict({"optim.lr": {"choice": [1e-3]}}, overrides={"data.clip_len": "x"}))
    with pytest.raises(ConfigError, match=r"^base\.overrides: ASHA on mAP needs .*eval\.every_epochs: 1"):
        parse_tune_config(spec_dict({"optim.lr": {"choice": [1e-3]}}, overrides={"eval.every_epochs": 0}))
    # Without a scheduler, or on a training metric, evaluation at the end is enough.
    parse_tune_config(spec_dict({"optim.lr": {"choice": [1e-3]}}, {"scheduler": "none"}, {"eval.every_epochs": 0}))
    parse_tune_config(spec_dict({"optim.lr": {"choice": [1e-3]}}, {"metric": "loss_total", "mode": "min"},
                                {"eval.every_epochs": 0}))
    with pytest.raises(ConfigError, match="^tune: "):
        parse_tune_config({**spec_dict({"optim.lr": {"choice": [1e-3]}}), "tune": [1]})
    with pytest.raises(ConfigError, match="^extra: unknown section"):
        parse_tune_config({**spec_dict({"optim.lr": {"choice": [1e-3]}}), "extra": {}})


def test_base_path_relative_to_the_tune_yaml(tmp_path):
    (tmp_path / "train.yaml").write_text((ROOT / "configs" / "tiny.yaml").read_text())
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump({"base": {"config": "train.yaml", "overrides": {"eval.every_epochs": 1}},
                                 "search": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}}))
    assert load_tune_config(p).base.name == "sta-tiny"


@pytest.mark.parametrize("entry", ["{uniform: [0.1, 0.01]}", "{choice: [3]}", "{gauss: [1, 2]}"])
def test_cli_exits_2_before_ray_is_imported(tmp_path, entry):
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump(spec_dict({"optim.lr": {"choice": [1e-3]}})))
    key = "search.optim.lr" if "choice" not in entry else "search.model.num_blocks"
    code = ("import runpy, sys\n"
            f"sys.argv = ['pipeline.tune', '--config', {str(p)!r}, {key + '=' + entry!r}]\n"
            "try:\n    runpy.run_module('pipeline.tune', run_name='__main__')\n"
            "except SystemExit as e:\n    print('EXIT', e.code, 'ray' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "EXIT 2 False" in res.stdout, res.stdout + res.stderr
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"config error: {key}:"), res.stderr


# --------------------------------------------------------------------------- pydantic settings (issue 14 §1)

def test_cli_overrides_parsed_by_type():
    spec = parse_tune_config(spec_dict({"optim.lr": {"choice": [1e-3]}}),
                             overrides=["tune.name=2024", "tune.reduction_factor=3", "tune.resources={CPU: 2}",
                                        "name=2024", "search.loss.margin={uniform: [1e-2, 5e-1]}"])
    assert spec.tune.name == "2024" and spec.base.name == "2024"
    assert spec.tune.reduction_factor == 3.0 and spec.tune.resources == {"CPU": 2.0}
    assert spec.search["loss.margin"].args == [0.01, 0.5]
    assert spec.source["tune"]["name"] == "2024"
    for text, fragment in [("tune.num_samples=x", "tune.num_samples: expected int, got 'x'"),
                           ("tune.nope=1", "tune.nope: unknown key (valid: grace_period, max_concurrent"),
                           ("tune.name=a/b", "tune.name: must be a non-empty name without '/'"),
                           ("tune.resources={GPU: -1}", "tune.resources.GPU: must be >= 0, got -1")]:
        with pytest.raises(SearchSpaceError) as e:
            parse_tune_config(spec_dict({"optim.lr": {"choice": [1e-3]}}), overrides=[text])
        assert str(e.value).startswith(fragment), str(e.value)


def test_tune_yaml_floats_without_dot_and_duplicates(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text(f"base:\n  config: {TINY}\n  overrides: {{eval.every_epochs: 1}}\n"
                 "search:\n  optim.lr: {loguniform: [1e-4, 1e-2]}\n")
    assert load_tune_config(p).search["optim.lr"].args == [1e-4, 1e-2]
    p.write_text(p.read_text() + "  optim.lr: {choice: [1.0e-3]}\n")
    with pytest.raises(SearchSpaceError, match=r"^search\.optim\.lr: duplicate key in .*t\.yaml \(lines 5 and 6\)$"):
        load_tune_config(p)
    p.write_bytes(b"\x00\xff\xfe binary")
    with pytest.raises(SearchSpaceError, match=r"^--config: "):
        load_tune_config(p)


def test_search_values_as_text_are_parsed_by_the_key_type():
    """A choice of strings in the tune YAML is parsed by the config field's type, like a CLI override."""
    spec = parse_tune_config(spec_dict({"data.clip_len": {"choice": ["2", "4"]}, "name": {"choice": ["2024"]}}))
    from pipeline.config import apply_overrides

    cfg = apply_overrides(spec.base, {"data.clip_len": "4", "name": "2024"})
    assert cfg.data.clip_len == 4 and cfg.name == "2024"
    with pytest.raises(SearchSpaceError, match=r"^search\.data\.p: value 6 rejected: data\.p: 6 identities per global "
                                                 r"batch do not divide over scaling\.num_workers=4 ranks"):
        parse_tune_config(spec_dict({"data.p": {"choice": [4, 6]}}, overrides={"eval.every_epochs": 1,
                                                                            "scaling.num_workers": 4}))
