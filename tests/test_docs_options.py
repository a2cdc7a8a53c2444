"""The options the README and docs/usage.md name are the CLI's (generated from the
parameter definitions), so the docs cannot drift from ``--help``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from flows.cli import app

ROOT = Path(__file__).resolve().parents[1]
# Options of tools other than glp that the docs quote (pip, prefect, mlflow, pytest).
OTHERS = {"--no-prompt", "--all", "--pool", "--param", "--durations", "--host", "--port",
          "--backend-store-uri", "--onnx-twin", "--no-deps", "--help"}


def cli_options() -> set[str]:
    group = typer.main.get_command(app)
    found = set()
    for command in group.commands.values():
        for param in command.params:
            found.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
    return found


@pytest.mark.parametrize("doc", ["README.md", "docs/usage.md"])
def test_every_option_the_docs_name_exists(doc):
    text = (ROOT / doc).read_text()
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    unknown = sorted(named - cli_options() - OTHERS)
    assert not unknown, f"{doc} names options no glp command has: {unknown}"


def test_the_method_options_table_is_the_generated_one():
    """docs/usage.md's table of the methods' options is what their dataclasses say."""
    from glp.methods import options_markdown

    text = (ROOT / "docs" / "usage.md").read_text()
    block = text.split("<!-- options: generated -->\n")[1].split("<!-- options: end -->")[0]
    assert block == options_markdown(), "regenerate it: see docs/usage.md, glp compress"
