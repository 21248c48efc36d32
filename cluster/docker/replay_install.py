#!/usr/bin/env python3
"""Replay a Dockerfile variant's install steps on this machine, without a Docker engine.

    python3 cluster/docker/replay_install.py --variant cpu --root /tmp/sta-image [--build-arg K=V]

Follows the stage chain that `docker build --build-arg VARIANT=<variant>` would build, in order:
ARG/ENV set variables (VENV and APP are moved under --root), WORKDIR changes directory, COPY copies
from the build context (failing if .dockerignore would exclude a source, as the real build would), RUN
runs in bash. System steps (apt-get, useradd) are listed but not run; `--no-cache-dir` is dropped so
pip's cache is reused between replays. Also importable: `parse(path)` gives the instructions.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SYSTEM_STEPS = ("apt-get", "useradd", "groupadd", "chown")
REMAPPED = ("VENV", "APP")


@dataclass
class Instruction:
    cmd: str        # upper-case keyword
    args: str       # rest of the logical line
    line: int       # 1-based line number where it starts
    comments: tuple[str, ...] = ()  # comment lines directly above it


def parse(path: Path) -> list[Instruction]:
    """Logical instructions (continuations joined, comments attached to the next instruction)."""
    out: list[Instruction] = []
    comments: list[str] = []
    buf, start = "", 0
    for no, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.rstrip()
        if not buf and line.lstrip().startswith("#"):
            comments.append(line.lstrip()[1:].strip())
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # comment inside a continued RUN
        if not buf and not line.strip():
            comments = []
            continue
        if not buf:
            start = no
        if line.endswith("\\"):
            buf += line[:-1]
            continue
        buf += line
        keyword, _, rest = buf.strip().partition(" ")
        out.append(Instruction(keyword.upper(), rest.strip(), start, tuple(comments)))
        buf, comments = "", []
    if buf:
        raise ValueError(f"{path}: unterminated continuation at line {start}")
    return out


def expand(text: str, env: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return env.get(name, "")
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, text)


def parse_assignments(args: str, env: dict[str, str]) -> dict[str, str]:
    out = {}
    for tok in shlex.split(args):
        key, eq, value = tok.partition("=")
        if not eq:
            raise ValueError(f"unsupported ENV/ARG form: {args!r}")
        out[key] = expand(value, {**env, **out})
    return out


def stages(instrs: list[Instruction]) -> tuple[dict[str, str], dict[str, tuple[str, list[Instruction]]]]:
    """Global ARG defaults and {stage name: (FROM image expression, instructions)}."""
    global_args: dict[str, str] = {}
    result: dict[str, tuple[str, list[Instruction]]] = {}
    current = None
    for ins in instrs:
        if ins.cmd == "FROM":
            parts = ins.args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else f"#{len(result)}"
            current = []
            result[name] = (parts[0], current)
        elif current is None:
            if ins.cmd != "ARG":
                raise ValueError(f"line {ins.line}: {ins.cmd} before FROM")
            key, _, default = ins.args.partition("=")
            global_args[key] = default
        else:
            current.append(ins)
    return global_args, result


def chain(dockerfile: Path, build_args: dict[str, str], target: str | None = None):
    """(variables, [instructions of each stage from the external base up to `target` (last stage)])."""
    global_args, st = stages(parse(dockerfile))
    args = {**global_args, **build_args}
    name = target or list(st)[-1]
    order = []
    while name in st:
        image, body = st[name]
        order.append((name, body))
        name = expand(image, args)
    return args, list(reversed(order)), name


def dockerignore_patterns(context: Path) -> list[str]:
    f = context / ".dockerignore"
    if not f.exists():
        return []
    return [p.strip() for p in f.read_text().splitlines() if p.strip() and not p.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    result = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.rstrip("/")
        parts = rel.split("/")
        hit = any(fnmatch.fnmatch("/".join(parts[:i]), pat) or
                  (pat.startswith("**/") and fnmatch.fnmatch("/".join(parts[:i]).split("/")[-1], pat[3:]))
                  for i in range(1, len(parts) + 1))
        if hit:
            result = not neg
    return result


def replay(dockerfile: Path, context: Path, root: Path, build_args: dict[str, str], run_system: bool = False,
           env_overrides: dict[str, str] | None = None) -> dict[str, str]:
    args, order, base = chain(dockerfile, build_args)
    patterns = dockerignore_patterns(context)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_CONSTRAINT", "VIRTUAL_ENV"))}
    env.update(args)
    cwd = root
    root.mkdir(parents=True, exist_ok=True)
    print(f"replay: base image {base}; stages {' -> '.join(n for n, _ in order)}", flush=True)
    for stage, body in order:
        for ins in body:
            if ins.cmd in ("ARG",):
                key, _, default = ins.args.partition("=")
                env.setdefault(key, args.get(key, default))
            elif ins.cmd == "ENV":
                values = parse_assignments(ins.args, env)
                for k in REMAPPED:
                    if k in values:
                        values[k] = str(root / values[k].lstrip("/"))
                env.update(values)
                env.update(env_overrides or {})
            elif ins.cmd == "WORKDIR":
                target = expand(ins.args, env)
                cwd = Path(target) if target.startswith(str(root)) else root / target.lstrip("/")
                cwd.mkdir(parents=True, exist_ok=True)
            elif ins.cmd == "COPY":
                *srcs, dest = shlex.split(expand(ins.args, env))
                if any(s.startswith("--") for s in srcs):
                    raise ValueError(f"line {ins.line}: COPY flags are not replayed: {ins.args}")
                dest_path = cwd / dest
                for s in srcs:
                    if ignored(s, patterns):
                        raise SystemExit(f"line {ins.line}: COPY {s} is excluded by .dockerignore")
                    src = context / s
                    if not src.exists():
                        raise SystemExit(f"line {ins.line}: COPY source {s} does not exist")
                    target = dest_path / src.name if dest.endswith("/") and src.is_file() else dest_path
                    if src.is_dir():
                        shutil.copytree(src, target, dirs_exist_ok=True,
                                        ignore=lambda d, names: [n for n in names if ignored(
                                            os.path.relpath(os.path.join(d, n), context), patterns)])
                    else:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(src, target)
            elif ins.cmd == "RUN":
                script = ins.args
                if script.startswith("--mount"):
                    raise ValueError(f"line {ins.line}: RUN --mount is not replayed")
                if any(re.search(rf"(^|[\s;&|]){s}\b", script) for s in SYSTEM_STEPS) and not run_system:
                    print(f"replay: [{stage}:{ins.line}] skipped system step: {script.splitlines()[0][:80]}", flush=True)
                    continue
                script = script.replace("--no-cache-dir ", "")
                print(f"replay: [{stage}:{ins.line}] RUN {' '.join(script.split())[:160]}", flush=True)
                t = time.time()
                r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env)
                if r.returncode:
                    raise SystemExit(f"replay: line {ins.line} failed with exit code {r.returncode}")
                print(f"replay: [{stage}:{ins.line}] done in {time.time() - t:.0f}s", flush=True)
            elif ins.cmd in ("USER", "EXPOSE", "CMD", "ENTRYPOINT", "LABEL", "HEALTHCHECK", "SHELL", "STOPSIGNAL"):
                continue
            else:
                raise ValueError(f"line {ins.line}: {ins.cmd} is not supported by the replay")
    return env


def user_step(dockerfile: Path) -> Instruction:
    """The RUN instruction that creates the image's user (the one calling useradd)."""
    runs = [i for i in parse(dockerfile) if i.cmd == "RUN" and re.search(r"(^|[\s;&|])useradd\b", i.args)]
    if len(runs) != 1:
        raise ValueError(f"{dockerfile}: expected one RUN with useradd, found {len(runs)}")
    return runs[0]


ACCOUNT_FILES = ("passwd", "group", "shadow", "gshadow")


def replay_user_step(script: str, etc: Path, home: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a user-creation RUN against a base image's account files, without touching this machine's.

    ``etc`` holds the image's passwd/group/shadow/gshadow (e.g. Ubuntu 24.04's, with user ``ubuntu``
    at uid 1000). A copy of this machine's /etc with those four files swapped in, and ``home``, are
    bind-mounted over /etc and /home in a private mount namespace (``unshare --mount``, needs root),
    so the real useradd/userdel/groupadd edit the copies (a whole directory, because they replace
    files by rename); the results are copied back into ``etc``.
    """
    work = etc.parent / (etc.name + ".root")
    subprocess.run(["cp", "-a", "/etc", str(work)], capture_output=True)  # unreadable odds and ends: fine
    for f in ACCOUNT_FILES:
        shutil.copyfile(etc / f, work / f)
    inner = f"mount --bind {shlex.quote(str(work))} /etc && mount --bind {shlex.quote(str(home))} /home && {script}"
    try:
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-euo", "pipefail", "-c",
                               inner], env=env, capture_output=True, text=True, timeout=120)
    finally:
        for f in ACCOUNT_FILES:
            shutil.copyfile(work / f, etc / f)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dockerfile", default="Dockerfile")
    ap.add_argument("--context", default=".")
    ap.add_argument("--variant", default="cpu")
    ap.add_argument("--root", required=True, help="fake filesystem root for VENV and APP")
    ap.add_argument("--build-arg", action="append", default=[])
    ap.add_argument("--env", action="append", default=[], help="K=V overriding an ENV of the image")
    a = ap.parse_args()
    build_args = dict(kv.split("=", 1) for kv in a.build_arg)
    build_args["VARIANT"] = a.variant
    env = replay(Path(a.dockerfile), Path(a.context).resolve(), Path(a.root).resolve(), build_args,
                 env_overrides=dict(kv.split("=", 1) for kv in a.env))
    print(f"replay: finished; VENV={env.get('VENV')} APP={env.get('APP')}")


if __name__ == "__main__":
    sys.exit(main())
