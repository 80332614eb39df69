"""Split a file too large for one device call's transfer (64 MiB with the working tree) into parts, one ignored
folder per part, so that consecutive calls to a warm GPU machine can each carry one and append it to a file there.

    python bench/carry_parts.py ~/.cache/dscompress/models/.../model.gguf --max-mib 56 --name qwen.gguf

writes .carry1/part, .carry2/part, ... (listed in .git/info/exclude) and prints, per call, the `carry` list and the
command; the last call's command checks the sha256 of the reassembled file. Files outside the repository persist on
the machine between calls while it stays warm (it is released after 30 s idle), so issue the calls back to back.
This is how the SmolLM2 GGUF (98 MB) reached the H200 for the distillation runs of 2026-12-01.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def split(source: Path, max_bytes: int) -> list[Path]:
    parts, index = [], 1
    with open(source, "rb") as fh:
        while block := fh.read(max_bytes):
            folder = REPO / f".carry{index}"
            folder.mkdir(exist_ok=True)
            (folder / "part").write_bytes(block)
            parts.append(folder)
            index += 1
    exclude = REPO / ".git" / "info" / "exclude"
    listed = set(exclude.read_text().split()) if exclude.exists() else set()
    with open(exclude, "a") as fh:
        for folder in parts:
            if f"/{folder.name}/" not in listed:
                fh.write(f"/{folder.name}/\n")
    return parts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("source", type=Path)
    ap.add_argument("--max-mib", type=int, default=56, help="bytes per part (leave room for the tree and wheels)")
    ap.add_argument("--name", default=None, help="file name on the machine (default: the source's)")
    ap.add_argument("--dest", default="/tmp/carried", help="folder on the machine")
    args = ap.parse_args()
    digest = hashlib.sha256(args.source.read_bytes()).hexdigest()
    parts = split(args.source, args.max_mib << 20)
    target = f"{args.dest}/{args.name or args.source.name}"
    for i, folder in enumerate(parts):
        write = ">" if i == 0 else ">>"
        command = f"mkdir -p {args.dest} && cat {folder.name}/part {write} {target}"
        if i == len(parts) - 1:
            command += f" && echo '{digest}  {target}' | sha256sum -c"
        print(f'call {i + 1}: carry ["{folder.name}"]  command: {command}')


if __name__ == "__main__":
    main()
