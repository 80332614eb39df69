"""Text sources, deterministic disjoint splits, and fixed-length token windows.

Documents (pydoc topics, .txt paragraphs, .jsonl records) are grouped into blocks of about 2000 characters.
Each block goes to exactly one split by the sha256 of its text, so the splits are disjoint, deterministic, and
stable when window counts or lengths change. A split's blocks are tokenized, joined with the end-of-text token
and cut into non-overlapping windows; `samples` windows are taken evenly spaced across the split.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from dscompress.calibrate.spec import DataSpec
from dscompress.errors import DataError

BLOCK_CHARS = 2000
SPLITS = ("eval", "calibration", "train")


def read_documents(spec: DataSpec, source: str | None = None, field: str = "source") -> list[str]:
    source = source or spec.source
    if source == "builtin:pydoc":
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]
    if source == "builtin:stdlib-docstrings":
        return stdlib_docstrings()
    path = Path(source)
    if not path.is_file():
        raise DataError(f"data.{field}: {source}: file not found. Fix: give a .txt/.jsonl file or builtin:pydoc")
    if path.suffix == ".jsonl":
        return _read_jsonl(path, spec.text_field)
    if path.suffix == ".txt":
        return [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    raise DataError(f"data.{field}: {source}: unsupported file type; use .txt or .jsonl")


def stdlib_docstrings(min_chars: int = 200) -> list[str]:
    """Docstrings (modules, classes, functions) of this Python's standard library, read with `ast` (nothing is
    imported), in file order: about 1.1 MB of English technical prose on Python 3.11. Tests and GUI demos are
    left out."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "tkinter", "turtledemo"}
    docs = []
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = (
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        )
        docs += [d for n in nodes if (d := ast.get_docstring(n)) and len(d) >= min_chars]
    return docs


def _read_jsonl(path: Path, field: str) -> list[str]:
    docs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise DataError(f"{path}:{number}: no string field {field!r}. Fix: set data.text_field")
        docs.append(record[field])
    return docs


def make_blocks(documents: list[str], block_chars: int = BLOCK_CHARS) -> list[str]:
    """Cut documents at paragraph boundaries into blocks of at least `block_chars` (the last may be shorter)."""
    blocks, current = [], ""
    for doc in documents:
        for para in doc.split("\n\n"):
            if not para.strip():
                continue
            current = f"{current}\n\n{para}" if current else para
            if len(current) >= block_chars:
                blocks.append(current)
                current = ""
    if current.strip():
        blocks.append(current)
    return blocks


def assign_split(block: str, fractions: dict[str, float]) -> str:
    u = int.from_bytes(hashlib.sha256(block.encode("utf-8")).digest()[:8], "big") / 2**64
    edge = 0.0
    for name in SPLITS:
        edge += fractions[name]
        if u < edge:
            return name
    return SPLITS[-1]


def split_texts(spec: DataSpec) -> dict[str, list[str]]:
    docs = read_documents(spec)
    if not any(d.strip() for d in docs):
        raise DataError(f"data.source: {spec.source}: the corpus is empty. Fix: point it at real text")
    fractions = spec.fractions.model_dump()
    out: dict[str, list[str]] = {name: [] for name in SPLITS}
    for block in make_blocks(docs):
        out[assign_split(block, fractions)].append(block)
    if spec.extra_train_source:
        held_out = set(out["eval"]) | set(out["calibration"])
        extra = make_blocks(read_documents(spec, spec.extra_train_source, "extra_train_source"))
        out["train"] += [b for b in extra if b not in held_out]
    return out


def token_windows(tokenizer, texts: list[str], seq_len: int, samples: int, split: str) -> torch.Tensor:
    """(samples, seq_len) int64 windows, evenly spaced over the split's token stream."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    available = len(ids) // seq_len
    samples = available if samples == "all" else samples
    if available < samples or samples == 0:
        raise DataError(
            f"data.{split}: the corpus is too short: its {split} split has {len(ids)} tokens = {available} "
            f"windows of {seq_len}, but {samples} are asked. Fix: lower data.{split}.samples or "
            f"data.{split}.seq_len, or bring more text"
        )
    starts = [(i * available // samples) * seq_len for i in range(samples)]
    return torch.tensor([ids[s : s + seq_len] for s in starts], dtype=torch.long)


class Corpus:
    """Splits of one text source, tokenized lazily per split and cached."""

    def __init__(self, spec: DataSpec, tokenizer):
        self.spec = spec
        self.tokenizer = tokenizer
        self._texts: dict[str, list[str]] | None = None
        self._windows: dict[str, torch.Tensor] = {}

    def windows(self, split: str) -> torch.Tensor:
        if split not in self._windows:
            if self._texts is None:
                self._texts = split_texts(self.spec)
            size = getattr(self.spec, split)
            self._windows[split] = token_windows(self.tokenizer, self._texts[split], size.seq_len, size.samples, split)
        return self._windows[split]
