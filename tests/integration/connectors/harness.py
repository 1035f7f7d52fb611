"""What the connector conformance suite needs from each protocol.

Each protocol adds ``harness_<proto>.py`` in this folder defining ``HARNESS``: an object with the
attributes and coroutines of :class:`Harness`. ``test_conformance.py`` discovers every such module
and runs the same checks on each connector.
"""

from __future__ import annotations

from typing import Any, Protocol

from protocols.base import Connector, ConnectorConfig


class Harness(Protocol):
    #: entry-point name of the connector (``edgeloop.connectors`` group)
    kind: str

    async def start_server(self) -> None:
        """Start a real server/broker the connector can read from (fresh port each time)."""

    async def stop_server(self) -> None:
        """Stop it (the port stays reserved for restart_server)."""

    async def restart_server(self) -> None:
        """Stop and start it again on the same port, as an operator restart would."""

    def config(self) -> ConnectorConfig:
        """A config for the connector against the running server, with fast backoff."""

    def connector(self, config: ConnectorConfig) -> Connector[Any]:
        """Build the connector (no I/O)."""

    def expected_tags(self) -> set[tuple[str, str]]:
        """(asset, tag) pairs that must produce readings."""

    async def inject_malformed(self) -> None:
        """Make the server deliver input the connector cannot parse (counted, never fatal)."""

    async def close(self) -> None:
        """Release everything (servers, temp files)."""
