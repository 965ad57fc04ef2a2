"""The folders are the architecture: import-linter's contracts (pyproject.toml) hold, and they can fail."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent))


def _lint(config: Path) -> subprocess.CompletedProcess:
    assert LINT, "lint-imports is not installed: `make install` installs the dev extra"
    return subprocess.run(
        [LINT, "--config", str(config), "--no-cache"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_contracts_hold():
    proc = _lint(ROOT / "pyproject.toml")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "0 broken" in proc.stdout
    for name in ("Layers: cli > bench", "The core imports no method", "Only the command line parses arguments"):
        assert name in proc.stdout


def test_a_broken_contract_fails(tmp_path):
    """The same checker, with the core forbidden to import torch (which it does): it must report the break."""
    text = (ROOT / "pyproject.toml").read_text()
    start = text.index("[tool.importlinter]")
    broken = text[start:] + (
        '\n[[tool.importlinter.contracts]]\nname = "probe"\ntype = "forbidden"\n'
        'source_modules = ["mimi.core"]\nforbidden_modules = ["torch"]\n'
    )
    config = tmp_path / "pyproject.toml"
    config.write_text(broken)
    proc = _lint(config)
    assert proc.returncode != 0
    assert "probe BROKEN" in proc.stdout
