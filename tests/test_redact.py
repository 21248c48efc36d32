"""pipeline.redact: what reaches the tracking store has its credentials masked."""
from __future__ import annotations

import yaml

from pipeline import redact

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
ACCESS = "AKIAIOSFODNN7EXAMPLE"


def test_safe_params_redacts_and_stringifies(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-0123456789abcdef")
    out = redact.safe_params({
        "data.aws_secret_access_key": SECRET,
        "auth.password": "hunter22",
        "x.api_token": "t",
        "data.shards": f"s3://{ACCESS}:{SECRET}@bucket/prefix",
        "tracking.uri": "http://alice:pw@mlflow.example:5000/path",
        "signed": "https://h/obj?X-Amz-Signature=deadbeef&part=1",
        "leak": "prefix tok-0123456789abcdef suffix",
        "optim.milestones": [200, 400],
        "tracking.tags": {"owner": "me", "github_token": "ghp_x"},
        "long": "x" * 10_000,
        "flag": True,
        "none": None,
    })
    assert out["data.aws_secret_access_key"] == "***"
    assert out["auth.password"] == "***" and out["x.api_token"] == "***"
    assert out["data.shards"] == "s3://bucket/prefix"
    assert out["tracking.uri"] == "http://mlflow.example:5000/path"
    assert out["signed"] == "https://h/obj?X-Amz-Signature=***&part=1"
    assert out["leak"] == "prefix *** suffix"
    assert out["optim.milestones"] == "[200, 400]"
    assert yaml.safe_load(out["tracking.tags"]) == {"owner": "me", "github_token": "***"}
    assert len(out["long"]) == redact.MAX_PARAM_VAL_LENGTH == 6000
    assert out["flag"] == "True" and out["none"] == "None"
    assert all(isinstance(v, str) for v in out.values())
