"""The ingest lock of a knowledge base, held as a renewed lease while one ingest writes.

The lock itself is a Milvus collection (`MilvusStore.lock`), so it holds across processes, hosts and
Ray clusters that share the store; `ingest_lock` takes it, renews it in a thread and releases it,
and the `IngestLease` it yields stops the ingest at its next write once the lock is lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any, Iterator

from lorag.milvus import StoreLocked, lock_collection

if TYPE_CHECKING:
    from lorag.handle import StoreHandle

LOCK_LEASE_S = 120.0  # a lock its holder has not renewed for this long is stale (the holder died, on another host)


class LockLost(StoreLocked):
    """The ingest lock was taken over (or removed) while this ingest held it."""


class IngestLease:
    """One ingest's hold on its knowledge base's lock (`ingest_lock` yields it and renews it).

    The ingest calls `check` before each write: once a renewal has found the lock held by someone
    else it raises `LockLost`, so the ingest stops instead of writing beside another one.
    """

    def __init__(self, store: "StoreHandle", collection: str, kb: str, token: str):
        self.store, self.collection, self.kb, self.token = store, collection, kb, token
        self.lost = False

    def renew(self) -> None:
        """Renew the lock now; a renewal refused (`renew_lock` False: another holds it) marks it lost."""
        if not self.lost and not self.store.renew_lock(self.collection, self.token):
            self.lost = True
            logging.getLogger(__name__).error("the ingest lock of knowledge base %s was lost; the ingest stops at its next write", self.kb)

    def check(self, confirm: bool = False) -> None:
        """Raise `LockLost` if the lock is known lost; `confirm` asks Milvus first (before a delete).

        Raises:
            LockLost: naming the knowledge base, the lock and what to do.
        """
        if confirm:
            self.renew()
        if self.lost:
            raise LockLost(
                f"knowledge base {self.kb!r}: this ingest lost its lock {lock_collection(self.collection)!r} at {self.store.uri} "
                f"(another ingest took it over, or it was removed), so it stopped before writing more; make sure no other ingest "
                f"of {self.kb!r} is running (a holder that stops renewing for {LOCK_LEASE_S:.0f} s is taken over), then run it again"
            )


@contextlib.contextmanager
def ingest_lock(store: "StoreHandle", collection: str, kb: str, renew_every: float = LOCK_LEASE_S / 6) -> Iterator[IngestLease]:
    """Hold the ingest lock of `collection` while the block runs, renewing it every `renew_every` s.

    The lock lives in Milvus (a lock collection, see `MilvusStore.lock`), so it holds across
    processes, hosts and Ray clusters that share the store. A lock whose holder is gone is taken
    over: at once when the holder was a process on this host that no longer exists (a killed
    ingest), else once it has not been renewed for `LOCK_LEASE_S`. A lock this block loses (a
    renewal finds another holder) is lost loudly: the yielded `IngestLease.check` raises from then
    on, and so does the end of the block.

    Raises:
        StoreLocked: a live ingest holds it (the message names its host, pid and start time).
        LockLost: the lock was lost while the block ran, and the block did not fail otherwise.
    """
    import threading
    import uuid

    me = {"token": uuid.uuid4().hex, "kb": kb, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    for _ in range(5):  # a holder that releases while we read it leaves nothing to report: try again
        holder = store.lock(collection, me)
        if holder is None:
            break
        if holder and not _stale(holder):
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
            raise StoreLocked(
                f"knowledge base {kb!r} is being ingested by pid {holder['pid']} on {holder['host']} since {since} "
                f"(lock {lock_collection(collection)!r} at {store.uri}); wait for that "
                f"ingest to finish, then run this one again (a lock whose holder died expires {LOCK_LEASE_S:.0f} s after its last renewal)"
            )
        if holder:
            store.unlock(collection, holder["token"])
    else:
        raise StoreLocked(f"knowledge base {kb!r}: could not take the ingest lock {lock_collection(collection)!r}; other ingests keep taking it, try again")
    stop = threading.Event()
    lease = IngestLease(store, collection, kb, me["token"])

    def renew() -> None:
        from pymilvus.exceptions import MilvusException

        while not lease.lost and not stop.wait(renew_every):
            try:
                lease.renew()
            except (MilvusException, ConnectionError) as e:  # a missed renewal is retried; the lease has room for five
                logging.getLogger(__name__).warning("could not renew the ingest lock of %s: %s", kb, e)

    thread = threading.Thread(target=renew, name="lorag-ingest-lock", daemon=True)
    thread.start()
    try:
        yield lease
        lease.check()  # the block finished, but another ingest may have written beside it
    finally:
        stop.set()
        thread.join()
        store.unlock(collection, me["token"])


def _stale(holder: dict[str, Any]) -> bool:
    if time.time() - holder.get("renewed", 0) > LOCK_LEASE_S:
        return True
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
