"""The pmhub demo chat on the ``websockets`` server library.

    pip install 'pmhub[examples]'
    python examples/websockets_chat.py --port 8001

The same demo as ``examples/asgi_chat.py`` (users, policy, ``--host``,
``--port``, ``--db``, ``PMHUB_SECRET``) on :class:`pmhub.adapters.websockets.PmhubServer`:
``ws://127.0.0.1:8001/ws`` and ``/healthz``, with real pings. It has no login
page or HTTP API: log in through the ASGI demo, started with the same
``PMHUB_SECRET`` and ``--db``, and connect here with the ``session`` cookie
it set. Both then share the messages and the logouts.
"""

from __future__ import annotations

import logging

import anyio

from pmhub import Hub, SessionAuthenticator, SQLiteStore
from pmhub.adapters.websockets import PmhubServer
from pmhub.demo import POLICY, arguments, demo_secret


async def serve(db: str, host: str, port: int) -> None:
    store = SQLiteStore(db)  # messages, and the sessions that logged out
    hub = Hub(store, POLICY)
    async with hub:
        server = PmhubServer(hub, SessionAuthenticator(demo_secret(), store))
        print(f"pmhub demo (websockets): ws://{host}:{port}/ws")
        await server.serve(host=host, port=port)  # until Ctrl+C or SIGTERM


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    anyio.run(serve, args.db, args.host, args.port)


if __name__ == "__main__":
    main()
