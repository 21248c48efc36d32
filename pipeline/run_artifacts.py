"""What a finished run leaves in MLflow besides its metrics: CMC curve, loss curves drawn from the
metric history MLflow holds, the paper's attention heatmaps, and the logged model (rank 0, once)."""
from __future__ import annotations

import logging
import os
import tempfile

import torch

from pipeline import model_io
from pipeline.config import Config, config_from_dict
from pipeline.redact import strip_credentials
from pipeline.transforms import model_input

log = logging.getLogger("pipeline.run_artifacts")


def pretrained_tags(cfg: Config) -> dict[str, str]:
    """MLflow tags naming where the trunk came from when ``model.pretrained`` is an earlier run's export."""
    src = cfg.model.pretrained
    if not src or not model_io.is_export(src):
        return {}
    info = model_io.export_info(src)  # tags need no weights
    tags = {"pretrained.source": src, "pretrained.trunk": str(info["trunk"])}
    if info.get("mlflow_run_id"):
        tags["pretrained.source_run_id"] = str(info["mlflow_run_id"])
    if info.get("run_dir"):
        tags["pretrained.source_run_dir"] = str(info["run_dir"])
    return tags


def attention_clips(model: torch.nn.Module, clips: torch.Tensor):
    """Spatial maps and score matrix of an STA model for a few clips (for the heatmap figure)."""
    from sta_model.attention import spatial_temporal_attention

    B, N = clips.shape[:2]
    with torch.no_grad():
        f = model.trunk(clips.flatten(0, 1))
        g, S = spatial_temporal_attention(f.reshape(B, N, *f.shape[1:]).float(), model.num_blocks,
                                          attention_map=getattr(model, "attention_map", "energy"))
    return g, S


def final_artifacts(tracker, cfg: Config, state: dict, num_classes: int, last_eval: dict) -> None:
    from pipeline import viz

    with tempfile.TemporaryDirectory() as tmp:
        if "cmc" in last_eval:
            extra = {"re-ranked": last_eval["rr_cmc"]} if "rr_cmc" in last_eval else None
            tracker.log_artifact(viz.plot_cmc(last_eval["cmc"], os.path.join(tmp, "cmc.png"), label=cfg.model.kind,
                                              extra=extra))
        try:
            curves = curves_from_mlflow(tracker)
        except Exception as exc:  # noqa: BLE001 - a tracking outage must never fail a finished run
            log.warning("loss curves skipped: the MLflow history could not be read (%s)",
                        strip_credentials(str(exc)).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            curves = {}
        if curves:
            tracker.log_artifact(viz.plot_curves(curves, os.path.join(tmp, "curves.png"), title=cfg.name))
        model = model_io.build_model_from_config(_no_pretrained(cfg), num_classes)
        model.load_state_dict(state)
        model.eval()
        if cfg.tracking.heatmaps > 0:  # figures on: ranked results beside the CMC curve
            from pipeline.visrank import log_visrank

            log_visrank(tracker, model, cfg, tmp)
        if cfg.model.kind == "sta" and cfg.tracking.heatmaps > 0:
            try:
                tracker.log_artifact(_heatmaps(model, cfg, os.path.join(tmp, "attention.png")))
            except Exception as exc:  # a figure must never fail a finished run
                log.warning("attention heatmaps skipped: %s", exc)
        if cfg.tracking.log_model:
            tracker.log_model(model, cfg, registered_model=cfg.tracking.registered_model,
                              metrics={f"eval/{k}": v for k, v in last_eval.items() if isinstance(v, float)})


def curves_from_mlflow(tracker) -> dict[str, list[tuple[int, float]]]:
    """Every epoch metric of the run as MLflow holds it (``name -> [(epoch, value)]``), for curves.png:
    panels by group (``train``, ``eval``, ``system``), loss terms in a ``loss`` panel of their own;
    per-step series are left out. Nothing is kept on the side while training."""
    from mlflow import MlflowClient

    client = MlflowClient(tracker.uri)
    out = {}
    for key in client.get_run(tracker.run_id).data.metrics:
        group, _, name = key.partition("/")
        if group == "step" or not name:
            continue
        panel, name = ("loss", name[len("loss_"):]) if name.startswith("loss_") else (group, name)
        history = sorted(client.get_metric_history(tracker.run_id, key), key=lambda m: (m.step, m.timestamp))
        out[f"{panel}/{name}"] = [(int(m.step), float(m.value)) for m in history]
    return out


def _no_pretrained(cfg: Config) -> Config:
    d = cfg.to_dict()
    d["model"]["pretrained"] = None
    return config_from_dict(d)


def _heatmaps(model: torch.nn.Module, cfg: Config, path: str) -> str:
    """The paper's figure: a few query clips (``eval.clip_len`` frames, as evaluation cuts them) with
    spatial maps and the N×K score matrix. Clips arrive as uint8 and go through ``model_input``, the one
    normalisation site; the frames are drawn as read."""
    from pipeline import viz
    from pipeline.eval_data import eval_loader

    want = cfg.tracking.heatmaps
    panels, seen = [], set()
    loader = eval_loader(cfg.data.shards, "query", clip_len=cfg.eval.clip_len, height=cfg.data.height,
                         width=cfg.data.width, num_workers=0, clips_per_batch=16, normalize=False)
    for batch in loader:
        for i in range(batch["clips"].shape[0]):
            idx = int(batch["index"][i])
            if idx in seen:
                continue
            seen.add(idx)
            clip = batch["clips"][i:i + 1]
            g, S = attention_clips(model, model_input(clip, torch.device("cpu"), torch.float32))
            frames = clip[0].numpy() if clip.dtype == torch.uint8 else viz.denormalize(clip[0])
            panels.append((frames, g[0].numpy(), S[0].numpy(), f"query {idx} (pid {int(batch['pids'][i])})"))
            if len(panels) >= want:
                break
        if len(panels) >= want:
            break
    return viz.plot_attention_grid(panels, path)
