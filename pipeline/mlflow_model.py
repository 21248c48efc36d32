"""The MLflow model of a run: ``mlflow.pytorch.save_model`` with what it takes to load it elsewhere
(the ``sta_model`` code, a signature and input example, pinned requirements), uploaded as a LoggedModel
of the run, registered on request with the run's eval metrics linked to it.

Every store call goes through the tracker's own ``MlflowClient(tracker.uri)``: MLflow's process-global
tracking URI is neither read nor changed, so trackers on different stores can log models from one
process (Ray Tune trials, tests) at the same time.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from pipeline.redact import strip_credentials
from pipeline.tracking import metric_value
import sta_model

log = logging.getLogger(__name__)


def _register(client, name: str, model_id: str, artifact_location: str, run_id: str):
    """A new version of registered model ``name`` (created if missing) from LoggedModel ``model_id``."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    # The model's own artifact location as source, not ``models:/<id>``: MLflow's sqlite/file registry
    # resolves that URI through the process-global tracking URI, not this client's.
    return client.create_model_version(name, source=artifact_location, run_id=run_id, model_id=model_id)


def log_model(tracker, model, cfg, *, name: str = "model", registered_model: Optional[str] = None,
              input_example: Any = None, metrics: Optional[Mapping[str, Any]] = None):
    """Log a CPU copy of ``model`` into this run, loadable without this checkout: the ``sta_model`` package travels as ``code_paths``, the signature comes from
    ``input_example`` (default: one clip ``(1, N, 3, H, W)`` of the config), and the requirements
    are the pinned torch and numpy that loading needs.

    Args:
        tracker: the started :class:`pipeline.tracking.Tracker` of the run.
        model: the network (eval mode is set on the copy that is logged).
        cfg: the run's config (clip shape, ``tracking.log_model`` / ``registered_model``).
        name: the model's name in the run.
        registered_model: register under this name (default ``cfg.tracking.registered_model``).
        input_example: a numpy clip batch; None builds a zero clip of the config's shape.
        metrics: eval metrics linked to the logged model (shown on its page and the version's).

    Returns MLflow's ``ModelInfo`` (``model_uri``, ``registered_model_version``), or None when
    disabled, ``cfg.tracking.log_model`` is false, or the store failed (a warning then).
    """
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
    from mlflow.models import Model, infer_signature

    if any(t.device.type != "cpu" for t in list(model.parameters()) + list(model.buffers())):
        model = copy.deepcopy(model).cpu()  # never move the caller's (training) model
    registered = registered_model or cfg.tracking.registered_model
    if input_example is None:
        d = cfg.data
        input_example = np.zeros((1, cfg.eval.clip_len or d.clip_len, 3, d.height, d.width), np.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.as_tensor(input_example))
        signature = infer_signature(input_example, out.numpy() if torch.is_tensor(out) else None)
        reqs = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
        client = tracker.client
        # The LoggedModel is created in this run's experiment, its files saved locally and uploaded
        # through the tracker's client (what mlflow.pytorch.log_model does through the global URI).
        logged = client.create_logged_model(tracker.experiment_id, name=name, source_run_id=tracker.run_id)
        try:
            mlflow_model = Model(artifact_path=logged.artifact_location, run_id=tracker.run_id,
                                 model_uuid=logged.model_id, model_id=logged.model_id)
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / "model"
                mlflow.pytorch.save_model(
                    model, str(local), mlflow_model=mlflow_model, pip_requirements=reqs,
                    code_paths=[os.path.dirname(sta_model.__file__)], signature=signature,
                    input_example=input_example,
                    serialization_format="pickle",  # torch.export (pt2) needs tensor-only outputs in train mode
                )
                for cache in list(local.rglob("__pycache__")):
                    shutil.rmtree(cache, ignore_errors=True)
                client.log_outputs(tracker.run_id, [LoggedModelOutput(logged.model_id, step=0)])
                client.log_model_artifacts(logged.model_id, str(local))
        except Exception:
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
        logged = client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        info = mlflow_model.get_model_info(logged)
        if registered:
            info.registered_model_version = _register(client, registered, logged.model_id, logged.artifact_location,
                                                    tracker.run_id).version
        if metrics:
            now = int(time.time() * 1000)
            items = [Metric(k, metric_value(k, v), now, 0, model_id=logged.model_id)
                     for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)]
            tracker.send("link model metrics", client.log_batch, tracker.run_id, metrics=items)
        return info
    except Exception as exc:  # noqa: BLE001 - a finished run keeps its checkpoints and exports
        log.warning("run %s: logging the MLflow model failed: %s", tracker.run_id,
                    strip_credentials(str(exc)).splitlines()[0][:300] if str(exc) else type(exc).__name__)
        return None
    finally:
        model.train(was_training)
