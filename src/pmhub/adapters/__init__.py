"""Adapters that wire a :class:`~pmhub.hub.Hub` into a server."""

__all__: list[str] = []
