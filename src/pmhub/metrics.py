"""Operational metrics: a small interface, and a Prometheus implementation.

The hub reports through :class:`Metrics`; the default :class:`NullMetrics`
does nothing. :class:`PrometheusMetrics` (``pip install pmhub[metrics]``)
registers its collectors in a ``prometheus_client`` registry, the
application's own by default, so they are scraped with everything else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["Metrics", "NullMetrics", "PrometheusMetrics"]


class Metrics(Protocol):
    """What a hub reports as it runs."""

    def connections(self, count: int) -> None:
        """The hub now holds ``count`` open connections."""

    def users_online(self, count: int) -> None:
        """``count`` users have a connection open on this hub."""

    def message_in(self) -> None:
        """A private message was stored (counted once, not on resends)."""

    def frames_out(self, count: int) -> None:
        """``count`` frames were queued to connections."""

    def error(self, code: str) -> None:
        """An ``error`` frame or 4xx answer with ``code`` went out."""

    def slow_consumer(self) -> None:
        """A connection was closed with 1013 because its queue overflowed."""

    def store_latency(self, operation: str, seconds: float) -> None:
        """A store call named ``operation`` took ``seconds``."""


class NullMetrics:
    """Reports nothing."""

    def connections(self, count: int) -> None:
        pass

    def users_online(self, count: int) -> None:
        pass

    def message_in(self) -> None:
        pass

    def frames_out(self, count: int) -> None:
        pass

    def error(self, code: str) -> None:
        pass

    def slow_consumer(self) -> None:
        pass

    def store_latency(self, operation: str, seconds: float) -> None:
        pass


class PrometheusMetrics:
    """Metrics in a ``prometheus_client`` registry (the global one by default)."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, namespace: str = "pmhub"
    ) -> None:
        try:
            import prometheus_client as prom
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError(
                "PrometheusMetrics needs prometheus_client: pip install 'pmhub[metrics]'"
            ) from None
        self.registry = registry if registry is not None else prom.REGISTRY
        ns, reg = namespace, self.registry
        self._connections = prom.Gauge(
            "connections", "Open WebSocket connections.", namespace=ns, registry=reg
        )
        self._users = prom.Gauge(
            "users_online", "Users with an open connection.", namespace=ns, registry=reg
        )
        self._in = prom.Counter(
            "messages_in", "Private messages stored.", namespace=ns, registry=reg
        )
        self._out = prom.Counter(
            "frames_out", "Frames queued to connections.", namespace=ns, registry=reg
        )
        self._errors = prom.Counter(
            "errors", "Error answers by code.", ["code"], namespace=ns, registry=reg
        )
        self._slow = prom.Counter(
            "slow_consumer_closes",
            "Connections closed because they fell behind.",
            namespace=ns,
            registry=reg,
        )
        self._store = prom.Histogram(
            "store_seconds", "Store call latency.", ["operation"], namespace=ns, registry=reg
        )

    def connections(self, count: int) -> None:
        self._connections.set(count)

    def users_online(self, count: int) -> None:
        self._users.set(count)

    def message_in(self) -> None:
        self._in.inc()

    def frames_out(self, count: int) -> None:
        self._out.inc(count)

    def error(self, code: str) -> None:
        self._errors.labels(code).inc()

    def slow_consumer(self) -> None:
        self._slow.inc()

    def store_latency(self, operation: str, seconds: float) -> None:
        self._store.labels(operation).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The registry in the Prometheus text format, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
