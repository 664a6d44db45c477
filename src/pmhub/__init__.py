"""pmhub: real-time 1:1 private messaging over WebSockets.

The core (:class:`Hub`, :class:`Connection`, the frames of :mod:`pmhub.frames`)
does no network I/O; adapters (:mod:`pmhub.adapters.asgi`,
:mod:`pmhub.adapters.websockets`) wire it into a server, and :mod:`pmhub.client`
talks to it. Storage, brokers, authentication and permissions are small
protocols with ready implementations.
"""

from .auth import (
    Authenticator,
    Identity,
    LoginThrottle,
    Request,
    RevocationStore,
    SessionAuthenticator,
)
from .broker import Broker, InProcessBroker
from .connection import Connection
from .errors import BackendError, PmhubError, Rejected, Unauthenticated
from .frames import Conversation, Message
from .hub import Hub
from .limits import Limits
from .metrics import Metrics, NullMetrics, PrometheusMetrics
from .policy import AllowAll, ContactPolicy, PermissionPolicy, StaticPolicy
from .store import Draft, MessageStore, ReadReceipt
from .stores import MemoryStore, SQLiteStore

__version__ = "0.1.0"

__all__ = [
    "AllowAll",
    "Authenticator",
    "BackendError",
    "Broker",
    "Connection",
    "ContactPolicy",
    "Conversation",
    "Draft",
    "Hub",
    "Identity",
    "InProcessBroker",
    "Limits",
    "LoginThrottle",
    "MemoryStore",
    "Message",
    "MessageStore",
    "Metrics",
    "NullMetrics",
    "PermissionPolicy",
    "PmhubError",
    "PrometheusMetrics",
    "ReadReceipt",
    "Rejected",
    "Request",
    "RevocationStore",
    "SQLiteStore",
    "SessionAuthenticator",
    "StaticPolicy",
    "Unauthenticated",
    "__version__",
]
