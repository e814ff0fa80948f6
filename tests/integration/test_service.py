"""The Server as a process runs it: what ``run()`` adds to ``serve()``."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

from forwarder.config import load_config
from forwarder.service import Server

from .harness import write_config


async def test_a_started_forwarder_has_frozen_its_startup_heap_and_an_embedded_one_has_not(
    nats_servers, tmp_path: Path
) -> None:
    source = nats_servers.server(name="source")
    target = nats_servers.server(name="target")
    config = load_config(write_config(tmp_path / "f.yaml", source.url, {"C1": [target.url]}))
    gc.unfreeze()
    try:
        for freeze_heap in (False, True):
            server = Server(config)
            serving = asyncio.get_running_loop().create_task(
                server.serve(install_signals=False, freeze_heap=freeze_heap)
            )
            await asyncio.wait_for(server.started.wait(), 20)
            frozen = gc.get_freeze_count()
            server.handle_exit()
            assert await asyncio.wait_for(serving, 30) == 0
            # the process's own objects (modules, config, clients) are out of the collector's walk
            assert (frozen > 10_000) is freeze_heap, frozen
    finally:
        gc.unfreeze()  # the test process's heap back to the collector
