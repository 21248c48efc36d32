"""pipeline.model_io: the export/load round trip, and model.pretrained from an earlier run's export (trunk
weights only, mismatch errors, the driver's check)."""
import json
from pathlib import Path

import pytest
import torch

from pipeline.model_io import (build_model_from_config, check_pretrained, export_model, is_export, load_any,
                               load_exported, load_pretrained_trunk)
from pipeline.config import ConfigError, load_config
from sta_model.model import build_model

ROOT = Path(__file__).resolve().parents[1]


def _export(tmp_path, kind="temporal_pooling", trunk="tiny", num_classes=7, **meta):
    """An export as a finished run writes it (``<run>/final``), from a model with random weights."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"model.kind={kind}", f"model.trunk={trunk}"])
    torch.manual_seed(1)
    kw = {"embed_dim": cfg.model.embed_dim}
    model = build_model(kind, num_classes, trunk=trunk, **kw)
    url = str(tmp_path / "pre" / "final")
    export_model(model.state_dict(), cfg, url, num_classes=num_classes, provenance=meta)
    return url, model


def test_export_round_trip(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    model = build_model_from_config(cfg, 8)
    export_model(model.state_dict(), cfg, str(tmp_path / "final"), num_classes=8,
                 metrics={"mAP": 0.5}, provenance={"mlflow_run_id": "abc"})
    loaded, cfg2, meta = load_any(str(tmp_path / "final"))
    assert meta["num_classes"] == 8 and meta["metrics"] == {"mAP": 0.5} and meta["mlflow_run_id"] == "abc"
    assert cfg2.model.embed_dim == cfg.model.embed_dim
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


def test_trunk_loads_from_an_export_and_head_stays_fresh(tmp_path):
    url, source = _export(tmp_path, mlflow_run_id="abc123", run_dir=str(tmp_path / "pre"))
    assert is_export(url) and not is_export(str(tmp_path))
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"model.pretrained={url}"])
    model = build_model_from_config(cfg, num_classes=3)  # another head size: only the trunk is taken
    for k, v in source.trunk.state_dict().items():
        torch.testing.assert_close(model.trunk.state_dict()[k], v)
    assert model.head.classifier.weight.shape[0] == 3
    info = check_pretrained(cfg)
    assert info["mlflow_run_id"] == "abc123" and info["trunk"] == "tiny"


def test_export_of_another_trunk_kind_is_a_clear_error(tmp_path):
    url, _ = _export(tmp_path, trunk="resnet18")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"model.pretrained={url}"])
    with pytest.raises(ConfigError, match=r"model\.pretrained: .*model\.trunk=resnet18.*model\.trunk=tiny.*"
                                          r"missing keys .*unexpected keys"):
        check_pretrained(cfg)
    with pytest.raises(ValueError, match="missing keys .*body.0.weight"):
        build_model_from_config(cfg, num_classes=3)
    trunk = build_model("sta", 3, trunk="tiny", embed_dim=8).trunk
    with pytest.raises(ValueError, match="resnet18"):
        load_pretrained_trunk(trunk, url, trunk_kind="tiny")


def test_shape_mismatch_is_named(tmp_path):
    url, model = _export(tmp_path)
    state = torch.load(Path(url) / "model.pt", weights_only=True)
    state["trunk.body.0.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(state, Path(url) / "model.pt")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"model.pretrained={url}"])
    with pytest.raises(ConfigError, match=r"shape mismatch body\.0\.weight \(8, 3, 3, 3\) vs \(16, 3, 3, 3\)"):
        check_pretrained(cfg)


def test_missing_pretrained_path_fails_in_the_driver(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"model.pretrained={tmp_path}/nothing.pt"])
    with pytest.raises(ConfigError, match=r"^model\.pretrained: .*nothing\.pt"):
        check_pretrained(cfg)


def test_export_with_pickled_code_is_refused(tmp_path):
    url, _ = _export(tmp_path)

    class Evil:
        def __reduce__(self):
            return (Path(tmp_path / "pwned").touch, ())

    torch.save({"trunk.body.0.weight": Evil()}, Path(url) / "model.pt")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"model.pretrained={url}"])
    with pytest.raises(ConfigError) as err:
        check_pretrained(cfg)
    assert "weights_only=False" not in str(err.value)
    assert not (tmp_path / "pwned").exists()


def test_export_meta_carries_provenance(tmp_path):
    url, _ = _export(tmp_path, mlflow_run_id="r1", run_dir="/runs/x")
    meta = json.loads((Path(url) / "meta.json").read_text())
    assert meta["mlflow_run_id"] == "r1" and meta["run_dir"] == "/runs/x"


def test_an_older_versions_export_still_loads(tmp_path):
    """Exports written before a config key was removed (failure.inject_at_epoch) load with a warning."""
    import yaml

    url, model = _export(tmp_path)
    raw = yaml.safe_load((Path(url) / "config.yaml").read_text())
    raw.setdefault("failure", {})["inject_at_epoch"] = 0
    raw["model"]["retired_knob"] = 1
    (Path(url) / "config.yaml").write_text(yaml.safe_dump(raw))
    loaded, cfg, _ = load_exported(url)
    assert cfg.model.kind == "temporal_pooling"
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
