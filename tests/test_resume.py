"""Crash-safe training, end to end through the command line (`python -m recsys_lm.train`):
a run killed mid-epoch and resumed with `resume=<run dir>` (the README's command) ends with
exactly the metrics, best checkpoint and step count of the same run left alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recsys_lm.data.datamodule import ResumableLoader
from recsys_lm.durable import (
    AtomicCheckpointIO,
    atomic_directory,
    checkpoint_step,
    newest_checkpoint,
)
from tests.conftest import train_cli

# 85 training batches per epoch, so every kill below lands mid-epoch; validation every 10
# steps (best checkpoint), a periodic checkpoint every 5.
RUN = [
    "backbone=tiny_bert",
    "trainer.accelerator=cpu",
    "data.source.num_users=40",
    "data.source.num_items=60",
    "data.batch_size=8",
    "data.eval_negatives=9",
    "trainer.max_steps=30",
    "trainer.max_epochs=5",
    "trainer.val_check_interval=10",
    "trainer.limit_val_batches=2",
    "callbacks.periodic_checkpoint.every_n_train_steps=5",
    "baselines=[]",
    "export_model=false",
]


def killer(steps: list[int], signal_name: str, marker: Path) -> list[str]:
    return [
        "+callbacks.killer._target_=tests.killer.KillAt",
        f"+callbacks.killer.step=[{','.join(str(s) for s in steps)}]",
        f"+callbacks.killer.signal_name={signal_name}",
        f"+callbacks.killer.marker={marker}",
    ]


def outcome(run_dir: Path) -> dict:
    """metrics.json's figures, and the tracking state of the checkpoint and early-stopping
    callbacks in the final periodic checkpoint, step-30 (paths by file name: the folders
    differ). Not last.ckpt: Lightning rewrites it at train end only in a process that has not
    saved one yet (ModelCheckpoint's `_last_checkpoint_saved` is not checkpointed), so a
    resumed run's last.ckpt is at step 30 where an uninterrupted one's stays at 20."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    last = torch.load(run_dir / "checkpoints" / "step-30.ckpt", weights_only=False)
    tracking = {}
    for name, state in last["callbacks"].items():
        if name.startswith("ModelCheckpoint"):
            tracking[name] = (
                float(state["best_model_score"]),
                Path(state["best_model_path"]).name,
            )
        elif name.startswith("EarlyStopping"):
            tracking["early_stopping"] = (state["wait_count"], float(state["best_score"]))
    return {
        "test": metrics["test"],
        "val": metrics["val"],
        "best": Path(metrics["checkpoint"]).name,
        "steps": metrics["timing"]["train_steps"],
        "global_step": last["global_step"],
        "tracking": tracking,
    }


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("resume_cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    """outcome(extra overrides) of the run left alone, trained once per `extra`."""
    done = {}

    def run(extra: tuple[str, ...]) -> dict:
        if extra not in done:
            run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
            result = train_cli(*RUN, *extra, "logger=none", f"hydra.run.dir={run_dir}", cache=cache)
            assert result.returncode == 0, result.stderr[-3000:]
            done[extra] = outcome(run_dir)
        return done[extra]

    return run


def resumes_from(run_dir: Path) -> tuple[str, int]:
    """The checkpoint a resume would start from: (file name, its step); no temp file left."""
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    newest = newest_checkpoint(run_dir / "checkpoints")
    return newest.name, checkpoint_step(newest)


def assert_one_run_folder(run_dir: Path) -> None:
    """The same folder throughout: one CSV log continued, no second Hydra record."""
    assert sorted(p.name for p in (run_dir / "csv").iterdir()) == ["version_0"]
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == [".hydra"]


@pytest.mark.slow
def test_a_run_killed_twice_resumes_each_time_to_the_uninterrupted_result(
    tmp_path, cache, uninterrupted
):
    """SIGKILL after the first periodic checkpoint and before any validation (step 7: resumes
    from step-5), then, in the resumed process, after the validation at 20 (step 23: resumes
    from last.ckpt); the second resume ends exactly where the run left alone does."""
    run_dir, marker = tmp_path / "run", tmp_path / "killed"
    first = train_cli(
        *RUN,
        "logger=csv",
        *killer([7, 23], "SIGKILL", marker),
        f"hydra.run.dir={run_dir}",
        cache=cache,
    )
    assert first.returncode == -9 and marker.read_text() == "7"
    assert not (run_dir / "metrics.json").exists()
    assert resumes_from(run_dir) == ("step-5.ckpt", 5)

    second = train_cli(f"resume={run_dir}", cache=cache)
    assert second.returncode == -9 and marker.read_text() == "7 23", second.stderr[-3000:]
    assert f"resuming {run_dir} from step-5.ckpt" in second.stdout + second.stderr
    assert resumes_from(run_dir) == ("last.ckpt", 20)

    third = train_cli(f"resume={run_dir}", cache=cache)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"resuming {run_dir} from last.ckpt" in third.stdout + third.stderr
    assert outcome(run_dir) == uninterrupted(())  # exact: floats compared with ==
    assert_one_run_folder(run_dir)

    again = train_cli(f"resume={run_dir}", cache=cache)
    assert again.returncode == 0 and "nothing to resume" in again.stderr


@pytest.mark.slow
def test_a_graceful_stop_with_the_length_grouped_sampler_resumes_to_the_same_result(
    tmp_path, cache, uninterrupted
):
    """SIGTERM: last.ckpt is saved at the step boundary after the signal, the message names
    the resume command, and the length-grouped sampler picks up mid-epoch exactly."""
    extra = ("data.length_grouping=true",)
    run_dir, marker = tmp_path / "run", tmp_path / "killed"
    first = train_cli(
        *RUN,
        *extra,
        "logger=csv",
        *killer([13], "SIGTERM", marker),
        f"hydra.run.dir={run_dir}",
        cache=cache,
    )
    assert first.returncode == 128 + 15, first.stderr[-3000:]
    assert first.stderr.strip().splitlines()[-1] == (
        f"interrupted at step 14; resume with python -m recsys_lm.train resume={run_dir}"
    )
    assert marker.exists() and not (run_dir / "metrics.json").exists()
    assert resumes_from(run_dir) == ("last.ckpt", 14)

    resumed = train_cli(f"resume={run_dir}", cache=cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert outcome(run_dir) == uninterrupted(extra)
    assert_one_run_folder(run_dir)


def test_resume_as_the_readme_writes_it_and_its_refusals(tmp_path, cache):
    """`resume=logs/train/runs/<run>` from the folder the run was started in; a resumable
    override (max_steps) is taken, others are refused, as is a folder without checkpoint."""
    marker = tmp_path / "killed"
    first = train_cli(
        *RUN,
        "trainer.max_steps=3",
        "logger=none",
        "callbacks.periodic_checkpoint.every_n_train_steps=1",
        *killer([2], "SIGKILL", marker),
        cache=cache,
        cwd=tmp_path,
    )
    assert first.returncode == -9
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    relative = f"logs/train/runs/{run_dir.name}"

    changed = train_cli(
        f"resume={relative}", "data.batch_size=4", "optim.lr=0.1", cache=cache, cwd=tmp_path
    )
    assert changed.returncode == 2
    line = changed.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and relative in line
    assert "['data.batch_size', 'optim.lr']" in line

    longer = train_cli(f"resume={relative}", "trainer.max_steps=4", cache=cache, cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["timing"]["train_steps"] == 4
    assert list((tmp_path / "logs" / "train" / "runs").iterdir()) == [run_dir]

    (run_dir / "metrics.json").unlink()
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        ckpt.unlink()
    empty = train_cli(f"resume={relative}", cache=cache, cwd=tmp_path)
    assert empty.returncode == 2
    line = empty.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "no checkpoint" in line and relative in line


@pytest.mark.parametrize("length_grouping", [False, True])
def test_training_loader_resumes_mid_epoch_and_across_epochs(tokenizer, length_grouping):
    from tests.conftest import make_datamodule

    def loader():
        dm = make_datamodule(tokenizer, "click", batch_size=8, length_grouping=length_grouping)
        out = dm.train_dataloader()
        assert isinstance(out, ResumableLoader)
        return out

    def ids(batch) -> list:
        return batch.input_ids[:, :8].tolist()

    whole = loader()
    epochs = [[ids(b) for b in whole] for _ in range(2)]
    assert epochs[0] != epochs[1]  # a new order each epoch
    n = len(epochs[0])
    for stop in (3, n):  # mid-epoch, and at the epoch's end
        first = loader()
        seen = []
        for i, batch in enumerate(first):
            seen.append(ids(batch))
            if i + 1 == stop:
                break
        state = first.state_dict()
        second = loader()
        second.load_state_dict(state)
        rest = [ids(b) for b in second]
        if stop == n:
            assert rest == epochs[1]
        else:
            assert seen + rest == epochs[0]
            assert [ids(b) for b in second] == epochs[1]


def test_checkpoints_and_folders_are_written_atomically(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 3, "w": torch.ones(2)}, target)
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]
    assert newest_checkpoint(target.parent) == target

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(folder) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("killed while writing")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert (folder / "old.txt").read_text() == "old"  # the complete old folder stays
    with atomic_directory(folder) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in folder.iterdir()] == ["new.txt"]


def test_resume_argv_runs_hydra_in_the_old_folder_quoted_for_its_grammar():
    from recsys_lm.train import resume_argv

    job = "logs/train/multiruns/2026-01-01_00-00-00/0_peft=lora,freeze=none"
    assert resume_argv(["train", f"resume={job}", "trainer.max_steps=9"]) == [
        "train",
        "trainer.max_steps=9",
        f"resume='{job}'",
        f"hydra.run.dir='{job}'",
        "hydra.output_subdir=null",
    ]
    assert resume_argv(["train", "head=click"]) == ["train", "head=click"]
