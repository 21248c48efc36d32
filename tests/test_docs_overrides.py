"""Every ``key=value`` override shown in the README, docs/ and cluster/ loads (issue 16 §5: copy-paste
examples that fail). Each line's overrides are applied together to the config that line runs: its
``--config``/``CONFIG=`` file, else the default of the command it shows (the sbatch scripts train
configs/mars.yaml, ``pipeline.train`` and ``scripts/demo.sh`` configs/synthetic.yaml)."""
import re
import shlex
from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, load_config, parse_text
from pipeline.search_space import TuneSettings

ROOT = Path(__file__).resolve().parents[1]
# a dotted key right after a space, quote or backtick, then "=" and a shell word (quotes kept for shlex)
OVERRIDE = re.compile(r"(?:(?<=[\s`'\"(])|^)([a-z][a-z_0-9]*(?:\.[a-z_0-9]+)+)=(\"[^\"]*\"|'[^']*'|[^\s`'\")]*)")
CONFIG = re.compile(r"(?:--config[ =]|CONFIG=)(\S+\.yaml)|(configs/[\w/-]+\.yaml)")


def _docs() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    files += [p for p in sorted((ROOT / "cluster").rglob("*")) if p.is_file() and p.suffix not in (".png", ".pyc")]
    return files


def _lines(path: Path):
    """(line number, text) with shell continuations (``\\`` at the end) joined."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        return
    held, start = "", 0
    for no, line in enumerate(text.splitlines(), 1):
        if not held:
            start = no
        held += line.lstrip("# ") if held else line
        if held.endswith("\\"):
            held = held[:-1] + " "
            continue
        yield start, held
        held = ""


def examples() -> list[tuple[str, str, list[str]]]:
    """(where, config path, ["key=value", ...]) for every line of the docs that shows overrides."""
    out = []
    for path in _docs():
        for no, line in _lines(path):
            found = OVERRIDE.findall(line)
            if not found:
                continue
            m = CONFIG.search(line)
            config = (m.group(1) or m.group(2)) if m else ("configs/mars.yaml" if "sbatch" in line
                                                           else "configs/synthetic.yaml")
            words = [f"{key}={shlex.split(value)[0] if value.strip() else value}" for key, value in found]
            out.append((f"{path.relative_to(ROOT)}:{no}", config, words))
    return out


EXAMPLES = examples()


def test_the_docs_show_overrides():
    assert len(EXAMPLES) >= 10, EXAMPLES  # the scan still finds the examples it is meant to check
    assert any("sbatch" in where for where, _, _ in EXAMPLES)


@pytest.mark.parametrize("where, config, words", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_doc_override_loads(where, config, words):
    tune = [w for w in words if w.startswith(("tune.", "search."))]
    train = [w for w in words if w not in tune]
    try:
        for w in tune:  # pipeline.tune's own settings; search.* entries are distributions, checked by tune
            key, _, raw = w.partition("=")
            if key.startswith("tune."):
                parse_text(TuneSettings, key[len("tune."):], raw)
        if train:
            assert isinstance(load_config(ROOT / config, train), Config)
    except ConfigError as exc:
        pytest.fail(f"{where}: {' '.join(words)} with {config}: {exc}")
