"""Shared fixtures: real servers on loopback only (moto's S3 server), and env for Ray/MLflow."""
from __future__ import annotations

import os
import uuid

import pytest

from pipeline.train import free_port  # one helper for servers and process groups on loopback
from tests.fixtures_data import packed_synthetic

# Keep every Ray node on 127.0.0.1 and MLflow quiet; set before any test imports Ray or MLflow.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 protocol server (moto) on 127.0.0.1; yields its endpoint URL.

    Sets AWS_ENDPOINT_URL and dummy credentials for the whole session so that
    `pipeline.storage` (and Ray/pyarrow) talk to it like to any S3-compatible store.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in
             ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the S3 server, created over HTTP; yields its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def s3_auth_server():
    """A moto server that checks credentials (IAM auth from the first request), in its own process."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def packed_small(tmp_path_factory):
    """``(shard dir, manifest, Dataset)``: 6 + 3 ids, 1-7 frames a tracklet, several shards per split.

    Shared by the tests of the shard format and of the loaders that read it; read-only."""
    return packed_synthetic(tmp_path_factory, num_ids=6, tracklets_per_id=2, frames_per_tracklet=(1, 7),
                            num_test_ids=3, seed=0)
