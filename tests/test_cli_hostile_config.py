"""Hostile config files through the real CLI: one line on stderr, exit code 2, quickly, nothing run.

tests/test_config.py checks the loader's messages case by case; here the same kinds of files go
through ``forwarder check-config`` and ``forwarder run`` as processes, the way an operator (or an
attacker who can write the file) meets them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from forwarder.config import MAX_CONFIG_BYTES

VALID_TAIL = (
    "source: {servers: ['nats://127.0.0.1:4222']}\nclusters: {C1: {servers: ['nats://127.0.0.1:4223']}}\n"
)


def billion_laughs(levels: int = 9) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, levels + 1):
        prev, name = chr(ord("a") + level - 1), chr(ord("a") + level)
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + "\n" + VALID_TAIL


def merge_bomb() -> str:
    lines = ["x0: &x0 {k0: v}"]
    for i in range(1, 80):
        lines.append(f"x{i}: &x{i} {{<<: *x{i - 1}, k{i}: v}}")
    return "\n".join(lines) + "\n" + VALID_TAIL


def cases(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a phrase the one error line must hold)."""
    out: dict[str, tuple[Path, str]] = {}

    def write(name: str, content: str | bytes, phrase: str) -> None:
        path = tmp / f"{name}.yaml"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        out[name] = (path, phrase)

    write("alias bomb", billion_laughs(), "more than 64 YAML aliases")
    write("merge-key alias bomb", merge_bomb(), "more than 64 YAML aliases")
    write(
        "one byte over 1 MiB",
        VALID_TAIL + "#" * (MAX_CONFIG_BYTES + 1 - len(VALID_TAIL) - 1) + "\n",
        "larger than",
    )
    big = tmp / "sparse 64 MiB.yaml"
    with big.open("wb") as fh:
        fh.truncate(64 * 1024 * 1024)
    out["sparse 64 MiB"] = (big, "larger than")
    out["/dev/zero"] = (Path("/dev/zero"), "larger than")
    write("a list", "- source\n- clusters\n", "must be a mapping")
    write("a scalar", "just text\n", "must be a mapping")
    write("empty", "", "must be a mapping")
    write("only a comment", "# nothing\n", "must be a mapping")
    write("two documents", VALID_TAIL + "---\n" + VALID_TAIL, "YAML")
    write("nested too deeply", "[" * 5000, "nested too deeply")
    write("NUL byte", "source: {servers: [nats://a]}\x00\n", "YAML")
    write("not UTF-8", b"source: \xff\xfe\n", "not valid UTF-8")
    marker = tmp / "pwned"
    write("python tag", f"!!python/object/apply:os.system ['touch {marker}']\n", "YAML")
    write(
        "python tag in a value",
        VALID_TAIL + f"x: !!python/object/apply:os.system ['touch {marker}']\n",
        "YAML",
    )
    write("a key of 100 KiB", VALID_TAIL + "k" * 100_000 + ": 1\n", "YAML")
    write("duplicate section", VALID_TAIL + VALID_TAIL, "duplicate key")
    directory = tmp / "a directory.yaml"
    directory.mkdir()
    out["a directory"] = (directory, "cannot read")
    return out


def run_cli(command: str, path: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "forwarder", command, "-c", str(path)],
        capture_output=True, text=True, timeout=30, env={**os.environ, "NATS_CLUSTER_X": ""},
    )  # fmt: skip
    return result, time.monotonic() - started


# ``run`` loads the file with the same code as ``check-config``: a few kinds are enough for it.
RUN_CASES = ("alias bomb", "one byte over 1 MiB", "/dev/zero", "a list", "python tag", "NUL byte")


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_hostile_config_files_give_one_line_and_exit_2(tmp_path, command):
    all_cases = cases(tmp_path)
    if command == "run":
        all_cases = {name: case for name, case in all_cases.items() if name in RUN_CASES}
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(
            zip(all_cases, pool.map(lambda c: run_cli(command, c[0]), all_cases.values()), strict=True)
        )
    for name, (result, elapsed) in results.items():
        phrase = all_cases[name][1]
        said = f"{name}: exit {result.returncode}, stdout {result.stdout!r}, stderr {result.stderr!r}"
        assert result.returncode == 2, said
        assert result.stdout == "", said
        lines = result.stderr.splitlines()
        assert len(lines) == 1, said
        assert lines[0].startswith("forwarder: "), said
        assert phrase in lines[0], said
        assert len(lines[0]) < 1000, said
        assert elapsed < 20, said  # generous: processes start in parallel on a shared machine
    assert not (tmp_path / "pwned").exists(), "a YAML tag ran a command"
