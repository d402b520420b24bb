"""The HTTP service: a FastAPI app built by `create_app(settings, loader, store)`.

    POST /recommend      top-k items for a stored user or an explicit history
    POST /score          scores of candidate items for a user or a history
    POST /events         interactions, durably logged, then folded into users' state
    GET  /users/{user}   a user's stored history
    POST /items          add items by text (or fields) without a restart
    DELETE /items/{id}   stop serving an item
    POST /admin/reload   load a model again (or another export) and swap it in
    GET  /healthz /readyz /metrics

The model comes from `loader()` (the entry point builds it from an export folder; tests from
a run in-process), loaded in a background task so the port answers at once: `/readyz` is 503
until it is ready. A reload loads the new model in a thread while the old one serves, then
swaps the reference; a batch already running finishes on the model it started with.

Items added or removed through the API are logged in the store (its item edits' log) before
the route answers: every load (the first, a restart's, a reload's) replays the whole log onto
the model before serving it, and every `item_sync_s` seconds each worker applies the edits
other workers logged since, so all the workers sharing a store converge on one catalogue.

Model calls go through micro-batchers (batching.py); events through one too, so concurrent
posts share one durable commit. Store calls run on one dedicated thread: the event store is
blocking I/O (fsync) and a SQLite connection belongs to the thread that uses it.

Errors: a request's mistake is a 4xx naming the field and what was expected (422 for a
body that does not validate, 404 for an unknown user or item path, 401 for the API key, 413
for an oversized body, 415 for a body not sent as JSON); a model (or event log) that raises
is a 500, logged and counted, and the service keeps serving.
"""

# No `from __future__ import annotations`: the request bodies are classes made per app (their
# limits come from the settings), so FastAPI must see the route annotations as objects.
import asyncio
import contextlib
import logging
import math
import secrets
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from recsys_lm.errors import RecsysLMError, UnknownItem
from recsys_lm.serving.batching import BatcherClosed, MicroBatcher
from recsys_lm.serving.model import Pipeline, Ranked, ServedModel
from recsys_lm.serving.monitor import OnlineMonitor
from recsys_lm.serving.store import Event, EventStore, InvalidInput, ItemEdit, StoreUnavailable
from recsys_lm.serving.telemetry import Telemetry

log = logging.getLogger("recsys_lm.serving")

Model = ServedModel | Pipeline
Loader = Callable[[], Model]
# The admin route's body (export, flavour, ...) merged over the current source -> a loader.
Reopen = Callable[[dict[str, Any]], Loader]


@dataclass
class ServiceSettings:
    """Limits and switches of the service (conf/serve.yaml documents each)."""

    api_key: str | None = None  # None: no key required
    api_key_header: str = "X-API-Key"
    default_k: int = 10
    max_k: int = 100
    max_history: int = 200  # explicit history items; stored histories: the most recent read
    max_seen: int = 10_000  # stored items read per user to exclude what was seen
    max_candidates: int = 1000
    max_filter: int = 10_000  # ids in `exclude` / `allow`
    max_events: int = 1000  # per POST /events
    max_items: int = 1000  # per POST /items
    max_text_chars: int = 10_000  # an added item's text
    max_body_bytes: int = 1_000_000
    max_batch: int = 32  # requests per model call; 1 = no micro-batching
    max_wait_ms: float = 2.0  # longest a request waits for others to join its batch
    inline_ms: float = 3.0  # lone model calls this fast run on the event loop (batching.py)
    seed_users: bool = True  # copy the export's users into the store at load (idempotent)
    reload_on_sighup: bool = False  # SIGHUP reloads the model (the entry point turns it on)
    item_sync_s: float = 1.0  # how often to apply item edits other workers logged; 0: never
    monitor: dict[str, Any] = field(default_factory=dict)  # OnlineMonitor's options (monitor.py)

    def __post_init__(self) -> None:
        if not 1 <= self.default_k <= self.max_k:
            raise ValueError(f"default_k={self.default_k} must lie in 1..max_k={self.max_k}")
        if not self.inline_ms >= 0:
            raise ValueError(f"inline_ms={self.inline_ms} must be >= 0 (0: always a thread)")
        if not self.item_sync_s >= 0:
            raise ValueError(f"item_sync_s={self.item_sync_s} must be >= 0 (0: no polling)")


# -- request and response bodies -------------------------------------------------------------
Id = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class Body(BaseModel):
    # A misspelled field is a 422 naming it, not silently ignored; numeric ids are accepted
    # as their text (ids are the source's ids, as strings).
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class Reply(BaseModel):
    model_version: str
    flavour: str


class EventIn(Body):
    user: Id
    item: Id
    time: float | None = Field(None, description="unix seconds; default: when received")
    type: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,32}$")] = "click"

    @model_validator(mode="after")
    def _finite_time(self) -> "EventIn":
        if self.time is not None and not (math.isfinite(self.time) and self.time >= 0):
            raise ValueError("time: expected unix seconds (a finite number >= 0)")
        return self


class ItemIn(Body):
    id: Id
    text: str | None = Field(None, description="what the model reads for this item")
    fields: dict[str, str | int | float] | None = Field(
        None, description="columns for the run's item and history templates (e.g. title)"
    )


class ReloadRequest(Body):
    export: str | None = None
    flavour: str | None = None
    rerank: str | None = None
    rerank_flavour: str | None = None
    n: Annotated[int, Field(ge=1)] | None = None


class RecommendReply(Reply):
    user: str | None
    items: list[str]
    scores: list[float]
    stages_ms: dict[str, float]


class ScoreReply(Reply):
    task: str
    candidates: list[str]
    scores: list[float]


class EventsReply(BaseModel):
    seq: list[int]
    last_seq: int


class UserReply(BaseModel):
    user: str
    history: list[str]


class ItemsReply(Reply):
    added: list[str] = []
    removed: list[str] = []
    index_items: int


class ReadyReply(Reply):
    status: str
    task: str
    index_items: int
    loaded_at: float
    source: dict[str, Any]


@dataclass
class Schemas:
    """Request bodies whose limits come from the settings."""

    recommend: type[Body]
    score: type[Body]
    events: type[Body]
    items: type[Body]


def make_schemas(s: ServiceSettings) -> Schemas:
    History = Annotated[list[Id], Field(min_length=1, max_length=s.max_history)]
    Ids = Annotated[list[Id], Field(max_length=s.max_filter)]

    class UserOrHistory(Body):
        user: Id | None = Field(None, description="a user with stored state")
        history: History | None = Field(None, description="item ids, oldest first")

        @model_validator(mode="after")
        def _one_given(self):
            if self.user is None and self.history is None:
                raise ValueError(
                    "give `user` (a user with stored state) or `history` (item ids, oldest first)"
                )
            return self

    class RecommendRequest(UserOrHistory):
        k: Annotated[int, Field(ge=1, le=s.max_k)] = s.default_k
        exclude_seen: bool = True
        exclude: Ids = []
        allow: Annotated[list[Id], Field(min_length=1, max_length=s.max_filter)] | None = None

    class ScoreRequest(UserOrHistory):
        candidates: Annotated[list[Id], Field(min_length=1, max_length=s.max_candidates)]

    class EventsRequest(Body):
        events: Annotated[list[EventIn], Field(min_length=1, max_length=s.max_events)]

        @model_validator(mode="before")
        @classmethod
        def _one_event(cls, data):
            # One event may be posted bare: {"user": ..., "item": ...}.
            if isinstance(data, dict) and "events" not in data and "user" in data:
                return {"events": [data]}
            return data

    class ItemsRequest(Body):
        items: Annotated[list[ItemIn], Field(min_length=1, max_length=s.max_items)]

        @model_validator(mode="after")
        def _text_or_fields(self):
            for n, item in enumerate(self.items):
                if (item.text is None) == (item.fields is None):
                    raise ValueError(f"items[{n}]: give exactly one of `text` or `fields`")
                if item.text is not None and not 0 < len(item.text.strip()) <= s.max_text_chars:
                    raise ValueError(f"items[{n}].text: 1..{s.max_text_chars} characters")
            ids = [item.id for item in self.items]
            if len(set(ids)) != len(ids):
                raise ValueError("items: an id appears twice")
            return self

    return Schemas(RecommendRequest, ScoreRequest, EventsRequest, ItemsRequest)


def unprocessable(field: str, msg: str, kind: str, ids: Sequence[str] = ()) -> HTTPException:
    """A 422 shaped like FastAPI's validation errors: the field, what is wrong, the ids."""
    detail = {"loc": ["body", *field.split(".")], "msg": msg, "type": kind}
    if ids:
        detail["input"] = list(ids)
    return HTTPException(422, [detail])


# -- jobs the batchers run -------------------------------------------------------------------
@dataclass
class RecommendJob:
    history: list[str]
    k: int
    exclude: set[str]
    allow: set[str] | None


@dataclass
class ScoreJob:
    history: list[str]
    candidates: list[str]


@dataclass
class Answered:
    """A job's result and the model that computed it (a reload may land between a
    request's validation and its batch: the reply names the model that answered)."""

    result: Any
    model: Model


def readable(model: Model, ids: Sequence[str]) -> list[str]:
    """The ids a model cannot read (in a history or an event): never known to it. Removed
    items stay readable."""
    if not isinstance(model, Pipeline):  # the common case, per request: one lookup an id
        known = model.index_of
        return [i for i in ids if i not in known]
    first, second = model.retriever.index_of, model.ranker.index_of
    return [i for i in ids if i not in first or i not in second]


def rows_of(model: Model) -> ServedModel:
    """The part of a model whose rows number the items (a pipeline's retriever)."""
    return model.retriever if isinstance(model, Pipeline) else model


def servable(model: Model, ids: Sequence[str]) -> list[str]:
    """The ids a model cannot return or score (unknown or removed)."""
    return [i for i in ids if not model.has_item(i)]


# -- the service -----------------------------------------------------------------------------
@dataclass
class Catalogue:
    """Which logged item edits (the store's item edits' log) a model has: every one up to
    `seq`, and those above it in `ahead` (this worker's own, applied when made: the sync
    skips them when it reaches them, and still applies what other workers logged between)."""

    seq: int = 0
    ahead: set[int] = field(default_factory=set)

    def missing(self, edits: Sequence[ItemEdit]) -> list[ItemEdit]:
        """The edits of a page read after `seq` that the model does not have yet."""
        return [e for e in edits if e.seq not in self.ahead]

    def passed(self, edits: Sequence[ItemEdit]) -> None:
        """The model has a page of edits now: move the mark past it."""
        self.ahead.difference_update(e.seq for e in edits)
        self.seq = max(self.seq, edits[-1].seq)


def apply_edits(model: Model, edits: Sequence[ItemEdit]) -> None:
    """Logged item edits onto a model, in order, a run of adds (one embedding pass) or of
    removes at a time. An add of an item the model serves and a remove of one it does not
    serve are skipped: the model has them already (or, for two workers that added one id
    at once, the first one it saw wins)."""
    adds: dict[str, str | dict] = {}
    removes: list[str] = []
    for edit in edits:
        if edit.op == "add":
            if removes:
                model.remove_items(removes)
                removes = []
            if edit.item not in adds and not model.has_item(edit.item):
                adds[edit.item] = edit.payload
        else:
            if adds:
                add_logged(model, adds)
                adds = {}
            if edit.item not in removes and model.has_item(edit.item):
                removes.append(edit.item)
    if adds:
        add_logged(model, adds)
    if removes:
        model.remove_items(removes)


def add_logged(model: Model, items: dict[str, str | dict]) -> None:
    """Add logged items; one whose fields this model's templates cannot render (another
    export after a reload) is logged and skipped rather than keeping the model from serving."""
    try:
        model.add_items(items)
        return
    except RecsysLMError:
        pass
    for item, payload in items.items():
        if model.has_item(item):
            continue
        try:
            model.add_items({item: payload})
        except RecsysLMError as err:
            log.error("logged item %r cannot be added to model %s: %s", item, model.version, err)


class Service:
    """The model, the store and the batchers behind the routes."""

    def __init__(
        self,
        settings: ServiceSettings,
        loader: Loader,
        store: EventStore,
        reopen: Reopen | None = None,
        source: dict[str, Any] | None = None,
        close_store: bool = False,
    ) -> None:
        self.settings, self.loader, self.store, self.reopen = settings, loader, store, reopen
        self.source = dict(source or {})
        self.close_store = close_store
        self.telemetry = Telemetry()
        self.monitor = OnlineMonitor(self.telemetry, **settings.monitor)
        self.exported_rows = 0  # the served model's items at export; rows beyond: added since
        self.model: Model | None = None
        self.loaded_at = 0.0
        self.load_error: str | None = None  # the first load's failure: not ready, not healthy
        self.catalogue = Catalogue()  # the served model's item edits (swapped with it)
        self.reload_lock = asyncio.Lock()
        self.catalogue_lock = asyncio.Lock()  # item edits and swaps: one at a time
        # One thread for the store: a SQLite connection belongs to its thread, and appends
        # are serialised anyway by the log.
        self.store_thread = ThreadPoolExecutor(1, thread_name_prefix="event-store")
        self._first_load: asyncio.Task | None = None
        self._item_sync: asyncio.Task | None = None
        self._reloads: set[asyncio.Task] = set()  # SIGHUP reloads in flight (kept referenced)
        batch, wait = settings.max_batch, settings.max_wait_ms
        sizes = self.telemetry.batch_size
        inline = settings.inline_ms
        self.recommender = MicroBatcher(
            self._recommend_batch,
            batch,
            wait,
            sizes.labels(route="/recommend").observe,
            inline_ms=inline,
        )
        self.scorer = MicroBatcher(
            self._score_batch,
            batch,
            wait,
            sizes.labels(route="/score").observe,
            inline_ms=inline,
        )
        # appends stay in the store thread: their COMMIT waits for an fsync
        self.event_log = MicroBatcher(
            self._append_batch,
            batch,
            wait,
            sizes.labels(route="/events").observe,
            executor=self.store_thread,
        )

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._first_load = asyncio.ensure_future(self._load_first())
        if self.settings.item_sync_s > 0:
            self._item_sync = asyncio.ensure_future(self._follow_items())

    async def _load_first(self) -> None:
        try:
            await self.swap(self.loader, self.source)
        except Exception as err:
            self.load_error = f"{type(err).__name__}: {err}"
            log.exception("the model failed to load; the service is not ready")

    async def close(self) -> None:
        for task in (self._first_load, self._item_sync):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for batcher in (self.recommender, self.scorer, self.event_log):
            await batcher.close()
        if self.close_store:
            await self.in_store(self.store.close)
        self.store_thread.shutdown(wait=True)

    def is_new_item(self, item: str) -> bool:
        """Whether the served model got `item` after its export (through /items)."""
        rows = rows_of(self.model).index_of if self.model is not None else {}
        return rows.get(item, -1) >= self.exported_rows

    async def stored_history(self, user: str) -> list[str] | None:
        """A user's stored items (the latest `max_seen`), None for an unknown user. A store
        whose reads never wait (`inline_reads`) is read here: a hop to the store thread
        costs more than the read."""
        if self.store.inline_reads:
            return self.store.history(user, self.settings.max_seen)
        return await self.in_store(self.store.history, user, self.settings.max_seen)

    async def in_store(self, fn: Callable, *args) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.store_thread, fn, *args)

    async def swap(self, loader: Loader, source: dict[str, Any]) -> Model:
        """Load a model in a thread (the current one keeps serving), seed its users, replay
        the logged item edits onto it and make it the served model."""
        async with self.reload_lock:
            model = await asyncio.to_thread(loader)
            exported = len(rows_of(model).item_ids)  # before the logged item edits replay
            if self.settings.seed_users and model.users:
                await self.in_store(self.store.seed_users, model.users)
            catalogue = Catalogue()
            await self._catch_up(model, catalogue)  # most of the log, while edits go on
            async with self.catalogue_lock:
                await self._catch_up(model, catalogue)  # what was logged meanwhile
                # batches already running keep the model they started with
                self.model, self.catalogue = model, catalogue
                self.exported_rows = exported
                self.monitor.reset()
                for batcher in (self.recommender, self.scorer):
                    batcher.forget_timings()  # inline or not: this model's speed decides
            self.loader, self.source, self.loaded_at = loader, dict(source), time.time()
            self.load_error = None  # a failed first load, repaired by a reload
            self.telemetry.observe_model(model.version, model.flavour, model.task, model.num_items)
            self.telemetry.reloads.labels(outcome="ok").inc()
            self.telemetry.event_last_seq.set(await self.in_store(self.store.last_seq))
            log.info("serving model %s (%s, %s)", model.version, model.flavour, model.task)
            return model

    async def reload(self, changes: dict[str, Any]) -> Model:
        """`POST /admin/reload` and SIGHUP: the same source again, or the changed one."""
        if changes:
            if self.reopen is None:
                raise HTTPException(
                    400, "this service reloads its own model only: POST /admin/reload with no body"
                )
            source = {**self.source, **changes}
            try:
                loader = self.reopen(source)
            except RecsysLMError as err:
                self.telemetry.reloads.labels(outcome="failed").inc()
                raise HTTPException(422, f"reload: {err}") from err
        else:
            loader, source = self.loader, self.source
        try:
            return await self.swap(loader, source)
        except RecsysLMError as err:
            self.telemetry.reloads.labels(outcome="failed").inc()
            raise HTTPException(422, f"reload failed, still serving the old model: {err}") from err
        except Exception as err:
            self.telemetry.reloads.labels(outcome="failed").inc()
            log.exception("reload failed; still serving model %s", self.version)
            raise HTTPException(500, f"reload failed, still serving the old model: {err}") from err

    # -- item edits -------------------------------------------------------------------------
    async def _catch_up(self, model: Model, catalogue: Catalogue) -> None:
        """Apply to `model` the logged item edits after `catalogue.seq` it lacks, a page at
        a time (each in a thread: adds embed items)."""
        while edits := await self.in_store(self.store.item_edits_after, catalogue.seq):
            await asyncio.to_thread(apply_edits, model, catalogue.missing(edits))
            catalogue.passed(edits)

    async def sync_items(self) -> None:
        """Apply the item edits other workers logged since the last sync."""
        if self.model is None:  # the first load replays the whole log
            return
        if not await self.in_store(self.store.item_edits_after, self.catalogue.seq, 1):
            return  # nothing new: no lock taken, the routes' edits never wait on a poll
        async with self.catalogue_lock:
            await self._catch_up(self.model, self.catalogue)
        self.telemetry.index_items.set(self.model.num_items)

    async def _follow_items(self) -> None:
        while True:
            await asyncio.sleep(self.settings.item_sync_s)
            try:
                await self.sync_items()
            except Exception:  # the store down a while: the next poll tries again
                log.exception("item sync failed; retrying in %s s", self.settings.item_sync_s)

    async def log_edits(
        self, edits: list[ItemEdit], undo: Callable[[], Any] | None = None
    ) -> list[int]:
        """Log item edits (durably: they are acknowledged next); their seqs. The store not
        acknowledging them undoes them on the model (`undo`, in a thread: a retry must not
        find an id half-added) and is a 422 (a value the log refuses), 503 or logged 500."""
        try:
            seqs = await self.in_store(self.store.edit_items, edits)
        except Exception as err:
            if undo is not None:
                await asyncio.to_thread(undo)
            if isinstance(err, InvalidInput):
                raise unprocessable("items", str(err), "item_edit") from err
            if isinstance(err, StoreUnavailable):
                raise HTTPException(503, f"item log unavailable, not acknowledged: {err}") from err
            self.telemetry.model_errors.labels(route="/items").inc()
            log.exception("/items: the item log raised")
            raise HTTPException(500, f"item log error: {type(err).__name__}: {err}") from err
        return seqs

    def on_sighup(self) -> None:
        async def reload() -> None:
            with contextlib.suppress(HTTPException):  # reload() has logged it
                await self.reload({})

        task = asyncio.ensure_future(reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    @property
    def version(self) -> str:
        return self.model.version if self.model is not None else "none"

    def require_model(self) -> Model:
        if self.model is None:
            raise HTTPException(503, self.load_error or "the model is loading; retry shortly")
        return self.model

    # -- users ------------------------------------------------------------------------------
    async def history_of(
        self, model: Model, user: str | None, history: list[str] | None
    ) -> tuple[list[str], list[str]]:
        """(the history the model reads, the items the user has seen). An explicit history
        must be readable; a stored one is cut to the items this model can read (an older
        export's items may be gone) and to the most recent `max_history`."""
        if history is not None:
            unknown = readable(model, history)
            if unknown:
                raise unprocessable("history", "unknown item id(s)", "unknown_item", unknown)
            return history, history
        stored = await self.stored_history(user)
        if stored is None:
            raise HTTPException(
                404, f"unknown user {user!r}: no stored state; send `history` (item ids)"
            )
        unknown = set(readable(model, stored))
        seen = [i for i in stored if i not in unknown]
        if not seen:
            raise unprocessable(
                "user", f"user {user!r} has no history this model can read", "empty_history"
            )
        return seen[-self.settings.max_history :], seen

    # -- model calls (threads) --------------------------------------------------------------
    def _recommend_batch(self, jobs: list[RecommendJob]) -> list[Answered]:
        model = self.model  # fixed for the batch: a reload does not change it halfway
        pools: dict[int, list[int]] = {}  # a pipeline re-ranks max(k, n): group by that
        for n, job in enumerate(jobs):
            key = max(job.k, model.n) if isinstance(model, Pipeline) else 0
            pools.setdefault(key, []).append(n)
        out: list[Answered | None] = [None] * len(jobs)
        for members in pools.values():
            group = [jobs[n] for n in members]
            allow = [j.allow for j in group] if any(j.allow for j in group) else None
            ranked = model.recommend_batch(
                [j.history for j in group],
                max(j.k for j in group),
                [j.exclude for j in group],
                allow,
                exclude_seen=False,  # `exclude` already holds what each user has seen
            )
            for n, job, answer in zip(members, group, ranked, strict=True):
                cut = Ranked(answer.items[: job.k], answer.scores[: job.k], answer.stages)
                out[n] = Answered(cut, model)
            for stage, seconds in (ranked[0].stages if ranked else {}).items():
                self.telemetry.stage_seconds.labels(stage=stage).observe(seconds)
        return out

    def _score_batch(self, jobs: list[ScoreJob]) -> list[Answered]:
        model = self.model
        scores = model.score_batch([j.history for j in jobs], [j.candidates for j in jobs])
        return [Answered(s, model) for s in scores]

    def _append_batch(self, groups: list[list[Event]]) -> list[list[int]]:
        # One durable commit for every request in the batch (group commit).
        seqs = self.store.append([e for g in groups for e in g])
        out, at = [], 0
        for g in groups:
            out.append(list(seqs[at : at + len(g)]))
            at += len(g)
        return out

    async def call(self, batcher: MicroBatcher, job: Any, route: str, what: str = "model") -> Any:
        """Run a job through a batcher; a model (or event log) that raises is a logged,
        counted 500."""
        try:
            return await batcher.submit(job)
        except UnknownItem as err:  # the model changed (reload, removal) since validation
            raise unprocessable("items", str(err), "unknown_item", err.ids) from err
        except BatcherClosed as err:
            raise HTTPException(503, str(err)) from err
        except Exception as err:
            self.telemetry.model_errors.labels(route=route).inc()
            log.exception("%s: the %s raised", route, what)
            raise HTTPException(500, f"{what} error: {type(err).__name__}: {err}") from err


# -- routes -------------------------------------------------------------------------------------
def service_of(request: Request) -> Service:
    return request.app.state.service


def api_key_check(settings: ServiceSettings) -> Callable:
    header = settings.api_key_header

    async def check(request: Request) -> None:
        if not settings.api_key:
            return
        given = request.headers.get(header)
        if given is None:
            raise HTTPException(401, f"missing API key: send it in the `{header}` header")
        if not secrets.compare_digest(given.encode(), settings.api_key.encode()):
            raise HTTPException(401, f"wrong API key in the `{header}` header")

    return check


def replied(model: Model) -> dict[str, str]:
    return {"model_version": model.version, "flavour": model.flavour}


def recommend_router(schemas: Schemas) -> APIRouter:
    router = APIRouter(tags=["recommend"])
    RecommendRequest, ScoreRequest = schemas.recommend, schemas.score

    @router.post("/recommend", response_model=RecommendReply)
    async def recommend(body: RecommendRequest, request: Request):  # type: ignore[valid-type]
        service = service_of(request)
        model = service.require_model()
        if not model.can_recommend:
            raise HTTPException(
                400, f"this model ({model.task}) scores candidates; use POST /score"
            )
        history, seen = await service.history_of(model, body.user, body.history)
        allow = None
        if body.allow is not None:
            unknown = servable(model, body.allow)
            if unknown:
                raise unprocessable(
                    "allow", "unknown or removed item id(s)", "unknown_item", unknown
                )
            allow = set(body.allow)
        exclude = set(body.exclude) | (set(seen) if body.exclude_seen else set())
        job = RecommendJob(history, body.k, exclude, allow)
        answered = await service.call(service.recommender, job, "/recommend")
        ranked = answered.result
        service.monitor.shown(body.user, ranked.items, ranked.scores)
        stages = {name: round(s * 1000, 3) for name, s in ranked.stages.items()}
        return {
            "user": body.user,
            "items": ranked.items,
            "scores": ranked.scores,
            "stages_ms": stages,
            **replied(answered.model),
        }

    @router.post("/score", response_model=ScoreReply)
    async def score(body: ScoreRequest, request: Request):  # type: ignore[valid-type]
        service = service_of(request)
        model = service.require_model()
        unknown = servable(model, body.candidates)
        if unknown:
            raise unprocessable(
                "candidates", "unknown or removed item id(s)", "unknown_item", unknown
            )
        history, _ = await service.history_of(model, body.user, body.history)
        job = ScoreJob(history, body.candidates)
        answered = await service.call(service.scorer, job, "/score")
        return {
            "task": answered.model.task,
            "candidates": body.candidates,
            "scores": answered.result,
            **replied(answered.model),
        }

    return router


def events_router(schemas: Schemas) -> APIRouter:
    router = APIRouter(tags=["events"])
    EventsRequest = schemas.events

    @router.post("/events", response_model=EventsReply)
    async def post_events(body: EventsRequest, request: Request):  # type: ignore[valid-type]
        service = service_of(request)
        model = service.require_model()
        unknown = readable(model, [e.item for e in body.events])
        if unknown:
            raise unprocessable("events.item", "unknown item id(s)", "unknown_item", unknown)
        now = time.time()
        events = [
            Event(e.user, e.item, now if e.time is None else e.time, e.type) for e in body.events
        ]
        seqs = await service.call(service.event_log, events, "/events", "event log")
        service.telemetry.observe_events([e.time for e in events], max(seqs))
        service.monitor.events([(e.user, e.item) for e in events], service.is_new_item)
        return {"seq": seqs, "last_seq": max(seqs)}

    @router.get("/users/{user:path}", response_model=UserReply)
    async def get_user(user: str, request: Request):
        service = service_of(request)
        history = await service.stored_history(user)
        if history is None:
            raise HTTPException(404, f"unknown user {user!r}")
        return {"user": user, "history": history}

    return router


def items_router(schemas: Schemas) -> APIRouter:
    router = APIRouter(tags=["items"])
    ItemsRequest = schemas.items

    @router.post("/items", response_model=ItemsReply)
    async def add_items(body: ItemsRequest, request: Request):  # type: ignore[valid-type]
        service = service_of(request)
        items = {i.id: i.text if i.text is not None else i.fields for i in body.items}
        async with service.catalogue_lock:  # a reload's replay sees this edit or none of it
            model = service.require_model()
            clash = [i for i in items if model.has_item(i)]
            if clash:
                raise HTTPException(409, f"items already served: {clash[:20]}")
            try:
                added = await asyncio.to_thread(model.add_items, items)
            except RecsysLMError as err:  # fields that do not fit the run's templates
                raise unprocessable("items.fields", str(err), "item_fields") from err
            now = time.time()
            edits = [ItemEdit("add", i, value, now) for i, value in items.items()]
            seqs = await service.log_edits(edits, undo=lambda: model.remove_items(added))
            service.catalogue.ahead.update(seqs)  # the sync must not add them again
        service.telemetry.index_items.set(model.num_items)
        return {"added": added, "index_items": model.num_items, **replied(model)}

    @router.delete("/items/{item_id:path}", response_model=ItemsReply)
    async def remove_item(item_id: str, request: Request):
        service = service_of(request)
        async with service.catalogue_lock:
            model = service.require_model()
            if not model.has_item(item_id):
                raise HTTPException(404, f"item {item_id!r} is not served (unknown or removed)")
            # logged first: the lock and the check above leave the removal nothing to refuse,
            # and an item once removed cannot be put back as it was if the log failed
            seqs = await service.log_edits([ItemEdit("remove", item_id, None, time.time())])
            await asyncio.to_thread(model.remove_items, [item_id])
            service.catalogue.ahead.update(seqs)
        service.telemetry.index_items.set(model.num_items)
        return {"removed": [item_id], "index_items": model.num_items, **replied(model)}

    return router


def admin_router() -> APIRouter:
    router = APIRouter(tags=["admin"])

    @router.post("/admin/reload", response_model=ReadyReply)
    async def reload(request: Request, body: ReloadRequest | None = None):
        service = service_of(request)
        changes = body.model_dump(exclude_none=True) if body is not None else {}
        await service.reload(changes)
        return ready_reply(service)

    return router


def ready_reply(service: Service) -> dict[str, Any]:
    model = service.model
    return {
        "status": "ready",
        "task": model.task,
        "index_items": model.num_items,
        "loaded_at": service.loaded_at,
        "source": service.source,
        **replied(model),
    }


def health_router() -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    async def healthz(request: Request):
        service = service_of(request)
        if service.load_error is not None:  # a process that can never become ready
            return JSONResponse({"status": "failed", "detail": service.load_error}, 503)
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz(request: Request):
        service = service_of(request)
        if service.model is None:
            detail = service.load_error or "the model is loading"
            return JSONResponse({"status": "not ready", "detail": detail}, 503)
        return ready_reply(service)

    @router.get("/metrics")
    async def metrics(request: Request):
        body, content_type = service_of(request).telemetry.render()
        return Response(body, media_type=content_type)

    return router


# -- middleware (plain ASGI: no per-request task, and they see every response) ---------------
class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes (limits.max_body_bytes)")


class RequestLimits:
    """413 for a body over `limit` bytes: at once when Content-Length says so, else as soon
    as the streamed bytes pass it (raised while the route reads its body, before parsing).
    415 for a body that is not declared JSON: FastAPI would not parse it (its strict
    content type guards a loopback service against cross-site form posts) and the 422 it
    gives instead does not say why."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await _reject(scope, receive, send, BodyTooLarge(self.limit))
        has_body = (declared.isdigit() and int(declared) > 0) or b"transfer-encoding" in headers
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if has_body and not (kind == b"application/json" or kind.endswith(b"+json")):
            shown = kind.decode("latin-1") or "none"
            error = HTTPException(415, f"Content-Type {shown}: send application/json")
            return await _reject(scope, receive, send, error)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        return await self.app(scope, limited, send)


async def _reject(scope, receive, send, error: HTTPException) -> None:
    await JSONResponse({"detail": error.detail}, error.status_code)(scope, receive, send)


class Observe:
    """Counts every response by route template and status, and times it."""

    def __init__(self, app, telemetry: Telemetry) -> None:
        self.app, self.telemetry = app, telemetry

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def observed(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.telemetry.observe_request(route, status, time.perf_counter() - started)


# -- the app --------------------------------------------------------------------------------------
def create_app(
    settings: ServiceSettings,
    loader: Loader,
    store: EventStore,
    reopen: Reopen | None = None,
    source: dict[str, Any] | None = None,
    close_store: bool = False,
) -> FastAPI:
    """The service as an ASGI app. `loader` builds the model (called in a thread at start
    and on reload); `reopen(source)` gives a loader for another export (the admin route's
    body merged over `source`, which describes the current one); `close_store`: the app
    owns the store and closes it at shutdown."""
    service = Service(settings, loader, store, reopen, source, close_store)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        hup = settings.reload_on_sighup and threading.current_thread() is threading.main_thread()
        if hup:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, service.on_sighup)
        try:
            yield
        finally:
            if hup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await service.close()

    app = FastAPI(title="recsys-lm", lifespan=lifespan)
    app.state.service = service
    schemas = make_schemas(settings)
    guarded = [Depends(api_key_check(settings))]
    app.include_router(recommend_router(schemas), dependencies=guarded)
    app.include_router(events_router(schemas), dependencies=guarded)
    app.include_router(items_router(schemas), dependencies=guarded)
    app.include_router(admin_router(), dependencies=guarded)
    app.include_router(health_router())  # probes and scrapes need no key
    app.add_middleware(RequestLimits, limit=settings.max_body_bytes)
    app.add_middleware(Observe, telemetry=service.telemetry)  # outermost: sees every answer
    return app
