"""The benchmark: the forwarder against a bare nats-py relay (``make bench``; see docs/performance.md)."""
