"""The wire protocol, machine-readable: AsyncAPI 3 for the WebSocket, OpenAPI 3.1 for HTTP.

Both documents are generated from the msgspec schemas the server decodes
and encodes with (:mod:`pmhub.frames`, :mod:`pmhub.api`), so they cannot
drift from the code. The ASGI adapter serves them at ``asyncapi.json`` and
``openapi.json``; ``python -m pmhub.schemas --write docs`` writes them to
``docs/``, where a test checks that they are current and valid.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, get_args

import msgspec

from . import __version__
from .api import ErrorBody, Health, HistoryPage, PostMessage, PostRead, ReadResult, Unhealthy
from .errors import STATUS_BY_CODE
from .frames import ClientFrame, Conversation, Message, ServerFrame

__all__ = ["asyncapi", "openapi", "render", "write"]

_REF = "#/components/schemas/{name}"


def _components(types: list[Any]) -> dict[str, Any]:
    _, components = msgspec.json.schema_components(types, ref_template=_REF)
    return components


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the WebSocket (``/ws``): one message per frame type."""
    client, server = get_args(ClientFrame), get_args(ServerFrame)
    messages = {
        frame.__name__: {
            "name": frame.__struct_config__.tag,
            "title": frame.__name__,
            "summary": (frame.__doc__ or "").strip().split("\n")[0],
            "contentType": "application/json",
            "payload": _ref(frame.__name__),
        }
        for frame in (*client, *server)
    }
    operations = {
        f"send{frame.__name__}": {
            "action": "receive",  # the server receives what clients send
            "channel": {"$ref": "#/channels/chat"},
            "messages": [{"$ref": f"#/channels/chat/messages/{frame.__name__}"}],
        }
        for frame in client
    } | {
        f"push{frame.__name__}": {
            "action": "send",
            "channel": {"$ref": "#/channels/chat"},
            "messages": [{"$ref": f"#/channels/chat/messages/{frame.__name__}"}],
        }
        for frame in server
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "pmhub chat protocol",
            "version": __version__,
            "description": (
                "Version 1 of the pmhub wire protocol: JSON text frames discriminated by"
                " `type`. The handshake is authenticated by a cookie (or header) and its"
                " `Origin` is checked; see docs/protocol.md for the rules (limits, close"
                " codes, ordering)."
            ),
        },
        "channels": {
            "chat": {
                "address": "/ws",
                "title": "The chat WebSocket",
                "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in messages},
            }
        },
        "operations": operations,
        "components": {"messages": messages, "schemas": _components([*client, *server])},
    }


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the HTTP API that ``PmhubApp`` serves."""
    bodies = [PostMessage, PostRead, ReadResult, HistoryPage, Conversation, Message]
    schemas = _components([*bodies, Health, Unhealthy, ErrorBody])

    def body(name: str) -> dict[str, Any]:
        return {"content": {"application/json": {"schema": _ref(name)}}}

    def answer(description: str, name: str | None = None) -> dict[str, Any]:
        return {"description": description, **(body(name) if name else {})}

    errors = {
        str(status): answer(f"refused: {', '.join(sorted(codes))}", "ErrorBody")
        for status, codes in _codes_by_status().items()
        if status != 503
    }
    unavailable = {"503": answer("the store or the hub is down: try again later", "ErrorBody")}
    peer = {
        "name": "peer_id",
        "in": "path",
        "required": True,
        "schema": {"type": "integer", "minimum": -(2**53), "maximum": 2**53},
    }
    authenticated: list[dict[str, list[str]]] = [{"session": []}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pmhub HTTP API",
            "version": __version__,
            "description": (
                "Served by pmhub's ASGI adapter beside `/ws`. Requests other than GET and"
                " HEAD need `Content-Type: application/json` and a same-site `Origin`."
            ),
        },
        "paths": {
            "/api/messages": {
                "post": {
                    "summary": "Send a message, fanned out as a WebSocket send is",
                    "security": authenticated,
                    "requestBody": {"required": True, **body("PostMessage")},
                    "responses": {
                        "201": answer("stored", "Message"),
                        "200": answer("a resend: the stored message", "Message"),
                        **errors,
                        **unavailable,
                    },
                }
            },
            "/api/messages/{peer_id}": {
                "get": {
                    "summary": "A page of your conversation with peer_id, oldest first",
                    "security": authenticated,
                    "parameters": [
                        peer,
                        _query("before_id", "only messages with a lower id"),
                        _query("limit", "page size, default 50, clamped to 1..200"),
                    ],
                    "responses": {
                        "200": answer("the page", "HistoryPage"),
                        **errors,
                        **unavailable,
                    },
                }
            },
            "/api/messages/{peer_id}/read": {
                "post": {
                    "summary": "Mark the peer's messages up to an id as read",
                    "security": authenticated,
                    "parameters": [peer],
                    "requestBody": {"required": True, **body("PostRead")},
                    "responses": {
                        "200": answer("how many changed", "ReadResult"),
                        **errors,
                        **unavailable,
                    },
                }
            },
            "/api/conversations": {
                "get": {
                    "summary": "Every conversation of the caller, most recent first",
                    "security": authenticated,
                    "responses": {
                        "200": {
                            "description": "the conversations",
                            "content": {
                                "application/json": {
                                    "schema": {"type": "array", "items": _ref("Conversation")}
                                }
                            },
                        },
                        **errors,
                        **unavailable,
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Whether the store and the broker answer",
                    "responses": {
                        "200": answer("healthy", "Health"),
                        "503": answer("unhealthy", "Unhealthy"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (404 when metrics are off)",
                    "responses": {
                        "200": {
                            "description": "the Prometheus text format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        "404": answer("metrics are off", "ErrorBody"),
                    },
                }
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "session": {"type": "apiKey", "in": "cookie", "name": "session"},
            },
        },
    }


def _query(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": "integer", "minimum": -(2**53), "maximum": 2**53},
    }


def _codes_by_status() -> dict[int, list[str]]:
    by_status: dict[int, list[str]] = {}
    for code, status in STATUS_BY_CODE.items():
        by_status.setdefault(status, []).append(code)
    return dict(sorted(by_status.items()))


def render(document: dict[str, Any]) -> str:
    """The document as it is written to docs/ (stable key order, one trailing newline)."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def write(directory: Path) -> list[Path]:
    """Write ``asyncapi.json`` and ``openapi.json`` into ``directory``."""
    written = []
    for name, document in (("asyncapi.json", asyncapi()), ("openapi.json", openapi())):
        path = directory / name
        path.write_text(render(document), encoding="utf-8")
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, metavar="DIR", help="write the documents there")
    args = parser.parse_args()
    if args.write:
        for path in write(args.write):
            print(f"wrote {path}")
    else:
        print(render({"asyncapi": asyncapi(), "openapi": openapi()}))


if __name__ == "__main__":
    main()
