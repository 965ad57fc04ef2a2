"""MkDocs hooks of mimi's docs: what is generated at build time, never copied by hand.

* ``<!-- cli-reference -->`` in a page becomes every command's ``--help``, from mimi's own argument parser (so the
  reference cannot drift from the command line).
* The committed result plots (``benchmarks/results/<suite>/report/*.png``) are published under ``img/<suite>/``,
  where the results pages show them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
PLOTS = ROOT / "benchmarks" / "results"


def on_files(files, config):
    for png in sorted(PLOTS.glob("*/report/*.png")):
        suite = png.parent.parent.name
        files.append(File.generated(config, f"img/{suite}/{png.name}", abs_src_path=str(png)))
    return files


def _help_of_every_command() -> str:
    os.environ.setdefault("COLUMNS", "110")  # argparse wraps to the terminal's width: fix it for a stable page
    from mimi.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = ["## mimi\n", "```text\n" + parser.format_help().rstrip() + "\n```\n"]
    for name, p in sorted(sub.choices.items()):
        parts += [f"## mimi {name}\n", "```text\n" + p.format_help().rstrip() + "\n```\n"]
    return "\n".join(parts)


def on_page_markdown(markdown, page, config, files):
    if "<!-- cli-reference -->" in markdown:
        markdown = markdown.replace("<!-- cli-reference -->", _help_of_every_command())
    return markdown
