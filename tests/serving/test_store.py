"""Event stores: the same behaviour from SQLite and from a real Redis server started on
loopback, several writers at once, and nothing acknowledged lost to a SIGKILL."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from recsys_lm.serving.store import (
    SCHEMA,
    Event,
    EventStore,
    InvalidInput,
    ItemEdit,
    RedisStore,
    SqliteStore,
    StoreError,
    StoreUnavailable,
    open_store,
)

ROOT = Path(__file__).resolve().parents[2]  # the repository: `python -c` children import from it

# Appends one event at a time and prints "seq user item" once each append has returned
# (i.e. is acknowledged); stops at the first error or after 60 s.
WRITER = """
import sys, time
from recsys_lm.serving.store import Event, open_store
store, n, stop = open_store(sys.argv[1]), 0, time.time() + 60
while time.time() < stop:
    user, item = f"u{n % 3}", f"i{n}"
    try:
        (seq,) = store.append([Event(user, item, time.time())])
    except Exception as error:
        print("error", type(error).__name__, flush=True)
        break
    print(seq, user, item, flush=True)
    n += 1
"""

# The same for item edits: logs one added item at a time, prints "seq add item" once acknowledged.
EDIT_WRITER = """
import sys, time
from recsys_lm.serving.store import ItemEdit, open_store
store, n, stop = open_store(sys.argv[1]), 0, time.time() + 60
while time.time() < stop:
    item = f"i{n}"
    try:
        (seq,) = store.edit_items([ItemEdit("add", item, f"text of {item}", time.time())])
    except Exception as error:
        print("error", type(error).__name__, flush=True)
        break
    print(seq, "add", item, flush=True)
    n += 1
"""

# Appends `count` events one by one for users `<tag>0`..`<tag>4`; prints the seqs as JSON.
BURST = """
import json, sys, time
from recsys_lm.serving.store import Event, open_store
store, tag, count = open_store(sys.argv[1]), sys.argv[2], int(sys.argv[3])
seqs = [store.append([Event(f"{tag}{n % 5}", f"{tag}-i{n}", time.time())])[0]
        for n in range(count)]
print(json.dumps(seqs))
"""


# -- a real redis-server on loopback ---------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """redis-server on 127.0.0.1, its data (AOF, fsync'd at every write) in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.process, self.port = folder, None, 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not on PATH (.ci/run installs it: apt-get redis-server)")
        self.port = free_port()
        log = self.folder / "redis.log"
        # AOF on and fsync'd at every write, no RDB snapshots: the AOF alone holds the data
        durable = ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        address = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        self.process = subprocess.Popen(
            [exe, *address, *durable, "--logfile", str(log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if client.ping():
                    return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        self.stop()
        tail = log.read_text()[-500:] if log.exists() else "(no log)"
        pytest.skip(f"redis-server did not answer PING on 127.0.0.1:{self.port}: {tail}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/events.db"  # an absolute path: sqlite:////tmp/...
    server = request.getfixturevalue("redis_server")
    redis.Redis(port=server.port).flushdb()
    return server.url


@pytest.fixture
def store(url):
    store = open_store(url)
    yield store
    store.close()


# -- the interface, on both stores -------------------------------------------------------------
def test_append_history_and_the_log(store):
    assert isinstance(store, EventStore)
    assert store.last_seq() == 0 and store.events_after(0) == []
    assert store.history("alice") is None
    seqs = store.append(
        [Event("alice", "a1", 1.5), Event("bob", "b1", 2.0, "purchase"), Event("alice", "a2", 3)]
    )
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    seqs += store.append([Event("alice", "a3", 4.25)])
    assert store.append([]) == []
    assert store.history("alice") == ["a1", "a2", "a3"]
    assert store.history("alice", limit=2) == ["a2", "a3"]
    assert store.history("alice", limit=10) == ["a1", "a2", "a3"]
    assert store.history("alice", limit=0) == [] and store.history("carol", limit=0) is None
    assert store.history("bob") == ["b1"]
    assert store.last_seq() == seqs[-1]
    logged = store.events_after(0)
    assert [e.seq for e in logged] == seqs
    assert logged[1] == Event("bob", "b1", 2.0, "purchase", seqs[1])
    assert logged[3] == Event("alice", "a3", 4.25, "click", seqs[3])
    # a watermark: only what came after it, in order, `limit` at a time
    assert [e.item for e in store.events_after(seqs[1], limit=1)] == ["a2"]
    assert [e.item for e in store.events_after(seqs[1])] == ["a2", "a3"]
    assert store.events_after(seqs[-1]) == []


def test_seeding_is_idempotent_and_keeps_live_events_in_place(url):
    store = open_store(url)
    store.append([Event("u1", "live1", 1.0)])  # before seeding (a user new to the export)
    store.seed_users({"u1": ["a", "b"], "u2": ["c"], "u3": []})
    store.append([Event("u2", "live2", 2.0), Event("u1", "live3", 3.0)])
    store.close()
    again = open_store(url)  # a restart seeds again from the same export
    again.seed_users({"u1": ["a", "b"], "u2": ["c"], "u3": [], "u4": ["d"]})
    assert again.history("u1") == ["a", "b", "live1", "live3"]
    assert again.history("u2") == ["c", "live2"]
    assert again.history("u3") == [] and again.history("u4") == ["d"]
    assert [e.item for e in again.events_after(0)] == ["live1", "live2", "live3"]
    again.close()


def test_seeding_many_users_in_chunks(url):
    store = open_store(url, max_history=3)
    users = {f"u{n}": [f"i{n}-{j}" for j in range(n % 7)] for n in range(2500)}
    store.seed_users(users)
    store.seed_users(users)
    assert store.history("u6") == ["i6-3", "i6-4", "i6-5"] and store.history("u2") == users["u2"]
    assert store.history("u2498") == ["i2498-3", "i2498-4", "i2498-5"]
    assert store.history("u2499") == []
    long = {"long": [f"x{j}" for j in range(2500)]}  # more than one LPUSH chunk in Redis
    uncapped = open_store(url)
    uncapped.seed_users(long)
    assert uncapped.history("long") == long["long"]
    store.close(), uncapped.close()


def test_max_history_caps_the_state_not_the_log(url):
    store = open_store(url, max_history=2)
    store.seed_users({"u": ["s1", "s2", "s3"]})
    assert store.history("u") == ["s2", "s3"]
    store.append([Event("u", f"e{n}", float(n)) for n in range(4)])
    assert store.history("u") == ["e2", "e3"]
    assert len(store.events_after(0)) == 4
    store.close()


def test_invalid_events(store):
    for event, message in [
        (Event("", "i", 1.0), "`user` must be a non-empty string"),
        (Event("u", 7, 1.0), "`item` must be a non-empty string, got 7"),
        (Event("u", "i", float("nan")), "`time` must be finite"),
        (Event("u", "i", "yesterday"), "`time` must be a number"),
        (Event("u", "i", 1.0, type=""), "`type` must be a non-empty string"),
        (Event("u", "i", 1.0, seq=4), "`seq` is assigned by the store"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            store.append([Event("ok", "fine", 0.0), event])
    assert store.last_seq() == 0  # a batch with a bad event is refused whole
    with pytest.raises(InvalidInput, match="item ids must be non-empty strings"):
        store.seed_users({"u": ["a", None]})
    with pytest.raises(InvalidInput, match="integer >= 0, got -1"):
        store.history("u", limit=-1)
    with pytest.raises(InvalidInput, match="integer >= 0, got -2"):
        store.events_after(-2)
    store.close()
    with pytest.raises(StoreUnavailable, match="used after close"):
        store.append([Event("u", "i", 1.0)])


def test_item_edits_round_trip_in_order_apart_from_the_events(url):
    store = open_store(url)
    assert store.item_edits_after(0) == []
    store.append([Event("u", "i", 1.0)])  # the events' log numbers its own seqs
    fields = {"title": "Tent", "weight": 1.5, "pieces": 3}
    seqs = store.edit_items(
        [ItemEdit("add", "tent", fields, 10.0), ItemEdit("add", "lamp", "Camp lamp, 200 lm", 11)]
    )
    seqs += store.edit_items([ItemEdit("remove", "tent", None, 12.5)])
    assert store.edit_items([]) == []
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    store.close()
    again = open_store(url)  # what a restarted service reads
    logged = again.item_edits_after(0)
    assert logged == [
        ItemEdit("add", "tent", fields, 10.0, seqs[0]),
        ItemEdit("add", "lamp", "Camp lamp, 200 lm", 11.0, seqs[1]),
        ItemEdit("remove", "tent", None, 12.5, seqs[2]),
    ]
    assert [e.item for e in again.item_edits_after(seqs[0], limit=1)] == ["lamp"]
    assert [e.op for e in again.item_edits_after(seqs[0])] == ["add", "remove"]
    assert again.item_edits_after(seqs[-1]) == []
    assert [e.item for e in again.events_after(0)] == ["i"]  # no edit in the events' log
    again.close()


def test_invalid_item_edits(store):
    for edit, message in [
        (("add", "x", "text", 1.0), "item edit 1: expected an ItemEdit, got tuple"),
        (ItemEdit("update", "x", "t", 1.0), "`op` must be 'add' or 'remove', got 'update'"),
        (ItemEdit("add", "", "t", 1.0), "`item` must be a non-empty string"),
        (ItemEdit("add", "x", None, 1.0), "an add's `payload` must be its text"),
        (ItemEdit("add", "x", "  ", 1.0), "`payload` text must not be empty"),
        (ItemEdit("add", "x", {}, 1.0), "an add's `payload` must be its text"),
        (ItemEdit("add", "x", {"title": None}, 1.0), "field 'title' must be a string or a"),
        (ItemEdit("add", "x", {"n": float("inf")}, 1.0), "field 'n' must be a string or a finite"),
        (ItemEdit("add", "x", {"": "t"}, 1.0), "field names must be non-empty strings"),
        (ItemEdit("remove", "x", "t", 1.0), "a remove has no `payload`, got 't'"),
        (ItemEdit("remove", "x", None, "now"), "`time` must be a number"),
        (ItemEdit("remove", "x", None, float("nan")), "`time` must be finite"),
        (ItemEdit("remove", "x", None, 1.0, seq=3), "`seq` is assigned by the store"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            store.edit_items([ItemEdit("add", "ok", "fine", 0.0), edit])
    assert store.item_edits_after(0) == []  # a batch with a bad edit is refused whole
    with pytest.raises(InvalidInput, match="integer >= 0, got -1"):
        store.item_edits_after(-1)
    with pytest.raises(InvalidInput, match="integer >= 1, got 0"):
        store.item_edits_after(0, limit=0)


def test_store_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///data/events.db?max_history=5")
    assert isinstance(relative, SqliteStore) and relative.max_history == 5
    assert relative.path == tmp_path / "data" / "events.db"
    relative.close()
    with pytest.raises(StoreUnavailable, match="used after close"):
        relative.history("u")
    absolute = open_store(f"sqlite:///{tmp_path}/abs.db", timeout=2)
    assert absolute.path == tmp_path / "abs.db" and absolute.timeout == 2
    absolute.close()
    for url, message in [
        ("postgres://db/events", "unsupported scheme 'postgres'; expected sqlite:///<path>"),
        ("sqlite://host/events.db", "expected sqlite:///<path to a file>"),
        ("sqlite:///", "expected sqlite:///<path to a file>"),
        ("sqlite:///:memory:", "not durable"),
        ("sqlite:///e.db?max_history=0", "option max_history: expected an integer >= 1"),
        ("sqlite:///e.db?maxhistory=3", "unknown option 'maxhistory'"),
        ("redis://127.0.0.1:1/0?check_durability=maybe", "expected true or false"),
        ("mysql://me:secret@db/x", "'mysql://me:\\*\\*\\*@db/x'"),
    ]:
        with pytest.raises(StoreError, match=message):
            open_store(url)
    with pytest.raises(StoreUnavailable, match="cannot reach Redis"):
        open_store(f"redis://127.0.0.1:{free_port()}/0")


# -- SQLite ----------------------------------------------------------------------------------------
def test_sqlite_history_read_is_sub_millisecond(tmp_path):
    store = SqliteStore(tmp_path / "events.db")
    store.seed_users({"heavy": [f"item-{n}" for n in range(900)]})
    store.append([Event("heavy", f"new-{n}", float(n)) for n in range(100)])
    assert len(store.history("heavy")) == 1000
    timings = []
    for _ in range(200):
        started = time.perf_counter()
        store.history("heavy")
        timings.append(time.perf_counter() - started)
    assert statistics.median(timings) < 1e-3, f"median {statistics.median(timings) * 1e3:.2f} ms"
    store.close()


def test_a_sqlite_read_does_not_wait_for_a_writer(tmp_path):
    """inline_reads: the service reads histories on its event loop, so a write in progress
    (another thread's open transaction, an fsync to come) must not hold a read: it sees the
    last commit at once (the busy timeout would be 10 s)."""
    store = SqliteStore(tmp_path / "events.db")
    assert store.inline_reads and not RedisStore.inline_reads
    store.seed_users({"u": ["a"]})
    holding, release = threading.Event(), threading.Event()

    def writer():
        conn = store._connection()  # this thread's own connection
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE users SET history = ? WHERE user = ?", ('["a", "b"]', "u"))
        holding.set()
        release.wait(10)
        conn.execute("COMMIT")

    thread = threading.Thread(target=writer)
    thread.start()
    assert holding.wait(10)
    started = time.perf_counter()
    assert store.history("u") == ["a"]  # the last commit, not the open write
    assert time.perf_counter() - started < 1.0
    release.set()
    thread.join()
    assert store.history("u") == ["a", "b"]
    store.close()


def test_sqlite_uses_wal_and_full_sync(tmp_path):
    store = SqliteStore(tmp_path / "events.db")
    conn = store._connection()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()


def test_sqlite_file_at_schema_1_gains_the_item_edits_table(tmp_path):
    """A file written before item edits were logged opens, keeps its events and users, and
    is upgraded in place; a file from a newer version is refused."""
    path = tmp_path / "events.db"
    with sqlite3.connect(path) as old:  # the schema-1 tables, as that version created them
        old.execute(
            "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL, "
            "item TEXT NOT NULL, time REAL NOT NULL, type TEXT NOT NULL)"
        )
        old.execute(
            "CREATE TABLE users (user TEXT PRIMARY KEY, history TEXT NOT NULL, "
            "seeded INTEGER NOT NULL DEFAULT 0)"
        )
        old.execute("INSERT INTO events (user, item, time, type) VALUES ('u', 'a', 1, 'click')")
        old.execute("INSERT INTO users (user, history) VALUES ('u', '[\"a\"]')")
        old.execute("PRAGMA user_version = 1")
    old.close()
    store = SqliteStore(path)
    assert store.history("u") == ["a"] and [e.item for e in store.events_after(0)] == ["a"]
    (seq,) = store.edit_items([ItemEdit("add", "new", "New item", 2.0)])
    assert store.item_edits_after(0) == [ItemEdit("add", "new", "New item", 2.0, seq)]
    assert store._connection().execute("PRAGMA user_version").fetchone()[0] == SCHEMA == 2
    store.close()
    with sqlite3.connect(path) as newer:
        newer.execute(f"PRAGMA user_version = {SCHEMA + 1}")
    newer.close()
    with pytest.raises(StoreError, match=f"schema {SCHEMA + 1} is newer than this version"):
        SqliteStore(path)


def test_sqlite_concurrent_writers_processes_and_threads(tmp_path):
    url = f"sqlite:///{tmp_path}/events.db"
    open_store(url).close()  # create the tables once: the writers then race on appends only
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", BURST, url, tag, "60"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for tag in ("p", "q")
    ]
    store = open_store(url)
    threaded: list[int] = []

    def burst(tag: str) -> None:
        threaded.extend(store.append([Event(tag, f"{tag}-i{n}", 0.0)])[0] for n in range(20))

    threads = [threading.Thread(target=burst, args=(f"t{n}",)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seqs = list(threaded)
    for writer in writers:
        out, _ = writer.communicate(timeout=120)
        assert writer.returncode == 0
        seqs += json.loads(out)
    assert len(seqs) == len(set(seqs)) == 180
    logged = store.events_after(0, limit=1000)
    assert sorted(seqs) == [e.seq for e in logged]
    for user in {e.user for e in logged}:  # each user's state is its log, in log order
        assert store.history(user) == [e.item for e in logged if e.user == user]
    store.close()


def test_sqlite_sigkill_loses_no_acknowledged_event(tmp_path):
    url = f"sqlite:///{tmp_path}/events.db"
    open_store(url).close()
    acknowledged = run_writer_until(url, 40, kill=lambda writer: writer.kill())
    check_nothing_lost(open_store(url), acknowledged)


def test_sqlite_sigkill_loses_no_acknowledged_item_edit(tmp_path):
    url = f"sqlite:///{tmp_path}/events.db"
    open_store(url).close()
    acknowledged = run_writer_until(url, 40, lambda writer: writer.kill(), EDIT_WRITER)
    store = open_store(url)
    logged = {e.seq: (e.op, e.item, e.payload) for e in store.item_edits_after(0, limit=10_000)}
    for seq, op, item in acknowledged:
        assert logged.get(seq) == (op, item, f"text of {item}"), f"acknowledged edit {seq} lost"
    store.close()


# -- Redis -----------------------------------------------------------------------------------------
def test_redis_sigkill_of_the_server_loses_no_acknowledged_event(tmp_path):
    server = RedisServer(tmp_path).start()
    try:
        store = open_store(server.url)
        store.seed_users({"u0": ["seeded"]})
        acknowledged = run_writer_until(server.url, 40, kill=lambda writer: server.kill())
        with pytest.raises(StoreUnavailable, match="cannot reach Redis"):
            store.append([Event("u0", "never acknowledged", 0.0)])
        store.close()
        server.start()  # same folder (and AOF), a fresh port
        check_nothing_lost(open_store(server.url), acknowledged, seeded={"u0": ["seeded"]})
    finally:
        server.stop()


def test_redis_refuses_a_server_that_does_not_fsync(redis_server):
    client = redis.Redis(port=redis_server.port)
    client.config_set("appendfsync", "everysec")
    try:
        with pytest.raises(StoreError, match="appendfsync=everysec.*appendfsync always"):
            open_store(redis_server.url)
        store = open_store(redis_server.url + "?check_durability=false")
        assert isinstance(store, RedisStore) and store.history("nobody") is None
        store.close()
    finally:
        client.config_set("appendfsync", "always")


# -- helpers -------------------------------------------------------------------------------------
def run_writer_until(
    url: str, count: int, kill, script: str = WRITER
) -> list[tuple[int, str, str]]:
    """Run a writer `script` against `url`; after `count` acknowledged writes call
    `kill(writer)` (the writer, or the server it writes to, dies mid-stream); return what
    was acknowledged."""
    writer = subprocess.Popen(
        [sys.executable, "-c", script, url], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    acknowledged = []
    try:
        for line in writer.stdout:
            if line.startswith("error"):
                break
            seq, user, item = line.split()
            acknowledged.append((int(seq), user, item))
            if len(acknowledged) == count:
                kill(writer)
                break
        acknowledged += [
            (int(s), u, i) for s, u, i in (ln.split() for ln in writer.stdout if ln[0].isdigit())
        ]  # lines printed (so acknowledged) before the kill landed
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.wait()
    assert len(acknowledged) >= count, f"the writer stopped after {len(acknowledged)} events"
    return acknowledged


def check_nothing_lost(store, acknowledged, seeded=None) -> None:
    logged = store.events_after(0, limit=10_000)
    by_seq = {e.seq: (e.user, e.item) for e in logged}
    for seq, user, item in acknowledged:
        assert by_seq.get(seq) == (user, item), f"acknowledged event {seq} lost"
    assert store.last_seq() == logged[-1].seq
    for user in {u for _, u, _ in acknowledged}:
        base = (seeded or {}).get(user, [])
        assert store.history(user) == base + [e.item for e in logged if e.user == user]
    store.close()


def test_helpers_do_not_hide_a_lost_event(tmp_path):
    """check_nothing_lost fails when an acknowledged event is missing from the log."""
    store = open_store(f"sqlite:///{tmp_path}/events.db")
    (seq,) = store.append([Event("u0", "i0", 0.0)])
    with pytest.raises(AssertionError, match="acknowledged event 99 lost"):
        check_nothing_lost(store, [(seq, "u0", "i0"), (99, "u0", "i1")])
    store.close()
