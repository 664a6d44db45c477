"""Group commit: every message a hub stores goes through one writer task.

Sends from all connections join the open batch. The writer takes the whole
batch, stores it with one :meth:`~pmhub.store.MessageStore.save_many` (one
transaction, one flush), publishes the new messages in id order, and only
then wakes the senders, so persist-before-confirm holds for each of them.
Whatever arrives while a batch commits forms the next one: under load a
commit serves many messages, and at low load a message commits alone at
once, with no batching delay.

The open batch is bounded (``max_batch``); a sender that finds it full waits
for the writer to take it, which holds back that connection and no other.
:meth:`Sequencer.submit` waits for the outcome (an HTTP request answers with
it); :meth:`Sequencer.submit_then` returns once the draft is queued, so a
WebSocket reader goes on to its next frame while the batch commits, and the
writer reports the outcome.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import anyio
from anyio.abc import TaskStatus

from .errors import BackendError
from .frames import Message
from .store import Draft

__all__ = ["Sequencer"]

logger = logging.getLogger("pmhub")

Saved = tuple[Message, bool]
#: Called by the writer task with a draft's outcome: stored, or why not.
Then = Callable[[Saved | BackendError], None]


class _Batch:
    """Drafts committed together; ``done`` is set once they are stored and
    published (``results``) or failed (``error``)."""

    __slots__ = ("done", "drafts", "error", "results", "thens")

    def __init__(self) -> None:
        self.drafts: list[Draft] = []
        self.results: list[Saved] = []
        self.error: BackendError | None = None
        self.done = anyio.Event()
        self.thens: list[tuple[int, Then]] = []

    def outcome(self, index: int) -> Saved | BackendError:
        return self.error if self.error is not None else self.results[index]

    def finish(self) -> None:
        self.done.set()
        for index, then in self.thens:
            try:
                then(self.outcome(index))
            except Exception:  # one sender's report must not stop the writer
                logger.exception("reporting the outcome of a send failed")


class Sequencer:
    """Commits sends in batches, then publishes them in id order.

    ``save`` stores a batch in one transaction; ``publish`` fans out one
    newly created message. Run :meth:`run` in a task group; :meth:`submit`
    from any task.
    """

    def __init__(
        self,
        save: Callable[[Sequence[Draft]], Awaitable[list[Saved]]],
        publish: Callable[[Message], Awaitable[None]],
        *,
        max_batch: int,
    ) -> None:
        self._save = save
        self._publish = publish
        self._max_batch = max_batch
        self._open = _Batch()
        self._pending = anyio.Event()  # set when the open batch has drafts
        self._taken = anyio.Event()  # set when the writer takes the open batch
        self._closed = False
        self._stopped = anyio.Event()

    async def submit(self, draft: Draft) -> Saved:
        """Store ``draft`` in the next batch; return the stored message and
        whether it was created. Raises :class:`~pmhub.errors.BackendError` if
        its batch failed to commit (none of the batch was stored) or the writer
        stopped first."""
        batch, index = await self._join(draft)
        await batch.done.wait()
        outcome = batch.outcome(index)
        if isinstance(outcome, BackendError):  # a fresh exception for each waiter
            raise BackendError(str(outcome)) from outcome.__cause__
        return outcome

    async def submit_then(self, draft: Draft, then: Then) -> None:
        """Queue ``draft`` and return; the writer calls ``then`` with its outcome
        once the batch is stored and published (or failed). Raises
        :class:`~pmhub.errors.BackendError` at once if the writer stopped."""
        batch, index = await self._join(draft)
        batch.thens.append((index, then))

    async def _join(self, draft: Draft) -> tuple[_Batch, int]:
        while len(self._open.drafts) >= self._max_batch and not self._closed:
            await self._taken.wait()
        if self._closed:
            raise BackendError("the hub is shutting down: nothing was stored")
        batch = self._open
        batch.drafts.append(draft)
        self._pending.set()
        return batch, len(batch.drafts) - 1

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Commit batches until :meth:`aclose` (or cancellation)."""
        task_status.started()
        batch: _Batch | None = None
        try:
            while True:
                if not self._open.drafts:
                    if self._closed:
                        return
                    await self._pending.wait()
                    self._pending = anyio.Event()
                    continue
                batch, self._open = self._open, _Batch()
                self._taken.set()
                self._taken = anyio.Event()
                try:
                    batch.results = await self._save(batch.drafts)
                except Exception as exc:
                    batch.error = BackendError(f"the batch was not stored: {exc}")
                    batch.error.__cause__ = exc
                else:
                    await self._publish_created(batch.results)
                batch.finish()
                batch = None
        finally:
            self._closed = True
            stopped = BackendError("the hub stopped before the batch was stored")
            for unfinished in (batch, self._open):
                if unfinished is not None and not unfinished.done.is_set():
                    unfinished.error = stopped
                    unfinished.finish()
            self._taken.set()
            self._stopped.set()

    async def _publish_created(self, results: list[Saved]) -> None:
        # Stored is stored: a fan-out that fails (the broker is down, and the hub
        # stops) does not make the batch fail; recipients get it with ``sync``.
        for message, created in results:
            if created:
                try:
                    await self._publish(message)
                except Exception:
                    logger.exception("message %d is stored but could not be fanned out", message.id)

    async def aclose(self) -> None:
        """Refuse new sends, and wait until :meth:`run` has committed what was
        submitted before and returned."""
        self._closed = True
        self._pending.set()
        self._taken.set()
        await self._stopped.wait()
