"""Threads for in-process preparation (``data.num_proc`` 0, ``framework.data.prepare_task``): a bounded
producer thread, and the switch that lets the tokenizer use its Rust thread pool.

The tokenizer releases the GIL while it encodes, so a thread reading and parsing documents, a thread encoding
with the Rust pool on every core, and the main thread converting and writing overlap.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

POLL_S = 0.1  # how often a producer blocked on a full queue checks whether the consumer has stopped


def background(items: Iterable, maxsize: int, name: str = "background") -> Iterator:
    """``items``, produced by a thread at most ``maxsize`` items ahead of the consumer (memory stays bounded);
    an exception raised there is raised here; closing this generator stops the thread and waits for it."""
    q: queue.Queue = queue.Queue(maxsize)
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
        except BaseException as e:  # noqa: BLE001  (handed to the consumer, which raises it)
            put((False, e))
            return
        put((False, None))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            more, item = q.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        thread.join()


@contextmanager
def rust_thread_pool() -> Iterator[None]:
    """The tokenizer encodes batches with its Rust thread pool (``TOKENIZERS_PARALLELISM=true``) inside; after,
    ``false``: a process forked once the pool has run (DataLoader workers) must not use the pool, which the
    fork does not copy (the child would deadlock)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
