"""The MLflow model of a run: ``mlflow.pytorch.log_model`` with what it takes to load it elsewhere
(the ``sta_model`` code, a signature and input example, pinned requirements), registered on request
with the run's eval metrics linked to it.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Optional

from pipeline.tracking import _GLOBAL_URI_LOCK, _to_float, strip_credentials

log = logging.getLogger(__name__)


@contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """Temporarily point MLflow's process-global tracking URI at ``uri`` and restore it exactly."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _GLOBAL_URI_LOCK:
        saved_uri = tracking_utils._tracking_uri
        saved_env = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved_uri)  # None also unsets the env var...
            if saved_env is not None:  # ...so put back a URI the user had exported
                os.environ["MLFLOW_TRACKING_URI"] = saved_env


def log_model(tracker, model, cfg, *, name: str = "model", registered_model: Optional[str] = None,
              input_example: Any = None, metrics: Optional[Mapping[str, Any]] = None):
    """``mlflow.pytorch.log_model`` of a CPU copy of ``model`` into this run, loadable without this
    checkout: the ``sta_model`` package travels as ``code_paths``, the signature comes from
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
    from mlflow.models import infer_signature

    import sta_model

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
        # Create the LoggedModel ourselves so it lands in this run's experiment (MLflow would
        # otherwise use the global active experiment).
        logged = tracker._client.create_logged_model(tracker.experiment_id, name=name, source_run_id=tracker.run_id)
        with _global_tracking_uri(tracker.uri):
            info = mlflow.pytorch.log_model(
                model, name=name, run_id=tracker.run_id, model_id=logged.model_id,
                registered_model_name=registered, pip_requirements=reqs,
                code_paths=[os.path.dirname(sta_model.__file__)], signature=signature,
                input_example=input_example,
                serialization_format="pickle",  # torch.export (pt2) needs tensor-only outputs in train mode
            )
        if metrics:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            items = [Metric(k, _to_float(k, v), now, 0, model_id=logged.model_id)
                     for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)]
            tracker._send("link model metrics", tracker._client.log_batch, tracker.run_id, metrics=items)
        return info
    except Exception as exc:  # noqa: BLE001 - a finished run keeps its checkpoints and exports
        log.warning("run %s: logging the MLflow model failed: %s", tracker.run_id,
                    strip_credentials(str(exc)).splitlines()[0][:300] if str(exc) else type(exc).__name__)
        return None
    finally:
        model.train(was_training)
