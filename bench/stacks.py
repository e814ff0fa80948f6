"""Summarise a py-spy ``--format raw`` profile (collapsed stacks): where the time goes.

``python -m bench.stacks FILE [--top N]`` prints the functions with the most samples
of their own (self) and in total (inclusive, each function once per stack), as shares
of all samples taken while a thread was not waiting in its event loop.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

# A thread waiting in its event loop: uvloop waits in C, so the innermost Python frame is
# whatever started the loop (the main thread's asyncio Runner, the HTTP thread's _run).
IDLE_LEAVES = ("Runner.run ", "HttpThread._run ", "run_forever ", "_run_once ", "select ", "poll ")
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def frame_name(frame: str, lines: bool) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    file = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    if lines and m.group("line"):
        return f"{m.group('func')} ({file}:{m.group('line')})"
    return f"{m.group('func')} ({file})"


def load(path: Path, lines: bool, root: str = "") -> tuple[Counter[str], Counter[str], int, int]:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    busy = idle = 0
    for raw in path.read_text().splitlines():
        stack, _, count_text = raw.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        if frames[-1].startswith(IDLE_LEAVES):
            idle += count  # an event loop waiting (uvloop shows no Python frame for it)
            continue
        if root and not any(f.startswith(root) for f in frames):
            continue  # another thread, or a stack py-spy could not read whole
        busy += count
        names = [frame_name(f, lines) for f in frames]
        own[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    return own, inclusive, busy, idle


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stacks")
    p.add_argument("file", type=Path)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--lines", action="store_true", help="one entry per source line, not per function")
    p.add_argument("--root", default="Server.run", help="count stacks through this frame only ('' for all)")
    args = p.parse_args(argv)
    own, inclusive, busy, idle = load(args.file, args.lines, args.root)
    print(f"{busy} busy samples, {idle} idle ({idle / max(1, busy + idle):.0%} of all)")
    print("\nself time (share of busy samples)")
    for name, n in own.most_common(args.top):
        print(f"  {n / busy:6.1%}  {name}")
    print("\ninclusive time")
    for name, n in inclusive.most_common(args.top):
        print(f"  {n / busy:6.1%}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
