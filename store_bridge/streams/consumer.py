"""The consumer loop every stream role shares: pending entries first, then new ones; handle;
acknowledge; survive a Redis restart.

A role subclasses `StreamConsumer` and implements `handle(entries)`, which must be idempotent
per entry: an entry is acknowledged only after `handle` returns, so a consumer killed between
the two gets the same entries again when it restarts (its own pending list is read first), and
one that stays dead has them taken over by another consumer of the group (XAUTOCLAIM).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis

from store_bridge.streams.stream import Entry, RedisStream

log = logging.getLogger("foundex.streams")


@dataclass
class ConsumerStats:
    entries: int = 0
    events: int = 0
    unreadable: int = 0  # entries acknowledged without handling: trimmed or corrupt
    reconnects: int = 0


class StreamConsumer:
    """One consumer of one group of one stream (see the module docstring)."""

    group: str = ""  # set by each role

    def __init__(
        self,
        stream: RedisStream,
        *,
        consumer: str | None = None,
        count: int = 64,
        block_ms: int = 200,
        claim_idle_ms: int = 60_000,
        trim_every_s: float = 2.0,
        group_start: str = "0",
    ) -> None:
        """consumer: this process's name within the group (default: the group's name, so a
        restarted single consumer finds its own pending entries); count: entries per read;
        group_start: where the group starts if it does not exist yet ("0" or "$")."""
        if not self.group:
            raise TypeError(f"{type(self).__name__} sets no consumer group")
        self.stream = stream
        self.consumer = consumer or self.group
        self.count, self.block_ms = int(count), int(block_ms)
        # A blocking read must return before the client's socket timeout, or every idle wait
        # would look like a dead server (and back off).
        timeout = stream.client.connection_pool.connection_kwargs.get("socket_timeout")
        if timeout:
            self.block_ms = max(1, min(self.block_ms, int(timeout * 1000 / 2)))
        self.claim_idle_ms, self.trim_every_s = int(claim_idle_ms), float(trim_every_s)
        self.group_start = group_start
        self.stats = ConsumerStats()
        self._recovered = False  # own pending entries handled since the last (re)connect
        self._last_trim = self._last_claim = 0.0

    def handle(self, entries: list[Entry]) -> None:
        """Process delivered entries (each `entry.table` is not None). Idempotent per entry."""
        raise NotImplementedError

    def poll(self, *, block: bool = True) -> int:
        """One round: own pending entries (after a start or reconnect), entries other
        consumers left idle, else new ones -> events handled. Raises redis errors."""
        if not self._recovered:
            self.stream.ensure_groups((self.group,), start=self.group_start)
            entries = self.stream.read(
                self.group, self.consumer, count=self.count, block_ms=None, pending=True
            )
            if not entries:
                self._recovered = True
        else:
            entries = []
            if time.monotonic() - self._last_claim > self.claim_idle_ms / 2000:
                self._last_claim = time.monotonic()
                entries = self.stream.claim_idle(
                    self.group, self.consumer, min_idle_ms=self.claim_idle_ms, count=self.count
                )
            entries = entries or self.stream.read(
                self.group, self.consumer, count=self.count,
                block_ms=self.block_ms if block else None, pending=False,
            )  # fmt: skip
        n = self._process(entries)
        if time.monotonic() - self._last_trim > self.trim_every_s:
            self._last_trim = time.monotonic()
            self.stream.trim()
        return n

    def _process(self, entries: list[Entry]) -> int:
        if not entries:
            return 0
        good = [e for e in entries if e.table is not None]
        bad = len(entries) - len(good)
        if bad:
            # Trimmed while pending (every group had acknowledged it) or not a record batch.
            log.warning("%s: %d stream entries without a readable batch acknowledged", self.group, bad)
            self.stats.unreadable += bad
        if good:
            self.handle(good)
        self.stream.ack(self.group, entries)
        events = sum(e.n for e in good)
        self.stats.entries += len(good)
        self.stats.events += events
        return events

    def drain(self, *, idle_rounds: int = 1) -> int:
        """Handle everything available now (tests, benchmarks) -> events handled."""
        total, idle = 0, 0
        while not self._recovered:
            total += self.poll(block=False)
        while idle < idle_rounds:
            n = self.poll(block=False)
            total += n
            idle = idle + 1 if n == 0 else 0
        return total

    def run(self, stop: threading.Event | None = None, *, max_backoff_s: float = 5.0) -> None:
        """Poll until `stop` is set. A lost connection (Redis restarted, network) is retried
        with backoff, and the consumer's pending entries are read again first, so it resumes
        from its last acknowledged entry."""
        stop = stop or threading.Event()
        backoff = 0.1
        while not stop.is_set():
            try:
                self.poll()
                backoff = 0.1
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as e:
                self.stats.reconnects += 1
                self._recovered = False
                log.warning("%s: Redis unavailable (%s); retrying in %.1f s", self.group, e, backoff)
                stop.wait(backoff)
                backoff = min(max_backoff_s, backoff * 2)
