"""Message stores: :class:`MemoryStore` for tests, :class:`SQLiteStore` embedded."""

from .memory import MemoryStore
from .sqlite import SQLiteStore

__all__ = ["MemoryStore", "SQLiteStore"]
