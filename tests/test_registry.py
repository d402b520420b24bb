"""Versioned models (`python -m recsys_lm.registry`): register checked exports, list and
show them, promote and roll back through one atomically swapped link, and a service serving
`<registry>/current` picks up a promotion on reload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recsys_lm.build import file_sha256
from recsys_lm.registry import Registry, RegistryError, run
from tests.conftest import ROOT, export_config, train_run
from tests.serving.service import free_port


def fake_export(folder: Path, weights: bytes, test_ndcg: float) -> Path:
    """An export's shape: files and a manifest with their checksums (nothing loadable)."""
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "weights.bin").write_bytes(weights)
    files = {"model/weights.bin": file_sha256(folder / "model" / "weights.bin")}
    manifest = {
        "version": weights.hex()[:12],
        "source_run": "/runs/x",
        "metrics": {"test": {"ndcg@10": test_ndcg}},
        "files": files,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_register_list_show_promote_and_roll_back(tmp_path, capsys):
    registry = Registry(tmp_path / "reg")
    first = fake_export(tmp_path / "a", b"\x01" * 8, 0.05)
    second = fake_export(tmp_path / "b", b"\x02" * 8, 0.06)
    assert registry.register(first) == "v0001"
    gate = {"decision": "promote", "reason": "within margin", "new": 0.06, "old": 0.05}
    name = registry.register(second, parent="v0001", window=["t0", "t1"], watermark=42, gate=gate)
    assert name == "v0002" and registry.names() == ["v0001", "v0002"]
    record = registry.record("v0002")
    assert record["parent"] == "v0001" and record["watermark"] == 42
    assert record["data_window"] == ["t0", "t1"] and record["gate"] == gate
    assert record["files"] == json.loads((second / "manifest.json").read_text())["files"]
    assert (registry.versions / "v0002" / "model" / "weights.bin").read_bytes() == b"\x02" * 8
    assert registry.current() is None

    registry.promote("v0001", "first")
    registry.promote("v0002", "refresh")
    assert registry.current() == "v0002"
    current = registry.root / "current"
    assert current.is_symlink() and (current / "manifest.json").is_file()
    back = registry.rollback("bad numbers")
    assert back["action"] == "rollback" and back["to"] == "v0001" and back["from"] == "v0002"
    assert registry.current() == "v0001"
    assert [e["to"] for e in registry.history()] == ["v0001", "v0002", "v0001"]
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback("again")  # v0001 was the first: a rollback never undoes one

    assert run(["--registry", str(registry.root), "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[1].startswith("* v0001") and listed[2].startswith("  v0002")
    assert "promote" in listed[2] and "ndcg@10 0.0600" in listed[2]
    assert run(["--registry", str(registry.root), "show", "v0002"]) == 0
    assert json.loads(capsys.readouterr().out)["parent"] == "v0001"


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["show", "v0009"], ["no version 'v0009'", "v0001"]),
        (["promote", "latest"], ["no version 'latest'"]),
        (["register", "{changed}"], ["changed since export", "model/weights.bin"]),
        (["register", "{nothing}"], ["not an export folder"]),
        (["register", "{first}", "--parent", "v0007"], ["no version 'v0007'"]),
        (["rollback"], ["nothing to roll back to"]),
        (["promote", "v0001", "--service", "{nobody}"], ["reload http://127.0.0.1"]),
    ],
)
def test_mistakes_are_one_error_line_and_change_nothing(tmp_path, capsys, argv, words):
    registry = Registry(tmp_path / "reg")
    first = fake_export(tmp_path / "a", b"\x01" * 8, 0.05)
    registry.register(first)
    registry.promote("v0001", "first")
    changed = fake_export(tmp_path / "c", b"\x03" * 8, 0.05)
    (changed / "model" / "weights.bin").write_bytes(b"tampered")
    nobody = f"http://127.0.0.1:{free_port()}"
    names = {"changed": changed, "nothing": tmp_path, "first": first, "nobody": nobody}
    filled = [a.format(**names) for a in argv]
    assert run(["--registry", str(registry.root), *filled]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    for word in words:
        assert word in err, err
    assert registry.names() == ["v0001"] and registry.current() == "v0001"
    assert not [p for p in registry.versions.iterdir() if p.name.startswith(".")]


def test_a_tampered_version_is_not_promoted(tmp_path):
    registry = Registry(tmp_path / "reg")
    registry.register(fake_export(tmp_path / "a", b"\x01" * 8, 0.05))
    (registry.versions / "v0001" / "model" / "weights.bin").write_bytes(b"tampered")
    with pytest.raises(RegistryError, match="changed since export"):
        registry.promote("v0001", "x")
    assert registry.current() is None and registry.history() == []


# -- with real exports and the service -----------------------------------------------------------
def export_of(tmp_path_factory, steps: int) -> Path:
    from recsys_lm.export import export

    overrides = ["head=sequential", "peft=none", f"trainer.max_steps={steps}"]
    run_dir = train_run(tmp_path_factory.mktemp(f"run{steps}"), overrides)
    out = tmp_path_factory.mktemp("exports") / f"steps{steps}"
    export(export_config(run_dir, [f"out={out}", "flavours=[]", "parity.users=5"]))
    return out


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_service_on_current_serves_the_promoted_version_after_reload(
    tmp_path_factory, tmp_path
):
    from recsys_lm.serve import model_loader
    from tests.serving.service import export_source, serving

    registry = Registry(tmp_path / "reg")
    for steps in (1, 3):
        registry.register(export_of(tmp_path_factory, steps))
    registry.promote("v0001", "first")
    source = export_source(registry.root / "current")
    loader = model_loader(source, {"backend": "exact", "options": {}})
    async with serving(loader, tmp_path, source=source) as (client, _):
        before = (await client.get("/readyz")).json()["model_version"]
        registry.promote("v0002", "refresh")
        assert (await client.post("/admin/reload")).status_code == 200
        after = (await client.get("/readyz")).json()["model_version"]
    versions = [registry.record(n)["model_version"] for n in ("v0001", "v0002")]
    assert before == versions[0] and after == versions[1] and before != after


@pytest.fixture
def anyio_backend():
    return "asyncio"


def test_the_module_runs_from_the_command_line_and_lists_without_torch(tmp_path):
    """`list` and `show` read JSON only: no torch import, so they answer at once."""
    registry = Registry(tmp_path / "reg")
    registry.register(fake_export(tmp_path / "a", b"\x01" * 8, 0.05))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RECSYS_LM_REGISTRY": str(registry.root)}
    probe = (
        "import sys; from recsys_lm.registry import run; code = run(['list']); "
        "print('torch loaded' if 'torch' in sys.modules else 'no torch'); sys.exit(code)"
    )
    for argv in (["-m", "recsys_lm.registry", "list"], ["-c", probe]):
        done = subprocess.run(
            [sys.executable, *argv], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        assert "v0001" in done.stdout
    assert done.stdout.strip().endswith("no torch")
