"""cluster/kubernetes/*: manifests parse, validate against KubeRay's CRD schemas (closed: a misspelled
field fails), the Secret/kustomization have the right shape, and the RayJob's size agrees with the
config its entrypoint trains."""
from __future__ import annotations

import copy
import functools
import importlib.util
import os
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "cluster" / "kubernetes"
SECRET_NAME = "sta-credentials"
CREDENTIAL_VARS = {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"}


def schema_dir() -> Path:
    candidates = [REPO.parent / "shared" / "schemas" / "kuberay"]
    if os.environ.get("STA_SHARED_DIR"):
        candidates.insert(0, Path(os.environ["STA_SHARED_DIR"]) / "schemas" / "kuberay")
    for c in candidates:
        if (c / "ray.io_rayjobs.yaml").is_file():
            return c
    pytest.fail(f"KubeRay CRD schemas not found in {[str(c) for c in candidates]} (set STA_SHARED_DIR)")


def close_schema(node):
    """OpenAPI objects with `properties` accept unknown keys by default; the API server prunes them
    silently. Make them closed (additionalProperties: false) unless the CRD says they are open
    (x-kubernetes-preserve-unknown-fields or an explicit additionalProperties)."""
    if isinstance(node, dict):
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        for key, value in node.items():
            if key in ("properties", "patternProperties", "definitions"):
                for sub in value.values():
                    close_schema(sub)
            elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
                close_schema(value)
            elif key in ("allOf", "anyOf", "oneOf") and isinstance(value, list):
                for sub in value:
                    close_schema(sub)
    return node


@functools.lru_cache(maxsize=None)
def crd(kind: str) -> tuple[str, dict]:
    """(apiVersion, closed schema) of the CRD's storage version for `kind`."""
    file = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}[kind]
    doc = yaml.safe_load((schema_dir() / file).read_text())
    assert doc["spec"]["names"]["kind"] == kind
    version = next(v for v in doc["spec"]["versions"] if v.get("storage"))
    schema = close_schema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    jsonschema.Draft7Validator.check_schema(schema)
    return f"{doc['spec']['group']}/{version['name']}", schema


def schema_errors(doc: dict) -> list[str]:
    api_version, schema = crd(doc["kind"])
    errors = [f"apiVersion {doc.get('apiVersion')!r} != {api_version!r}"] if doc.get("apiVersion") != api_version else []
    validator = jsonschema.Draft7Validator(schema)
    errors += [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    return errors


def load(name: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]
    assert docs, f"{name} is empty"
    return docs


def one(name: str) -> dict:
    docs = load(name)
    assert len(docs) == 1
    return docs[0]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_templates(doc: dict):
    spec = cluster_spec(doc)
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]


# ------------------------------------------------------------------------------------------------
# Schema validation


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_manifest_validates_against_kuberay_crd(name):
    for doc in load(name):
        assert doc["kind"] in ("RayJob", "RayCluster")
        assert schema_errors(doc) == []


def test_closed_schema_keeps_open_maps_open():
    # rayStartParams is a string map, labels too: arbitrary keys stay valid, wrong value types do not.
    doc = copy.deepcopy(one("rayjob.yaml"))
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["object-store-memory"] = "1000000000"
    doc["metadata"]["labels"]["team"] = "reid"
    assert schema_errors(doc) == []
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    assert any("rayStartParams" in e for e in schema_errors(doc))


MISSPELLINGS = {
    "entrypont": lambda d: d["spec"].__setitem__("entrypont", d["spec"].pop("entrypoint")),
    "shutdownAfterJobFinish": lambda d: d["spec"].__setitem__(
        "shutdownAfterJobFinish", d["spec"].pop("shutdownAfterJobFinishes")),
    "rayStartParam": lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__(
        "rayStartParam", d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("rayStartParams")),
    "worker group replica": lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__(
        "replica", d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("replicas")),
    "container volumeMount": lambda d: (lambda c: c.__setitem__("volumeMount", c.pop("volumeMounts")))(
        d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]),
    "emptyDir medium typo": lambda d: (lambda v: v["emptyDir"].__setitem__("meduim", v["emptyDir"].pop("medium")))(
        d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["volumes"][0]),
    "toleration key typo": lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"][
        "tolerations"][0].__setitem__("efect", "NoSchedule"),
    "missing groupName": lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"),
}


@pytest.mark.parametrize("mistake", sorted(MISSPELLINGS))
def test_misspelled_field_fails_validation(mistake):
    doc = copy.deepcopy(one("rayjob.yaml"))
    assert schema_errors(doc) == []
    MISSPELLINGS[mistake](doc)
    assert schema_errors(doc), f"a RayJob with {mistake} passed validation"


def test_misspelled_raycluster_field_fails_validation():
    doc = copy.deepcopy(one("raycluster.yaml"))
    doc["spec"]["enableInTreeAutoScaling"] = doc["spec"].pop("enableInTreeAutoscaling")
    assert any("enableInTreeAutoScaling" in e for e in schema_errors(doc))


# ------------------------------------------------------------------------------------------------
# What the pods need


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_pods_get_credentials_from_the_secret_and_shm(name):
    doc = one(name)
    images = set()
    for group, template in pod_templates(doc):
        spec = template["spec"]
        shm = [v["name"] for v in spec.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"]
        for c in spec["containers"]:
            images.add(c["image"])
            refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
            assert refs == [SECRET_NAME], f"{group}/{c['name']}: envFrom secretRef {refs}"
            # No credential is written into the manifest itself.
            for e in c.get("env", []):
                assert e["name"] not in CREDENTIAL_VARS | {"MLFLOW_TRACKING_PASSWORD"} or "valueFrom" in e
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert mounts.get("/dev/shm") in shm, f"{group}/{c['name']}: no memory-backed /dev/shm"
    assert len(images) == 1 and next(iter(images)).endswith("-gpu"), images


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_gpu_worker_group(name):
    doc = one(name)
    spec = cluster_spec(doc)
    assert spec["headGroupSpec"]["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        res = pod["containers"][0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] >= 1
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_gpu_workers_mount_the_shard_cache_of_the_config(name):
    # configs/mars.yaml keeps S3 shards under data.cache_dir: the pods must give it a disk volume
    # bigger than data.cache_gb (an emptyDir over its sizeLimit gets the pod evicted)
    from pipeline.config import load_config

    cfg = load_config(REPO / "configs" / "mars.yaml")
    assert cfg.data.cache_dir
    for group in cluster_spec(one(name))["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        mount = next((p for p in mounts if cfg.data.cache_dir.startswith(p.rstrip("/") + "/")), None)
        assert mount is not None, f"{group['groupName']}: nothing mounted above {cfg.data.cache_dir}"
        vol = next(v for v in pod["volumes"] if v["name"] == mounts[mount])
        assert "medium" not in vol["emptyDir"], "the shard cache belongs on disk, not in memory"
        limit = vol["emptyDir"]["sizeLimit"]
        assert limit.endswith("Gi") and int(limit[:-2]) * 2**30 > cfg.data.cache_gb * 2**30 * 1.1, limit
        # A disk emptyDir counts against the container's ephemeral storage: request (scheduling on a node
        # with the disk) and limit (eviction bound) must both cover the volume.
        res = pod["containers"][0]["resources"]
        for kind in ("requests", "limits"):
            eph = res.get(kind, {}).get("ephemeral-storage")
            assert eph and eph.endswith("Gi") and int(eph[:-2]) >= int(limit[:-2]), (kind, eph, limit)
        assert int(res["limits"]["ephemeral-storage"][:-2]) >= int(res["requests"]["ephemeral-storage"][:-2])


def test_rayjob_lifecycle():
    doc = one("rayjob.yaml")
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    assert isinstance(doc["spec"]["ttlSecondsAfterFinished"], int) and doc["spec"]["ttlSecondsAfterFinished"] > 0
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipeline.train"] and argv[3] == "--config"
    assert argv[4] == "configs/mars.yaml"


def test_raycluster_autoscales_from_zero():
    spec = one("raycluster.yaml")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    group = spec["workerGroupSpecs"][0]
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1


def test_secret_example_shape():
    doc = one("secret.example.yaml")
    assert (doc["apiVersion"], doc["kind"], doc["metadata"]["name"]) == ("v1", "Secret", SECRET_NAME)
    assert doc.get("type", "Opaque") == "Opaque"
    data = doc["stringData"]
    assert CREDENTIAL_VARS <= set(data)
    assert all(isinstance(v, str) for v in data.values())
    # Placeholders only: nothing that looks like a real key pair.
    assert data["AWS_SECRET_ACCESS_KEY"] == "REPLACE_ME" and data["AWS_ACCESS_KEY_ID"] == "REPLACE_ME"


# ------------------------------------------------------------------------------------------------
# kustomization.yaml: apply it the way kustomize would (images transformer + JSON 6902 patches)


def _pointer(path: str) -> list[str]:
    assert path.startswith("/")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 `replace`/`add`/`remove` (what the kustomization uses); a missing target path raises
    like kustomize does for `replace`."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = _pointer(op["path"])
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            idx = len(node) if last == "-" else int(last)
            if op["op"] == "add":
                node.insert(idx, op["value"])
            elif op["op"] == "replace":
                node[idx] = op["value"]
            else:
                del node[idx]
        else:
            if op["op"] in ("replace", "remove") and last not in node:
                raise KeyError(f"{op['op']} {op['path']}: no such field")
            if op["op"] == "remove":
                del node[last]
            else:
                node[last] = op["value"]
    return doc


def set_images(node, images: list[dict]):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    name, _, _tag = c["image"].rpartition(":") if ":" in c["image"].split("/")[-1] else (c["image"], "", "")
                    for img in images:
                        if img["name"] == name:
                            c["image"] = f"{img.get('newName', name)}:{img.get('newTag', _tag)}"
            else:
                set_images(value, images)
    elif isinstance(node, list):
        for v in node:
            set_images(v, images)


def kustomize_build() -> list[dict]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kust["kind"] == "Kustomization"
    assert set(kust) <= {"apiVersion", "kind", "resources", "images", "patches", "namespace", "labels",
                         "commonLabels", "replicas", "configMapGenerator", "secretGenerator"}
    docs = []
    for res in kust["resources"]:
        assert (K8S / res).is_file(), res
        assert "secret" not in res, "credentials must not be part of the kustomization"
        docs += load(res)
    used_images = {c["image"].rsplit(":", 1)[0] for d in docs for _, t in pod_templates(d) for c in t["spec"]["containers"]}
    for img in kust.get("images", []):
        assert img["name"] in used_images, f"images: {img['name']} matches no container"
        set_images(docs, [img])
    for patch in kust.get("patches", []):
        target = patch["target"]
        ops = yaml.safe_load(patch["patch"])
        hits = [i for i, d in enumerate(docs)
                if d["kind"] == target["kind"] and d["metadata"]["name"] == target.get("name", d["metadata"]["name"])
                and d["apiVersion"] == f"{target.get('group')}/{target.get('version')}"]
        assert hits, f"patch target {target} matches no resource"
        for i in hits:
            docs[i] = json_patch(docs[i], ops)
    return docs


def test_kustomization_builds_valid_manifests():
    docs = kustomize_build()
    for doc in docs:
        assert schema_errors(doc) == []
    job = next(d for d in docs if d["kind"] == "RayJob")
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["replicas"] == 4  # the patch took effect
    assert "data.shards=" in job["spec"]["entrypoint"]


def test_json_patch_rejects_a_wrong_path():
    with pytest.raises(KeyError):
        json_patch(one("rayjob.yaml"), [{"op": "replace", "path": "/spec/rayClusterSpec/workerGroupSpecs/0/replica",
                                         "value": 3}])


# ------------------------------------------------------------------------------------------------
# The RayJob's size matches the config its entrypoint trains


def check_size_matches_config(job: dict) -> None:
    if importlib.util.find_spec("pipeline.config") is None:
        pytest.skip("pipeline.config is not in this checkout yet (the training entry point lands separately)")
    from pipeline.config import load_config

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "pipeline.train", "--config"], argv
    config_path = REPO / argv[4]
    assert config_path.is_file(), f"entrypoint config {argv[4]} does not exist"
    cfg = load_config(config_path, overrides=argv[5:])
    sc = cfg.scaling
    assert sc.use_gpu, f"{argv[4]}: the GPU worker group needs scaling.use_gpu: true"
    gpu_groups = [g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                  if g["template"]["spec"]["containers"][0]["resources"].get("limits", {}).get("nvidia.com/gpu")]
    assert len(gpu_groups) == 1
    group = gpu_groups[0]
    res = group["template"]["spec"]["containers"][0]["resources"]
    replicas = group["replicas"]
    assert sc.num_workers % replicas == 0, f"scaling.num_workers={sc.num_workers} not divisible by {replicas} pods"
    per_pod = sc.num_workers // replicas
    assert res["limits"]["nvidia.com/gpu"] == sc.gpus_per_worker * per_pod, (
        f"{replicas} pods x {res['limits']['nvidia.com/gpu']} GPUs != {sc.num_workers} workers x {sc.gpus_per_worker} GPU")
    cpus = float(str(res["requests"]["cpu"]).rstrip("m")) / (1000 if str(res["requests"]["cpu"]).endswith("m") else 1)
    assert cpus >= sc.cpus_per_worker * per_pod, f"{cpus} CPUs per pod < {per_pod} x {sc.cpus_per_worker}"


def test_rayjob_size_matches_config():
    check_size_matches_config(one("rayjob.yaml"))


def test_kustomized_rayjob_size_matches_config():
    check_size_matches_config(next(d for d in kustomize_build() if d["kind"] == "RayJob"))


def test_size_check_catches_a_mismatch():
    job = copy.deepcopy(one("rayjob.yaml"))
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = 3
    with pytest.raises(AssertionError):
        check_size_matches_config(job)
