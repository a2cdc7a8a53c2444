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
          "--backend-store-uri", "--onnx-twin", "--no-deps", "--help",
          "--env-manager", "--dist"}


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


def _generate():
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_blocks_are_what_the_code_says():
    """docs/usage.md's table of the methods' options is what their dataclasses say, and
    docs/methods.md's settings tables are what each method declares (its defaults read
    from its parameters): ``python docs/generate.py`` rewrites them."""
    generate = _generate()
    for path, found in generate.blocks().items():
        text = path.read_text()
        for opening, body in found.items():
            assert generate.block(text, opening) == body.strip(), (
                f"{path.name}: {opening} differs from the code; run python docs/generate.py")


def test_every_method_compares_its_settings_with_its_reference():
    """Each compressor names its reference and lists its settings beside the reference's;
    a glp default that differs says why."""
    from glp.methods import compressors, setting_default

    for method in compressors():
        assert method.reference and method.settings, f"{method.name}: no settings table"
        for setting in method.settings:
            differs = setting_default(method, setting) != setting.reference
            assert setting.why or not differs, (
                f"{method.name}: {setting.name} is {setting_default(method, setting)} in glp "
                f"and {setting.reference} in the reference, with no reason given")
