"""YAML loading that remembers where every value came from, so errors can name file, line and path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dscompress.errors import RecipeError

Loc = tuple[str | int, ...]


def format_loc(loc: Loc) -> str:
    """('stages', 1, 'rtn', 'bits') -> 'stages[1].rtn.bits'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int], source: str) -> None:
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise RecipeError(
                    f"{source}:{key_node.start_mark.line + 1}: {format_loc(loc + (key,))}: duplicate key; "
                    "YAML would silently keep only the last one. Fix: remove one of them"
                )
            seen.add(key)
            _walk(value_node, loc + (key,), lines, source)
            lines[loc + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, loc + (i,), lines, source)


class LocatedYaml:
    """Parsed YAML data plus a map from each path to its 1-based line."""

    def __init__(self, data: Any, lines: dict[Loc, int], source: str):
        self.data = data
        self.lines = lines
        self.source = source

    def where(self, loc: Loc) -> str:
        """'recipe.yaml:12' for the deepest known prefix of `loc`."""
        for cut in range(len(loc), -1, -1):
            if loc[:cut] in self.lines:
                return f"{self.source}:{self.lines[loc[:cut]]}"
        return self.source


def load_located(path: Path) -> LocatedYaml:
    """Read a YAML file; a missing file or a YAML syntax error becomes a one-line RecipeError."""
    if not path.exists():
        raise RecipeError(f"{path}: recipe file not found. Fix: check the path (see recipes/ for examples)")
    if path.is_dir():
        raise RecipeError(f"{path}: is a directory, not a recipe file. Fix: pass the .yaml file inside it")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}{line}: invalid YAML: {problem}. Fix: correct the syntax there") from exc
    if not isinstance(data, dict):
        raise RecipeError(
            f"{path}: a recipe is a YAML mapping with keys model, data, stages, ...; got "
            f"{type(data).__name__}. Fix: see recipes/ for examples"
        )
    lines: dict[Loc, int] = {}
    _walk(node, (), lines, str(path))
    return LocatedYaml(data, lines, str(path))
