"""The pmhub demo chat on ASGI (uvicorn), with its browser page at ``/``.

    pip install 'pmhub[examples]'
    python examples/asgi_chat.py            # then open http://127.0.0.1:8000/

Users alice (1), bob (2), carol (3) and mallory (4), each with the password
equal to the name; mallory may converse only with carol. Flags: ``--host``,
``--port``, ``--db`` (the SQLite file, default ``pmhub-demo.db``). Cookies are
signed with ``PMHUB_SECRET`` (random when unset: a restart logs everyone out).

The application is :func:`pmhub.demo.build_app`: a :class:`~pmhub.adapters.asgi.PmhubApp`
(``/ws``, the HTTP API, ``/client.js``) behind the demo's own routes (login,
logout, the page), which is also what ``python -m pmhub.demo`` runs.
"""

from __future__ import annotations

from pmhub.demo import build_app, main

__all__ = ["build_app", "main"]

if __name__ == "__main__":
    main()
