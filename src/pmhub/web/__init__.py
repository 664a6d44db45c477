"""The browser client (``client.js``) and the demo chat page, shipped as package data."""

__all__: list[str] = []
