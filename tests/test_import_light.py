"""``import mimi`` and ``mimi --help`` stay light: timm, torchvision, the serving, training and methods stacks,
and the optional extras are imported only when something needs them.

Each check runs in a fresh interpreter (the test session itself has imported everything long ago); each start
imports torch (about 1.5 s), so the checks are grouped into few interpreters.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = (
    "torchvision",
    "timm",
    "onnx",
    "onnxruntime",
    "matplotlib",
    "peft",
    "transformers",
    "mimi.deploy",
    "mimi.methods",
    "mimi.training",
)
LOADED = f"sorted(m for m in {HEAVY!r} if m in sys.modules)"  # an expression: the heavy modules imported so far


def _python(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object as its last line of stdout."""
    proc = subprocess.run([sys.executable, *args, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_mimi_is_light_and_adapter_bank_lazy():
    got = _python(
        f"""
import json, sys
import mimi
out = {{"import": {LOADED}}}
mimi.add_adapters, mimi.AdapterConfig, mimi.adapters, mimi.prune, mimi.MiMiPruner, mimi.save_adapters, mimi.SCORES
out["core names"] = {LOADED}
out["in dir"] = "AdapterBank" in dir(mimi) and "AdapterBank" in mimi.__all__
bank = mimi.AdapterBank
from mimi import AdapterBank
from mimi.deploy import AdapterBank as real
out["same class"] = bank is real is AdapterBank
out["deploy after"] = "mimi.deploy" in sys.modules
print(json.dumps(out))
"""
    )
    assert got == {"import": [], "core names": [], "in dir": True, "same class": True, "deploy after": True}


def test_submodules_are_loaded_on_first_access():
    got = _python(
        """
import json, sys
import mimi
before = "mimi.trainer" in sys.modules
train = mimi.trainer.train
print(json.dumps({"before": before, "after": "mimi.trainer" in sys.modules, "config": hasattr(mimi.config, "TrainConfig")}))
"""
    )
    assert got == {"before": False, "after": True, "config": True}


def test_python_m_mimi_help_is_light():
    # -X importtime lists every module the interpreter imported, on stderr.
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mimi", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0 and "usage: mimi" in proc.stdout, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "mimi.cli" in imported  # the listing is what we think it is
    assert sorted(imported & set(HEAVY)) == []


def test_subcommand_help_is_light():
    # Command modules import their heavy dependencies inside the command functions, so building the parser
    # (every subcommand's flags) loads none of them. torch itself comes with the mimi core.
    got = _python(
        f"""
import contextlib, io, json, sys
from mimi.cli import main
out = {{}}
for argv in (["train", "--help"], ["bench", "--help"], ["serve", "--help"], ["export", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 0, (argv, e.code)
    out[argv[0]] = {LOADED}
print(json.dumps(out))
"""
    )
    assert got == {"train": [], "bench": [], "serve": [], "export": []}
