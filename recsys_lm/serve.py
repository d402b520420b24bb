"""`python -m recsys_lm.serve export=<dir> [flavour=onnx-int8] [store=sqlite:///...] [port=8000]`:
serve an export folder over HTTP (conf/serve.yaml documents every key).

The app itself is `recsys_lm.serving.app.create_app`; this entry point reads the config,
checks it (a mistake is one `error: ...` line and exit status 2, before any port is bound:
a missing export folder or flavour, a bad store URL, a limit out of range), opens the event
store and runs uvicorn. The model loads in-process in the background: GET /readyz answers
503 until it is served. SIGHUP (or POST /admin/reload) loads it again and swaps it in with
no failed request. With `workers` > 1 uvicorn spawns processes that each build the app from
the same config (passed in an environment variable) and share the store; an item added or
removed through one reaches the others within `item_sync_s`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
import uvicorn
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from recsys_lm.build import load_export
from recsys_lm.errors import ConfigError, RecsysLMError
from recsys_lm.serving.app import Loader, ServiceSettings, create_app
from recsys_lm.serving.model import Pipeline
from recsys_lm.serving.monitor import OnlineMonitor
from recsys_lm.serving.store import open_store
from recsys_lm.serving.telemetry import Telemetry

log = logging.getLogger("recsys_lm.serve")
# transformers v5 deprecation raised inside peft's wrapping on every load: not ours to fix.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
CONFIG_ENV = "RECSYS_LM_SERVE_CONFIG"  # the resolved config, for uvicorn's worker processes
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MANIFEST = "manifest.json"
USER_ERRORS = (RecsysLMError, InstantiationException, OmegaConfBaseException)
SERVED_KEYS = (
    "export",
    "flavour",
    "store",
    "pipeline",
    "index",
    "api_key_env",
    "require_api_key",
    "api_key_header",
    "limits",
    "batching",
    "seed_users",
    "item_sync_s",
    "monitor",
    "workers",
    "threads",
    "blas_threads",
)


# -- checks before anything is loaded ------------------------------------------------------------
def check_export(folder: Any, flavour: str, key: str) -> Path:
    """The export folder exists, has a manifest and offers `flavour`."""
    if folder in (None, "", "???"):
        raise ConfigError(key, folder, "an export folder (python -m recsys_lm.export writes one)")
    path = Path(str(folder)).expanduser()
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise ConfigError(
            key, str(folder), f"an export folder with {MANIFEST} ({manifest} is missing)"
        )
    try:
        offered = ["eager", *json.loads(manifest.read_text()).get("flavours", {})]
    except (OSError, ValueError) as err:
        raise ConfigError(key, str(folder), f"a readable {MANIFEST}: {err}") from err
    if flavour not in offered:
        flavour_key = "flavour" if key == "export" else "pipeline.rerank_flavour"
        raise ConfigError(flavour_key, flavour, f"a flavour of {path}: one of {offered}")
    return path


def api_key(cfg: DictConfig) -> str | None:
    """The key from the environment variable `api_key_env` names (None when unset)."""
    name = cfg.get("api_key_env")
    key = os.environ.get(str(name), "") if name else ""
    if not key and cfg.get("require_api_key"):
        raise ConfigError(
            "api_key_env", name, "an environment variable holding the API key (unset or empty)"
        )
    return key or None


def service_settings(cfg: DictConfig) -> ServiceSettings:
    limits = OmegaConf.to_container(cfg.limits, resolve=True)
    batching = OmegaConf.to_container(cfg.batching, resolve=True)
    try:
        return ServiceSettings(
            api_key=api_key(cfg),
            api_key_header=str(cfg.api_key_header),
            seed_users=bool(cfg.seed_users),
            item_sync_s=item_sync_seconds(cfg.get("item_sync_s", 1.0)),
            reload_on_sighup=int(cfg.get("workers") or 1) == 1,
            monitor=monitor_options(cfg.get("monitor")),
            **limits,
            **batching,
        )
    except TypeError as err:  # a key ServiceSettings does not take
        raise ConfigError("limits / batching", {**limits, **batching}, str(err)) from err
    except ValueError as err:
        raise ConfigError("limits", limits, str(err)) from err


def monitor_options(node: Any) -> dict[str, Any]:
    """The online-quality monitor's options (serve.yaml `monitor`), checked by building one."""
    options = _plain(node) or {}
    try:
        OnlineMonitor(Telemetry(), **options)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            "monitor", options, f"max_users, horizon_s, reference, window: {err}"
        ) from err
    return options


def item_sync_seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(
            "item_sync_s", value, "seconds between polls for other workers' item edits, >= 0"
        )
    return float(value)


def source_of(cfg: DictConfig) -> dict[str, Any]:
    """What the served model is built from (the admin reload route changes these keys)."""
    return {
        "export": cfg.export,
        "flavour": cfg.flavour,
        "rerank": cfg.pipeline.rerank,
        "rerank_flavour": cfg.pipeline.rerank_flavour,
        "n": int(cfg.pipeline.n),
        "threads": cfg.get("threads"),
    }


def model_loader(source: dict[str, Any], index: dict[str, Any]) -> Loader:
    """A loader for `source` (checked now, loaded when called): one export, or a pipeline
    that retrieves with `export` and re-ranks with `rerank`."""
    export = check_export(source["export"], source["flavour"], "export")
    rerank = source.get("rerank")
    if rerank:
        rerank = check_export(rerank, source["rerank_flavour"], "pipeline.rerank")
    threads = source.get("threads")
    options = {"index_backend": index["backend"], "index_options": dict(index["options"] or {})}

    def load():
        model = load_export(export, source["flavour"], threads, **options)
        if not rerank:
            return model
        ranker = load_export(rerank, source["rerank_flavour"], threads)
        return Pipeline(model, ranker, int(source["n"]))

    return load


# -- the app ---------------------------------------------------------------------------------------
def build_app(cfg: DictConfig):
    """The service for a (resolved) serve config: checked, store opened, model not yet loaded."""
    settings = service_settings(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    limit_blas(cfg.get("blas_threads"))
    index = _plain(cfg.index)
    source = source_of(cfg)
    loader = model_loader(source, index)
    store = open_store(str(cfg.store))
    return create_app(
        settings,
        loader,
        store,
        reopen=lambda changed: model_loader(changed, index),
        source=source,
        close_store=True,
    )


def limit_blas(threads: Any) -> None:
    """numpy's BLAS (the exact item index's matrix product) on `threads` threads. Its idle
    threads spin after each product and take the cores torch / onnxruntime run the user
    side on next: with 2 threads on 2 cores a two-tower request took 52 ms instead of 22
    (eager) and 24 instead of 9 (onnx-int8). One query against the catalogue needs none."""
    if blas_threads(threads) is None:
        return
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")


def blas_threads(value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError("blas_threads", value, "a thread count >= 1, or null (BLAS's default)")
    return value


def worker_app():
    """uvicorn's app factory in each worker process (workers > 1)."""
    return build_app(OmegaConf.create(json.loads(os.environ[CONFIG_ENV])))


def prepare(cfg: DictConfig) -> tuple[DictConfig, ServiceSettings, Any]:
    """(the served part of the config, resolved; the service settings; the app, or None
    with several workers, which build their own). Raises the config's first mistake."""
    if OmegaConf.is_missing(cfg, "export"):
        raise ConfigError(
            "export", "???", "an export folder: export=<dir> (python -m recsys_lm.export)"
        )
    served = OmegaConf.create({k: _plain(cfg[k]) for k in SERVED_KEYS})
    if int(served.workers) < 1:
        raise ConfigError("workers", served.workers, "at least 1")
    settings = service_settings(served)
    blas_threads(served.blas_threads)
    model_loader(source_of(served), _plain(served.index))  # the export folders exist
    if int(served.workers) > 1:
        open_store(str(served.store)).close()  # a bad URL fails here, not in every worker
        return served, settings, None
    return served, settings, build_app(served)


def run(cfg: DictConfig) -> int:
    """Serve until stopped; a config mistake is one `error: ...` line and exit status 2."""
    try:
        served, settings, app = prepare(cfg)
    except USER_ERRORS as err:
        cause = err.__cause__ if isinstance(err.__cause__, RecsysLMError) else err
        print(f"error: {cause}", file=sys.stderr)
        return 2
    host, port, workers = str(cfg.host), int(cfg.port), int(served.workers)
    if host not in LOOPBACK and settings.api_key is None:
        log.warning("serving on %s with no API key: anyone who reaches it may post", host)
    options = {
        "host": host,
        "port": port,
        "log_level": str(cfg.log_level),
        "access_log": bool(cfg.access_log),
        "limit_concurrency": cfg.limit_concurrency,
    }
    print(f"serving {served.export} ({served.flavour}) at http://{host}:{port} (docs: /docs)")
    sys.stdout.flush()
    if workers == 1:
        uvicorn.run(app, **options)
    else:
        os.environ[CONFIG_ENV] = json.dumps(OmegaConf.to_container(served))
        uvicorn.run("recsys_lm.serve:worker_app", factory=True, workers=workers, **options)
    return 0


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    sys.exit(run(cfg))


if __name__ == "__main__":
    main()
