"""docs/client.md and the README: every Python example runs as written against real servers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from forwarder.client import AssetClient
from tests.integration.client_support import urls
from tests.integration.harness import ForwarderProcess, write_config

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "client.md"
OURS = re.compile(r"^(FORWARDER_|NATS_)")


def python_blocks(path: Path = DOC) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.DOTALL | re.MULTILINE)


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not OURS.match(k)}


def run_example(code: str, env: dict[str, str]) -> list[str]:
    clean = clean_env()
    result = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()


def test_the_examples_in_docs_client_md_run_as_written(nats_servers, tmp_path):
    source = nats_servers.server(name="source")
    targets = {
        "C1": nats_servers.server(name="c1"),
        "C2": nats_servers.cluster(name="c2", size=3),
        "C3": nats_servers.server(name="c3"),
    }
    config = write_config(tmp_path / "f.yaml", source.url, {n: urls(t) for n, t in targets.items()})
    fwd = ForwarderProcess(config, tmp_path / "fwd.log").start()
    try:
        fwd.wait_ready()
        cluster = AssetClient.from_config(config).cluster_for("pump-7")
        expected = [f"{cluster} assets.pump-7.temperature 21.{i}" for i in range(3)]
        blocks = python_blocks()
        assert len(blocks) == 2  # the async and the synchronous example
        environments = {
            "the forwarder's config file": {"FORWARDER_CONFIG": str(config)},
            "servers from the environment": {
                "FORWARDER_SOURCE": source.url,
                **{f"NATS_CLUSTER_{n}": ",".join(urls(t)) for n, t in targets.items()},
            },
        }
        for how, env in environments.items():
            for code in blocks:
                lines = run_example(code, env)
                assert lines[-3:] == expected, (how, code[:40], lines)
    finally:
        fwd.stop()


def test_the_readme_shows_the_examples_that_run():
    """The README's two examples are docs/client.md's, which the test above runs as written."""
    assert python_blocks(REPO / "README.md") == python_blocks()
