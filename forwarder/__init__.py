"""asset-forwarder: route asset messages from a source NATS to target NATS clusters by consistent hashing."""

from __future__ import annotations

__version__ = "0.1.0"
