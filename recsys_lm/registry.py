"""`python -m recsys_lm.registry <command>`: versioned models (issue 10).

The issue names this `python -m recsys_lm.models`. That name is taken: `recsys_lm.models`
is the model code, a layer below the entry points.

A registry is a folder (`--registry`, else $RECSYS_LM_REGISTRY, else ./models):

    versions/v0001/            an export (python -m recsys_lm.export), as written
    versions/v0001/version.json    parent, data window, watermark, metrics, gate decision,
                                   the export's manifest checksums and version id
    current -> versions/v0002  the promoted version (a symlink, swapped atomically)
    history.jsonl              every promotion and rollback, appended and fsync'd

Serve `export=<registry>/current`. `promote` swaps the link, then, with `--service <url>`,
asks that service to reload (`POST /admin/reload` re-reads the link; the API key is read
from $RECSYS_LM_API_KEY). No request fails during the swap (the service's hot reload).

    register <export> [--parent V] [--window START END] [--watermark N] [--gate JSON] [--note T]
    list
    show <version>
    promote <version> [--service URL] [--reason TEXT]
    rollback [--service URL] [--reason TEXT]     back to the version promoted before this one

A mistake (an unknown version, an export whose files changed since it was written, nothing
to roll back to) is one `error: ...` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from recsys_lm.errors import RecsysLMError

MANIFEST = "manifest.json"
VERSION_FILE = "version.json"
CURRENT = "current"
HISTORY = "history.jsonl"
NAME = re.compile(r"^v(\d{4,})$")
API_KEY_ENV = "RECSYS_LM_API_KEY"


class RegistryError(RecsysLMError):
    """A registry command that cannot be carried out (the message says why)."""


def verify_export(folder: Path, manifest: dict) -> None:
    # build (and with it torch and lightning, 8 s) only when files are checked: `list` and
    # `show` answer at once
    from recsys_lm.build import verify_export as verify

    verify(folder, manifest)


class Registry:
    """One registry folder (module doc)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.versions = self.root / "versions"

    # -- reading ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Version names, oldest first."""
        if not self.versions.is_dir():
            return []
        found = [p.name for p in self.versions.iterdir() if NAME.match(p.name) and p.is_dir()]
        return sorted(found, key=_number)

    def record(self, name: str) -> dict[str, Any]:
        path = self.versions / name / VERSION_FILE
        if not NAME.match(name) or not path.is_file():
            raise RegistryError(f"{self.root}: no version {name!r} (versions: {self.names()})")
        return json.loads(path.read_text())

    def current(self) -> str | None:
        link = self.root / CURRENT
        return Path(os.readlink(link)).name if link.is_symlink() else None

    def history(self) -> list[dict[str, Any]]:
        path = self.root / HISTORY
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # -- writing ---------------------------------------------------------------------------
    def register(
        self,
        export: str | Path,
        parent: str | None = None,
        window: list[str] | None = None,
        watermark: int | None = None,
        gate: dict[str, Any] | None = None,
        note: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """Copy a checked export in as the next version; its name. `extra`: further fields
        of version.json (a refresh's record)."""
        export = Path(export)
        manifest_path = export / MANIFEST
        if not manifest_path.is_file():
            raise RegistryError(f"{export}: not an export folder (no {MANIFEST})")
        manifest = json.loads(manifest_path.read_text())
        try:
            verify_export(export, manifest)
        except RecsysLMError as err:
            raise RegistryError(str(err)) from err
        if parent is not None:
            self.record(parent)  # it exists
        record = {
            "version": None,
            "parent": parent,
            "created": _now(),
            "source": str(export.resolve()),
            "source_run": manifest.get("source_run"),
            "model_version": manifest.get("version"),
            "data_window": window,
            "watermark": watermark,
            "metrics": manifest.get("metrics"),
            "gate": gate or {"decision": "manual", "reason": "registered by hand"},
            "note": note,
            "files": manifest.get("files", {}),
            **(extra or {}),
        }
        self.versions.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=".register.", dir=self.versions))
        try:
            shutil.copytree(export, folder, dirs_exist_ok=True)
            while True:  # the next free name; rename fails if another register took it
                names = self.names()
                record["version"] = name = f"v{_number(names[-1]) + 1 if names else 1:04d}"
                (folder / VERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")
                try:
                    folder.rename(self.versions / name)  # whole, or not at all
                    return name
                except OSError:
                    if not (self.versions / name).exists():
                        raise
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def promote(self, name: str, reason: str, action: str = "promote") -> dict[str, Any]:
        """Point `current` at `name` (atomically) and log it; the history entry."""
        record = self.record(name)
        try:
            verify_export(self.versions / name, {"files": record["files"]})
        except RecsysLMError as err:
            raise RegistryError(f"{name}: {err}") from err
        entry = {
            "time": _now(),
            "action": action,
            "from": self.current(),
            "to": name,
            "reason": reason,
        }
        tmp = self.root / f".{CURRENT}.{os.getpid()}.tmp"  # one per process: no clash
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path("versions") / name)
        os.replace(tmp, self.root / CURRENT)  # a reader sees the old link or the new one
        with open(self.root / HISTORY, "a") as log:
            log.write(json.dumps(entry) + "\n")
            log.flush()
            os.fsync(log.fileno())
        return entry

    def rollback(self, reason: str) -> dict[str, Any]:
        """Promote the version the current one replaced when it was promoted: repeated
        rollbacks walk back along the promotions (they never undo each other)."""
        now = self.current()
        for entry in reversed(self.history()):
            if entry["action"] == "promote" and entry["to"] == now and entry["from"]:
                return self.promote(entry["from"], reason, action="rollback")
        raise RegistryError(f"{self.root}: nothing to roll back to (current: {now})")


def reload_service(url: str, timeout: float = 300.0) -> dict[str, Any]:
    """Ask a running service (`export=<registry>/current`) to load the new current."""
    headers = {}
    if os.environ.get(API_KEY_ENV):
        headers["X-API-Key"] = os.environ[API_KEY_ENV]
    try:
        reply = httpx.post(f"{url.rstrip('/')}/admin/reload", headers=headers, timeout=timeout)
    except httpx.HTTPError as err:
        raise RegistryError(f"reload {url}: {err}") from err
    if reply.status_code != 200:
        raise RegistryError(f"reload {url}: {reply.status_code} {reply.text[:300]}")
    return reply.json()


# -- the command line --------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m recsys_lm.registry", description=__doc__)
    default = os.environ.get("RECSYS_LM_REGISTRY", "models")
    root.add_argument("--registry", default=default, help="the registry folder")
    commands = root.add_subparsers(dest="command", required=True)
    add = commands.add_parser("register", help="copy an export in as the next version")
    add.add_argument("export")
    add.add_argument("--parent")
    add.add_argument("--window", nargs=2, metavar=("START", "END"))
    add.add_argument("--watermark", type=int)
    add.add_argument("--gate", type=json.loads, help='JSON, e.g. {"decision": "promote"}')
    add.add_argument("--note")
    commands.add_parser("list", help="every version, the current one marked")
    show = commands.add_parser("show", help="one version's record")
    show.add_argument("version")
    for command in ("promote", "rollback"):
        sub = commands.add_parser(command)
        if command == "promote":
            sub.add_argument("version")
        sub.add_argument("--service", help="a service to reload, e.g. http://127.0.0.1:8000")
        sub.add_argument("--reason", default=f"{command} by hand")
    return root


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    registry = Registry(args.registry)
    try:
        if args.command == "register":
            name = registry.register(
                args.export, args.parent, args.window, args.watermark, args.gate, args.note
            )
            print(f"registered {name} in {registry.root}")
        elif args.command == "list":
            print_list(registry)
        elif args.command == "show":
            print(json.dumps(registry.record(args.version), indent=2))
        else:
            if args.command == "promote":
                entry = registry.promote(args.version, args.reason)
            else:
                entry = registry.rollback(args.reason)
            print(f"{entry['action']}: {entry['from']} -> {entry['to']}")
            if args.service:
                answer = reload_service(args.service)
                print(f"{args.service} now serves model {answer.get('model_version')}")
    except RegistryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def print_list(registry: Registry) -> None:
    current = registry.current()
    print("  version  parent   created                    gate      metrics")
    for name in registry.names():
        r = registry.record(name)
        mark = "*" if name == current else " "
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in _flat(r.get("metrics")).items())
        decision = (r.get("gate") or {}).get("decision", "")
        print(
            f"{mark} {name:8} {r.get('parent') or '-':8} {r['created']:26} {decision:9} {metrics}"
        )


def _flat(metrics: Any) -> dict[str, float]:
    """The numeric test metrics of an export's manifest (whatever its nesting)."""
    out: dict[str, float] = {}
    if isinstance(metrics, dict):
        source = metrics.get("test", metrics)
        for key, value in (source or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = float(value)
    return out


def _number(name: str) -> int:
    return int(NAME.match(name).group(1))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
