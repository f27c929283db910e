"""Every dotted `avs.` name that docs/architecture.md lists is importable (a module or an attribute of one)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
NAME = re.compile(r"(?<![\w./-])avs(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def dotted_names(text: str) -> list[str]:
    return sorted(set(NAME.findall(text)))


def resolve(name: str) -> object:
    """The object `name` names: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)  # AttributeError: the name is wrong
        return obj
    raise ModuleNotFoundError(name)


def test_the_extractor_finds_names_and_resolve_refuses_a_wrong_one():
    text = "`avs.engine.loop.TrainLoop` and avs.evaluation.evaluate, not avs/engine or `pip install 'avs[viz]'`."
    assert dotted_names(text) == ["avs.engine.loop.TrainLoop", "avs.evaluation.evaluate"]
    with pytest.raises(AttributeError):
        resolve("avs.engine.TrainLoop")  # the package does not re-export it


@pytest.mark.parametrize("name", dotted_names(ARCHITECTURE.read_text()))
def test_every_dotted_name_in_architecture_md_is_importable(name):
    assert resolve(name) is not None
