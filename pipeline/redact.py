"""Credential redaction for everything that reaches MLflow or a log line: secret-looking keys become
``***``, ``user:password@`` is stripped from URLs, secret query values and the values of secret env
vars are masked; values are stringified and truncated to MLflow's limits.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

try:  # the limits MLflow's server enforces (6000 / 8000 characters in 3.x)
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH
except ImportError:  # pragma: no cover - older/newer layouts
    MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH = 6000, 8000

REDACTED = "***"
# Key fragments that mark a value as a credential (matched on the last dotted part, lower case).
SECRET_KEY_PARTS = ("secret", "password", "passwd", "token", "access_key", "credential", "api_key",
                    "apikey", "private_key")
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s?#]+)@")
_QUERY_SECRET = re.compile(r"(?P<key>[?&][^=&#\s]*(?:signature|token|secret|password|credential)"
                           r"[^=&#\s]*=)[^&#\s]*", re.IGNORECASE)

def is_secret_key(key: str) -> bool:
    """True when the last dotted part of ``key`` names a credential (``data.aws_secret_key``)."""
    last = str(key).rsplit(".", 1)[-1].lower()
    return any(part in last for part in SECRET_KEY_PARTS)


def _secret_env_values() -> list[str]:
    """Values of secret-looking env vars; long enough ones are masked wherever they appear."""
    return sorted({v for k, v in os.environ.items() if is_secret_key(k) and len(v) >= 8},
                  key=len, reverse=True)


def strip_credentials(text: str) -> str:
    """Remove ``user:password@`` from URLs, secret query values, and known secret env values."""
    text = _URL_USERINFO.sub(lambda m: m.group("scheme"), text)
    text = _QUERY_SECRET.sub(lambda m: m.group("key") + REDACTED, text)
    for value in _secret_env_values():
        text = text.replace(value, REDACTED)
    return text


def redact(obj: Any) -> Any:
    """Deep copy of ``obj`` with secret keys masked and credentials stripped from strings."""
    if isinstance(obj, Mapping):
        return {k: REDACTED if is_secret_key(k) and obj[k] not in (None, "") else redact(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return strip_credentials(obj)
    return obj


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sanitize(mapping: Mapping[str, Any], limit: int) -> dict[str, str]:
    out = {}
    for key, value in redact(dict(mapping)).items():
        out[str(key)] = truncate(_as_text(value), limit)
    return out


def safe_params(flat: Mapping[str, Any]) -> dict[str, str]:
    """Flat params ready for MLflow: credentials redacted, lists/dicts as JSON, values truncated.

    Only what is passed in is logged; environment variables are never added.
    """
    return _sanitize(flat, MAX_PARAM_VAL_LENGTH)


def safe_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    """Same redaction as :func:`safe_params`, with MLflow's tag length limit."""
    return _sanitize(tags, MAX_TAG_VAL_LENGTH)
