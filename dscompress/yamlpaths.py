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


# Bounds on what a recipe may be, so that a hostile one (a "billion laughs" of nested aliases, a huge or deeply
# nested document) fails at once: real recipes are a few KB, a few hundred values and under 10 levels deep.
MAX_BYTES = 1 << 20
MAX_VALUES = 100_000  # after aliases are expanded
MAX_DEPTH = 64


def _read_text(path: Path) -> str:
    if not path.exists():
        raise RecipeError(f"{path}: recipe file not found. Fix: check the path (see recipes/ for examples)")
    if path.is_dir():
        raise RecipeError(f"{path}: is a directory, not a recipe file. Fix: pass the .yaml file inside it")
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise RecipeError(f"{path}: {size} bytes; a recipe is at most {MAX_BYTES} bytes. Fix: check the file")
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror}). Fix: check its permissions") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"{path}: not UTF-8 text (byte {exc.start}: {raw[exc.start : exc.start + 1]!r}); a recipe is a UTF-8 "
            "YAML file. Fix: save it as UTF-8"
        ) from None
    if "\x00" in text:
        raise RecipeError(f"{path}: contains NUL bytes, so it is not a text file. Fix: pass the YAML recipe")
    return text


def _expanded_size(node: yaml.Node, path: Path, memo: dict[int, int], depth: int = 0) -> int:
    """How many values `node` stands for once aliases are expanded, computed without expanding them."""
    if depth > MAX_DEPTH:
        raise RecipeError(f"{path}: nested over {MAX_DEPTH} levels deep. Fix: a recipe is a few levels of keys")
    if id(node) in memo:
        return memo[id(node)]
    children = []
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    memo[id(node)] = 1 + sum(_expanded_size(c, path, memo, depth + 1) for c in children)
    if memo[id(node)] > MAX_VALUES:
        raise RecipeError(
            f"{path}:{node.start_mark.line + 1}: expands to over {MAX_VALUES} values (nested YAML aliases?). Fix: "
            "write the recipe out without anchors and aliases that multiply"
        )
    return memo[id(node)]


def load_located(path: Path) -> LocatedYaml:
    """Read a YAML file; a missing, unreadable, non-text, oversized or malformed file becomes a one-line
    RecipeError, before anything is expanded."""
    text = _read_text(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _expanded_size(node, path, {})
        data = yaml.safe_load(text)
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to read. Fix: a recipe is a few levels of keys") from None
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
