"""The event log and the users' state behind one small interface (`EventStore`).

An event (user, item, time, type) is appended to a durable log and folded into its user's
history in one atomic step, before `append` returns its sequence number: the service
acknowledges an event only once a crash can no longer lose it, and the next `history` read,
from any worker, sees it. Sequence numbers increase with commit order (a reader that keeps a
watermark and asks for `events_after(watermark)` misses nothing); they may skip numbers.

Item edits (items added by text or fields, items removed: `ItemEdit`) have a log of their
own with its own sequence numbers, durable the same way before `edit_items` returns: a
restarted service, or another worker polling `item_edits_after(watermark)`, replays them.

Two implementations:

    SqliteStore  sqlite:///<path>  (SQLAlchemy's convention: sqlite:///events.db is relative,
                 sqlite:////var/lib/recsys/events.db absolute). Embedded, no server; WAL
                 journal, synchronous=FULL (each commit fsyncs the WAL), one connection per
                 thread and process, so the uvicorn workers of one machine share one file.
                 Tables: `events` (the log, seq = AUTOINCREMENT rowid: never reused),
                 `users` (one row per user: the history as a JSON list, so a read is one
                 primary-key lookup whatever the user's event count) and `item_edits` (the
                 item edits' log, its payload JSON text). A file at an older schema gains
                 the new tables when opened.
    RedisStore   redis://host:port/db. For several replicas on several machines. The log is
                 the stream `events` (entry id `<seq>-0`), a user's history the list
                 `user:<id>`, the counter `events:seq`, the seeded users the set `seeded`;
                 item edits the stream `items` (entry id `<seq>-0`), counted by `items:seq`.
                 One Lua script per append does INCR + XADD + RPUSH (+ LTRIM) for every
                 event: atomic like MULTI/EXEC, and it gives dense integer seq numbers that
                 no clock can reorder (auto stream ids are (milliseconds, counter) pairs: after
                 a clock step back the counter can outgrow any fixed-width packing of the
                 pair into one integer, and the packed numbers would go backwards).
                 Durability needs the server's `appendonly yes` and `appendfsync always`
                 (Redis then fsyncs the AOF before it replies); the store checks both on open
                 and refuses a server without them unless opened with
                 `check_durability=false`. Standalone Redis only (the scripts name keys they
                 build, which Redis Cluster does not allow).

Options (keyword arguments of `open_store`, or the URL's query: `?max_history=200`):
`max_history` keeps only a user's latest N items in the state (the log keeps every event);
SQLite: `timeout` seconds to wait for another writer (10); Redis: `check_durability`.

Users from the export are seeded with `seed_users`, once per user: a restart that seeds
again changes nothing, and events appended before a user's seeding stay after the seeded
history. Every event type is folded into the history (item ids, oldest first).

Errors: `InvalidInput` (a bad event or argument: the caller's mistake), `StoreUnavailable`
(unreachable, locked past the timeout, closed: nothing was acknowledged), `StoreError` (the
base; alone: a store that cannot be opened as asked). An append that was not acknowledged
may or may not have been stored, so a client that retries can log an event twice.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from recsys_lm.errors import RecsysLMError

# sqlite `PRAGMA user_version` of the tables below: 1 events + users, 2 + item_edits
SCHEMA = 2
SEED_CHUNK = 1000  # users per seeding transaction / script call


class StoreError(RecsysLMError):
    """A store that cannot be opened as asked: bad URL, unknown option, a Redis server that
    does not fsync. The base of the two below."""


class InvalidInput(StoreError, ValueError):
    """An event, seed entry, argument or option value that cannot be stored or used (the
    caller's mistake: a service answers 422)."""


class StoreUnavailable(StoreError):
    """The store cannot answer now: server unreachable, database locked past the timeout,
    store closed (a service answers 503; nothing was acknowledged)."""


@dataclass
class Event:
    user: str
    item: str
    time: float  # seconds since the epoch
    type: str = "click"
    seq: int | None = None  # assigned by the store


EDIT_OPS = ("add", "remove")


@dataclass
class ItemEdit:
    """An item added through the service (`payload`: its text, or its fields for the run's
    templates) or removed (`payload` None)."""

    op: str  # "add" | "remove"
    item: str
    payload: str | dict[str, Any] | None
    time: float  # seconds since the epoch
    seq: int | None = None  # assigned by the store


@runtime_checkable
class EventStore(Protocol):
    # True when history() never waits on a writer or the network, so the service reads it
    # on its event loop instead of handing it to the store thread (a hop of ~0.7 ms)
    inline_reads: bool

    def append(self, events: Sequence[Event]) -> list[int]:
        """Log the events and fold them into their users' histories, durably, before
        returning their sequence numbers (in the given order)."""

    def history(self, user: str, limit: int | None = None) -> list[str] | None:
        """The user's item ids, oldest first (the latest `limit`); None for an unknown user."""

    def seed_users(self, users: Mapping[str, Sequence[str]]) -> None:
        """Initial histories (the export's users.parquet); users seeded before are skipped."""

    def events_after(self, seq: int, limit: int = 1000) -> list[Event]:
        """Up to `limit` logged events with a sequence number above `seq`, in order."""

    def last_seq(self) -> int:
        """The highest sequence number logged (0 for an empty log)."""

    def edit_items(self, edits: Sequence[ItemEdit]) -> list[int]:
        """Log item edits, durably, before returning their sequence numbers (in the given
        order; the item edits' log numbers them apart from the events)."""

    def item_edits_after(self, seq: int, limit: int = 1000) -> list[ItemEdit]:
        """Up to `limit` logged item edits with a sequence number above `seq`, in order."""

    def close(self) -> None: ...


def open_store(url: str, **options: Any) -> EventStore:
    """The store a URL names: sqlite:///<path> or redis://<host>:<port>/<db>; options come
    from keyword arguments or the URL's query string (keyword arguments win)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    if parts.scheme == "sqlite":
        if not url.startswith("sqlite:///") or not parts.path.strip("/"):
            raise StoreError(f"event store {url!r}: expected sqlite:///<path to a file>")
        path = url[len("sqlite:///") :].split("?", 1)[0]
        known = {"max_history": _count, "timeout": _seconds}
        return SqliteStore(path, **_options(url, known, {**query, **options}))
    if parts.scheme in ("redis", "rediss"):
        ours = {k: query.pop(k) for k in ("max_history", "check_durability") if k in query}
        plain = urlunsplit(parts._replace(query=urlencode(query)))  # the rest is redis-py's
        known = {"max_history": _count, "check_durability": _flag}
        return RedisStore(plain, **_options(url, known, {**ours, **options}))
    raise StoreError(
        f"event store {_safe(url)!r}: unsupported scheme {parts.scheme!r}; expected "
        "sqlite:///<path> (embedded, one machine) or redis://<host>:<port>/<db>"
    )


# -- SQLite --------------------------------------------------------------------------------------
_CREATE = (
    """CREATE TABLE IF NOT EXISTS events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        user TEXT NOT NULL, item TEXT NOT NULL, time REAL NOT NULL, type TEXT NOT NULL)""",
    # seeded: 1 once seed_users gave the user its export history
    """CREATE TABLE IF NOT EXISTS users (
        user TEXT PRIMARY KEY, history TEXT NOT NULL, seeded INTEGER NOT NULL DEFAULT 0)""",
    # schema 2; payload: the JSON of an add's text or fields, NULL for a remove
    """CREATE TABLE IF NOT EXISTS item_edits (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        op TEXT NOT NULL, item TEXT NOT NULL, payload TEXT, time REAL NOT NULL)""",
)
_UPSERT_HISTORY = (
    "INSERT INTO users (user, history) VALUES (?, ?) "
    "ON CONFLICT (user) DO UPDATE SET history = excluded.history"
)
_SEED = (
    "INSERT INTO users (user, history, seeded) VALUES (?, ?, 1) "
    "ON CONFLICT (user) DO UPDATE SET history = excluded.history, seeded = 1 "
    "WHERE users.seeded = 0"
)


class SqliteStore:
    """The embedded store: one SQLite file in WAL mode, shared by threads and processes."""

    # WAL: a reader sees the last commit without waiting for a writer (each thread has its
    # own connection); a user's row is a page-cache read of tens of microseconds
    inline_reads = True

    def __init__(
        self, path: str | Path, max_history: int | None = None, timeout: float = 10.0
    ) -> None:
        if str(path) == ":memory:":
            raise StoreError(
                "event store: an in-memory SQLite database is not durable; "
                "give a file path (sqlite:///events.db)"
            )
        self.path = Path(path).absolute()
        self.url = f"sqlite:///{self.path}"
        self.max_history = _count(max_history) if max_history is not None else None
        self.timeout = float(timeout)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[tuple[int, sqlite3.Connection]] = []
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._create(self._connection())

    # -- connections ---------------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        """This thread's connection; a forked child opens its own (SQLite handles must not
        cross a fork)."""
        if self._closed:
            raise StoreUnavailable(f"event store {self.url}: used after close()")
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = self._connect()
            self._local.conn, self._local.pid = conn, os.getpid()
            with self._lock:
                self._connections.append((os.getpid(), conn))
        return conn

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: transactions are the explicit BEGIN IMMEDIATE below;
            # timeout: SQLite's busy handler waits this long for another writer
            conn = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous = FULL")  # fsync the WAL at every commit
        except sqlite3.Error as error:
            raise StoreUnavailable(f"event store {self.url}: cannot open: {error}") from error
        if mode.lower() != "wal":
            raise StoreError(
                f"event store {self.url}: SQLite refused WAL mode ({mode}); use a local file system"
            )
        return conn

    def _create(self, conn: sqlite3.Connection) -> None:
        with _transaction(conn, self.url):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA:
                raise StoreError(
                    f"event store {self.url}: schema {version} is newer than "
                    f"this version reads ({SCHEMA})"
                )
            for statement in _CREATE:  # IF NOT EXISTS: an older file gains the new tables
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA}")

    def close(self) -> None:
        """Close this process's connections (every thread's)."""
        with self._lock:
            mine = [c for pid, c in self._connections if pid == os.getpid()]
            self._connections = []
            self._closed = True
        for conn in mine:
            conn.close()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the interface ---------------------------------------------------------------------
    def append(self, events: Sequence[Event]) -> list[int]:
        events = _checked(events)
        if not events:
            return []
        conn = self._connection()
        with _transaction(
            conn, self.url
        ):  # the COMMIT fsyncs: durable before the seqs are returned
            seqs = [
                conn.execute(
                    "INSERT INTO events (user, item, time, type) VALUES (?, ?, ?, ?)",
                    (e.user, e.item, e.time, e.type),
                ).lastrowid
                for e in events
            ]
            histories: dict[str, list[str]] = {}
            for e in events:
                if e.user not in histories:
                    histories[e.user] = self._read(conn, e.user) or []
                histories[e.user].append(e.item)
            conn.executemany(
                _UPSERT_HISTORY, [(u, json.dumps(self._cap(h))) for u, h in histories.items()]
            )
        return seqs

    def history(self, user: str, limit: int | None = None) -> list[str] | None:
        limit = None if limit is None else _count(limit, minimum=0)
        items = self._read(self._connection(), user)
        return None if items is None else _latest(items, limit)

    def seed_users(self, users: Mapping[str, Sequence[str]]) -> None:
        conn = self._connection()
        seeded = {u for (u,) in conn.execute("SELECT user FROM users WHERE seeded = 1")}
        todo = [(u, _checked_items(u, h)) for u, h in users.items() if u not in seeded]
        for start in range(0, len(todo), SEED_CHUNK):
            chunk = todo[start : start + SEED_CHUNK]
            with _transaction(conn, self.url):
                # events a user had before seeding stay after the seeded history; rows that
                # another worker seeded meanwhile are left alone by the WHERE of _SEED
                live = {u: self._read(conn, u) or [] for u, _ in chunk}
                rows = [(u, json.dumps(self._cap([*h, *live[u]]))) for u, h in chunk]
                conn.executemany(_SEED, rows)

    def events_after(self, seq: int, limit: int = 1000) -> list[Event]:
        rows = self._connection().execute(
            "SELECT seq, user, item, time, type FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
            (_count(seq, minimum=0), _count(limit)),
        )
        return [Event(user, item, time, kind, seq) for seq, user, item, time, kind in rows]

    def last_seq(self) -> int:
        (seq,) = self._connection().execute("SELECT MAX(seq) FROM events").fetchone()
        return int(seq or 0)

    def edit_items(self, edits: Sequence[ItemEdit]) -> list[int]:
        edits = _checked_edits(edits)
        if not edits:
            return []
        conn = self._connection()
        with _transaction(conn, self.url):  # the COMMIT fsyncs, as for events
            seqs = [
                conn.execute(
                    "INSERT INTO item_edits (op, item, payload, time) VALUES (?, ?, ?, ?)",
                    (e.op, e.item, _payload_json(e.payload), e.time),
                ).lastrowid
                for e in edits
            ]
        return seqs

    def item_edits_after(self, seq: int, limit: int = 1000) -> list[ItemEdit]:
        rows = self._connection().execute(
            "SELECT seq, op, item, payload, time FROM item_edits WHERE seq > ? "
            "ORDER BY seq LIMIT ?",
            (_count(seq, minimum=0), _count(limit)),
        )
        return [
            ItemEdit(op, item, None if payload is None else json.loads(payload), time, seq)
            for seq, op, item, payload, time in rows
        ]

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _read(conn: sqlite3.Connection, user: str) -> list[str] | None:
        row = conn.execute("SELECT history FROM users WHERE user = ?", (user,)).fetchone()
        return None if row is None else json.loads(row[0])

    def _cap(self, items: list[str]) -> list[str]:
        return items[-self.max_history :] if self.max_history else items


@contextmanager
def _transaction(conn: sqlite3.Connection, url: str) -> Iterator[None]:
    """A write transaction: BEGIN IMMEDIATE takes the write lock up front (waiting up to the
    busy timeout), so two writers never deadlock upgrading a read lock. Whatever fails,
    COMMIT included, rolls back: the connection is left ready for the next one."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as error:  # "database is locked" after the timeout
        raise StoreUnavailable(f"event store {url}: {error}") from error
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


# -- Redis ---------------------------------------------------------------------------------------
# ARGV: max_history (0: no cap), then user, item, time, type per event. Returns the seqs.
_APPEND = """
local cap = tonumber(ARGV[1])
local seqs = {}
for i = 2, #ARGV, 4 do
  local seq = redis.call('INCR', 'events:seq')
  redis.call('XADD', 'events', seq .. '-0',
             'user', ARGV[i], 'item', ARGV[i + 1], 'time', ARGV[i + 2], 'type', ARGV[i + 3])
  local key = 'user:' .. ARGV[i]
  redis.call('RPUSH', key, ARGV[i + 1])
  if cap > 0 then redis.call('LTRIM', key, -cap, -1) end
  seqs[#seqs + 1] = seq
end
return seqs
"""
# ARGV: op, item, payload (JSON; '' for a remove: the entry then has no payload), time per
# edit. Returns the seqs.
_EDIT_ITEMS = """
local seqs = {}
for i = 1, #ARGV, 4 do
  local seq = redis.call('INCR', 'items:seq')
  local fields = {'op', ARGV[i], 'item', ARGV[i + 1], 'time', ARGV[i + 3]}
  if ARGV[i + 2] ~= '' then
    fields[#fields + 1] = 'payload'
    fields[#fields + 1] = ARGV[i + 2]
  end
  redis.call('XADD', 'items', seq .. '-0', unpack(fields))
  seqs[#seqs + 1] = seq
end
return seqs
"""
# ARGV: max_history, then a JSON list of [user, [items]]. A user not yet in `seeded` gets its
# items prepended (LPUSH of the reversed items, 1000 at a time: Lua's unpack has a limit).
_SEED_SCRIPT = """
local cap = tonumber(ARGV[1])
for _, entry in ipairs(cjson.decode(ARGV[2])) do
  local user, items = entry[1], entry[2]
  if redis.call('SADD', 'seeded', user) == 1 and #items > 0 then
    local key = 'user:' .. user
    local j = #items
    while j >= 1 do
      local chunk = {}
      for t = j, math.max(1, j - 999), -1 do chunk[#chunk + 1] = items[t] end
      redis.call('LPUSH', key, unpack(chunk))
      j = j - 1000
    end
    if cap > 0 then redis.call('LTRIM', key, -cap, -1) end
  end
end
return 0
"""


class RedisStore:
    """The shared store: a Redis stream (the log) and one list per user (see module doc)."""

    inline_reads = False  # a network round trip: the store thread waits for it

    def __init__(
        self, url: str, max_history: int | None = None, check_durability: bool = True
    ) -> None:
        import redis  # only this backend needs the client

        self.url = _safe(url)
        self.max_history = _count(max_history) if max_history is not None else None
        self._errors = redis.exceptions
        self._closed = False
        # timeouts, unless the URL sets its own: a hung server must not hang a request
        self.client = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5
        )
        with self._reach():
            self.client.ping()
            if check_durability:
                self._check_durability()
        self._append = self.client.register_script(_APPEND)
        self._seed = self.client.register_script(_SEED_SCRIPT)
        self._edit_items = self.client.register_script(_EDIT_ITEMS)

    @contextmanager
    def _reach(self) -> Iterator[None]:
        """Connection trouble becomes StoreUnavailable (an unanswered append may or may not
        have been stored: it was not acknowledged)."""
        if self._closed:
            raise StoreUnavailable(f"event store {self.url}: used after close()")
        try:
            yield
        except (self._errors.ConnectionError, self._errors.TimeoutError) as error:
            raise StoreUnavailable(
                f"event store {self.url}: cannot reach Redis: {error}"
            ) from error

    def _check_durability(self) -> None:
        try:
            aof = self.client.config_get("appendonly").get("appendonly")
            fsync = self.client.config_get("appendfsync").get("appendfsync")
        except self._errors.ResponseError as error:  # CONFIG renamed away (managed Redis)
            warnings.warn(
                f"event store {self.url}: cannot read the durability settings "
                f"({error}); events are durable only with appendonly yes and "
                "appendfsync always",
                stacklevel=3,
            )
            return
        if (aof, fsync) != ("yes", "always"):
            raise StoreError(
                f"event store {self.url}: Redis has appendonly={aof} appendfsync={fsync}, "
                "so an acknowledged event can be lost; set `appendonly yes` and "
                "`appendfsync always` (redis.conf or CONFIG SET), or open the store with "
                "check_durability=false to accept that"
            )

    def append(self, events: Sequence[Event]) -> list[int]:
        events = _checked(events)
        if not events:
            return []
        args: list[Any] = [self.max_history or 0]
        for e in events:
            args += [e.user, e.item, repr(e.time), e.type]
        with self._reach():
            return [int(s) for s in self._append(args=args)]

    def history(self, user: str, limit: int | None = None) -> list[str] | None:
        limit = None if limit is None else _count(limit, minimum=0)
        with self._reach():
            start = 0 if limit is None else -limit  # LRANGE from the end: the latest items
            items = self.client.lrange(f"user:{user}", start, -1) if limit != 0 else []
            if items:
                return items
            # an empty answer: a seeded user without items, or an unknown one
            known = self.client.exists(f"user:{user}") or self.client.sismember("seeded", user)
            return [] if known else None

    def seed_users(self, users: Mapping[str, Sequence[str]]) -> None:
        with self._reach():
            seeded = self.client.smembers("seeded")
            todo = [[u, _checked_items(u, h)] for u, h in users.items() if u not in seeded]
            for start in range(0, len(todo), SEED_CHUNK):
                chunk = json.dumps(todo[start : start + SEED_CHUNK])
                self._seed(args=[self.max_history or 0, chunk])

    def events_after(self, seq: int, limit: int = 1000) -> list[Event]:
        first = f"{_count(seq, minimum=0) + 1}-0"
        with self._reach():
            entries = self.client.xrange("events", min=first, count=_count(limit))
        return [_event(entry_id, fields) for entry_id, fields in entries]

    def last_seq(self) -> int:
        with self._reach():
            newest = self.client.xrevrange("events", count=1)
        return _event(*newest[0]).seq if newest else 0

    def edit_items(self, edits: Sequence[ItemEdit]) -> list[int]:
        edits = _checked_edits(edits)
        if not edits:
            return []
        args: list[Any] = []
        for e in edits:
            args += [e.op, e.item, _payload_json(e.payload) or "", repr(e.time)]
        with self._reach():
            return [int(s) for s in self._edit_items(args=args)]

    def item_edits_after(self, seq: int, limit: int = 1000) -> list[ItemEdit]:
        first = f"{_count(seq, minimum=0) + 1}-0"
        with self._reach():
            entries = self.client.xrange("items", min=first, count=_count(limit))
        return [_item_edit(entry_id, fields) for entry_id, fields in entries]

    def close(self) -> None:
        self._closed = True
        self.client.close()

    def __enter__(self) -> RedisStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _event(entry_id: str, fields: dict[str, str]) -> Event:
    seq = int(entry_id.split("-", 1)[0])
    return Event(fields["user"], fields["item"], float(fields["time"]), fields["type"], seq)


def _item_edit(entry_id: str, fields: dict[str, str]) -> ItemEdit:
    seq = int(entry_id.split("-", 1)[0])
    payload = json.loads(fields["payload"]) if "payload" in fields else None
    return ItemEdit(fields["op"], fields["item"], payload, float(fields["time"]), seq)


# -- checks --------------------------------------------------------------------------------------
def _checked(events: Sequence[Event]) -> list[Event]:
    out = []
    for n, e in enumerate(events):
        if not isinstance(e, Event):
            raise InvalidInput(f"event {n}: expected an Event, got {type(e).__name__}")
        for name in ("user", "item", "type"):
            value = getattr(e, name)
            if not isinstance(value, str) or not value:
                raise InvalidInput(f"event {n}: `{name}` must be a non-empty string, got {value!r}")
        _check_time_and_seq(f"event {n}", e)
        out.append(Event(e.user, e.item, float(e.time), e.type))
    return out


def _checked_edits(edits: Sequence[ItemEdit]) -> list[ItemEdit]:
    out = []
    for n, e in enumerate(edits):
        if not isinstance(e, ItemEdit):
            raise InvalidInput(f"item edit {n}: expected an ItemEdit, got {type(e).__name__}")
        if e.op not in EDIT_OPS:
            raise InvalidInput(f"item edit {n}: `op` must be 'add' or 'remove', got {e.op!r}")
        if not isinstance(e.item, str) or not e.item:
            raise InvalidInput(f"item edit {n}: `item` must be a non-empty string, got {e.item!r}")
        if e.op == "add":
            _check_payload(n, e.payload)
        elif e.payload is not None:
            raise InvalidInput(f"item edit {n}: a remove has no `payload`, got {e.payload!r}")
        _check_time_and_seq(f"item edit {n}", e)
        payload = dict(e.payload) if isinstance(e.payload, dict) else e.payload
        out.append(ItemEdit(e.op, e.item, payload, float(e.time)))
    return out


def _check_time_and_seq(what: str, record: Event | ItemEdit) -> None:
    """A record to log: its time a finite number (epoch seconds), its seq not yet set."""
    if isinstance(record.time, bool) or not isinstance(record.time, (int, float)):
        raise InvalidInput(f"{what}: `time` must be a number (epoch seconds), got {record.time!r}")
    if not math.isfinite(record.time):
        raise InvalidInput(f"{what}: `time` must be finite, got {record.time!r}")
    if record.seq is not None:
        raise InvalidInput(f"{what}: `seq` is assigned by the store, got {record.seq!r}")


def _check_payload(n: int, payload: Any) -> None:
    """An add's payload: a non-empty text, or fields (names to texts or finite numbers:
    what JSON carries and the item templates render)."""
    if isinstance(payload, str):
        if not payload.strip():
            raise InvalidInput(f"item edit {n}: `payload` text must not be empty")
        return
    if not isinstance(payload, dict) or not payload:
        raise InvalidInput(
            f"item edit {n}: an add's `payload` must be its text (a string) or its fields "
            f"(a non-empty dict), got {payload!r}"
        )
    for name, value in payload.items():
        if not isinstance(name, str) or not name:
            raise InvalidInput(
                f"item edit {n}: `payload` field names must be non-empty strings, got {name!r}"
            )
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (isinstance(value, str) or (number and math.isfinite(value))):
            raise InvalidInput(
                f"item edit {n}: `payload` field {name!r} must be a string or a finite "
                f"number, got {value!r}"
            )


def _payload_json(payload: str | dict[str, Any] | None) -> str | None:
    return None if payload is None else json.dumps(payload)


def _checked_items(user: str, items: Sequence[str]) -> list[str]:
    if not isinstance(user, str) or not user:
        raise InvalidInput(f"seed_users: user ids must be non-empty strings, got {user!r}")
    items = list(items)
    wrong = [i for i in items if not isinstance(i, str) or not i]
    if wrong:
        raise InvalidInput(
            f"seed_users: user {user!r}: item ids must be non-empty strings, got {wrong[:3]!r}"
        )
    return items


def _latest(items: list[str], limit: int | None) -> list[str]:
    return items if limit is None else items[max(len(items) - limit, 0) :]


def _count(value: Any, minimum: int = 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if isinstance(value, bool) or number is None or number != float(value) or number < minimum:
        raise InvalidInput(f"expected an integer >= {minimum}, got {value!r}")
    return number


def _seconds(value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds >= 0:
        raise InvalidInput(f"expected a number of seconds >= 0, got {value!r}")
    return seconds


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise InvalidInput(f"expected true or false, got {value!r}")
    return text in ("true", "1", "yes")


def _options(url: str, known: dict, given: dict) -> dict:
    out = {}
    for name, value in given.items():
        if name not in known:
            raise InvalidInput(
                f"event store {_safe(url)!r}: unknown option {name!r} (known: {', '.join(known)})"
            )
        try:
            out[name] = None if value is None else known[name](value)
        except InvalidInput as error:
            raise InvalidInput(f"event store {_safe(url)!r}: option {name}: {error}") from None
    return out


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
