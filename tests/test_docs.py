"""The docs cannot rot: the site builds in strict mode (and a broken link or a vanished API name fails it), every
example in the docs and the README is run here or says why not, and every public name has a docstring."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mimi

ROOT = Path(__file__).resolve().parents[1]
MKDOCS = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
needs_mkdocs = pytest.mark.skipif(MKDOCS is None, reason="the [docs] extra (mkdocs) is not installed: make install")
PAGES = sorted((ROOT / "docs").rglob("*.md"))
MARK = re.compile(r"^<!-- (run|not run[^:]*: .+) -->$")


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MKDOCS, "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=config.parent,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    proc = _build(ROOT / "mkdocs.yml", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@needs_mkdocs
def test_the_site_builds_strictly_with_generated_references(site):
    cli = (site / "reference" / "cli.html").read_text()
    for command in mimi.cli.commands():  # every command's --help, generated from the parser
        assert f"mimi {command}" in cli
    assert "--budget-params" in cli and "--backbone-dtype" in cli
    api = (site / "reference" / "api.html").read_text()
    for name in ("add_adapters", "AdapterBank", "MiMiPruner", "TrainConfig", "register_score", "Traits"):
        assert name in api
    assert (site / "search" / "search_index.json").is_file()
    assert (site / "img" / "minivtab" / "pareto_mean.png").is_file()  # the committed plots are published


def _copy_docs(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    for name in ("src", "benchmarks"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path / "mkdocs.yml"


@needs_mkdocs
@pytest.mark.parametrize(
    ("page", "text", "says"),
    [
        ("concepts.md", "\nSee [the schedule](no-such-page.md).\n", "no-such-page.md"),
        ("reference/api.md", "\n::: mimi.no_such_name\n", "no_such_name"),
    ],
)
def test_a_broken_link_or_a_vanished_api_name_fails_the_build(tmp_path, page, text, says):
    config = _copy_docs(tmp_path)
    with (tmp_path / "docs" / page).open("a") as f:
        f.write(text)
    proc = _build(config, tmp_path / "site")
    assert proc.returncode != 0 and says in proc.stderr


def _blocks(path: Path) -> list[tuple[int, str, str, str]]:
    """``(line, mark, language, code)`` of every fenced block; ``mark`` is the comment line above it, or ''."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            lang = lines[i][3:].strip()
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            above = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            out.append((i + 1, above if MARK.match(above) else "", lang, "\n".join(lines[i + 1 : j])))
            i = j
        i += 1
    return out


EXAMPLES = [(p, b) for p in [ROOT / "README.md", *PAGES] for b in _blocks(p)]


def test_every_example_is_run_or_says_why_not():
    unmarked = [f"{p.relative_to(ROOT)}:{line}" for p, (line, mark, _, _) in EXAMPLES if not mark]
    assert not unmarked, f"examples with neither <!-- run --> nor <!-- not run: REASON -->: {unmarked}"
    assert sum(mark == "<!-- run -->" for _, (_, mark, _, _) in EXAMPLES) >= 2


RUNNABLE = [
    pytest.param(lang, code, id=f"{p.relative_to(ROOT)}:{line}")
    for p, (line, mark, lang, code) in EXAMPLES
    if mark == "<!-- run -->"
]


@pytest.mark.parametrize(("lang", "code"), RUNNABLE)
def test_runnable_examples_run(lang, code, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if lang == "bash":
        for command in (c for c in code.splitlines() if c.strip() and not c.startswith("#")):
            proc = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120, env=env)
            assert proc.returncode == 0, f"{command}: {proc.stderr[-2000:]}"
        return
    assert lang == "python"
    from vtab_fixture import write_vtab_task

    data = write_vtab_task(tmp_path / "data", n_classes=3, sizes={"train800": 32, "val200": 12, "test": 12})
    prelude = f"DATA_ROOT = {str(data)!r}\nOUT = {str(tmp_path / 'run')!r}\n"
    proc = subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _public():
    for name in mimi.__all__:
        yield f"mimi.{name}", getattr(mimi, name)
    from mimi import trainer
    from mimi.config import TrainConfig
    from mimi.deploy.bank import AdapterBank
    from mimi.methods import base

    for name, obj in inspect.getmembers(trainer, inspect.isfunction):
        if obj.__module__ == trainer.__name__ and not name.startswith("_"):
            yield f"mimi.trainer.{name}", obj
    yield "mimi.config.TrainConfig", TrainConfig
    for name, obj in inspect.getmembers(AdapterBank, inspect.isfunction):
        if not name.startswith("_"):
            yield f"AdapterBank.{name}", obj
    for name in ("Method", "Traits", "PrepareContext", "MethodOptions", "register"):
        yield f"mimi.methods.{name}", getattr(base, name)


def test_every_public_name_has_a_docstring():
    missing = [name for name, obj in _public() if not isinstance(obj, dict) and not (inspect.getdoc(obj) or "").strip()]
    assert not missing, f"public names without a docstring: {missing}"
    # one style, Google's (``Args:``, ``Returns:``, ``Raises:``), which the API pages are rendered with: no NumPy
    # sections (a title underlined with dashes) and no reST field lists
    numpy = re.compile(r"^\s*(Parameters|Returns|Raises|Yields|Attributes)\s*\n\s*-{3,}\s*$", re.M)
    rest = re.compile(r"^\s*:(param|returns?|raises?|type|rtype)\b", re.M)
    docs = {name: inspect.getdoc(obj) or "" for name, obj in _public()}
    other = [name for name, doc in docs.items() if numpy.search(doc) or rest.search(doc)]
    assert not other, f"docstrings not in Google style: {other}"


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    first = text.splitlines()[:8]  # the two commands that work on a fresh machine open the page
    start = next(i for i, line in enumerate(first) if line.startswith("```"))
    assert first[start + 1].startswith("make demo") and first[start + 2].startswith("make test")
    for target in re.findall(r"\]\((docs/[^)#]+)", text):  # every link into the docs points at a page
        assert (ROOT / target).is_file(), target
