"""`python -m recsys_lm.train [overrides]`: compose conf/train.yaml, train, evaluate, report."""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from recsys_lm.baselines import run_baselines
from recsys_lm.build import (
    baseline_names,
    build_datamodule,
    build_module,
    build_trainer,
    check_config,
    evaluate_sets,
    preadapted_config,
    warm_start,
)
from recsys_lm.data.prepared import EXTRA_TESTS
from recsys_lm.durable import (
    TrainingInterrupted,
    atomic_write_text,
    newest_checkpoint,
)
from recsys_lm.errors import ConfigError, RecsysLMError
from recsys_lm.launch.record import FAILED_FILE
from recsys_lm.models.cost import CostMeter
from recsys_lm.models.export import save_model
from recsys_lm.models.module import count_parameters
from recsys_lm.report import format_mean_std, over_seeds, print_summary

log = logging.getLogger("recsys_lm")
# transformers v5 deprecation raised inside peft's wrapping: noise on every run, not ours to fix.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
# peft's prefix tuning still passes `past_key_values` (v5 renamed it `cache`): noise, as above.
warnings.filterwarnings("ignore", message=".*`past_key_values` is deprecated.*")
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
# Overrides accepted with `resume=<run dir>`: how long to train, nothing that changes what.
RESUMABLE_KEYS = ("trainer.max_steps", "trainer.max_epochs")
RESUME_HINT = "python -m recsys_lm.train resume={}"


class ResumeError(RecsysLMError):
    """A folder that cannot be resumed: no saved config, no checkpoint, a changed config."""


class AlreadyFinished(Exception):
    """`resume=<dir>` of a run that wrote metrics.json: nothing to do."""


def check_precision(cfg: DictConfig) -> None:
    precision = str(cfg.trainer.precision)
    if precision.startswith("16") and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.precision",
            precision,
            "32-true or bf16-mixed on CPU; 16-mixed needs a CUDA GPU",
        )


def train(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> dict:
    """Train and evaluate one configuration; returns what is written to metrics.json.
    `callbacks` join the configured ones (an Optuna trial's pruning callback)."""
    started = time.perf_counter()
    check_precision(cfg)
    checked = check_config(cfg)  # before any data or weights are loaded
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    preadapt_start = time.perf_counter()
    cfg = preadapted_config(cfg, checked)  # the run's own backbone when `preadapt` is set
    preadapt_s = time.perf_counter() - preadapt_start
    module = build_module(cfg)
    datamodule = build_datamodule(cfg, module, checked)
    datamodule.prepare_data()
    datamodule.setup("fit")
    data = datamodule.data
    module.attach(data)
    if cfg.get("init_from") and not cfg.get("ckpt_path"):
        warm_start(module, cfg.init_from)
    params = count_parameters(module)
    protocol = data.protocol()
    log.info(
        "parameters: %s trainable of %s total (%.2f%%)",
        f"{params['trainable']:,}",
        f"{params['total']:,}",
        100 * params["trainable"] / params["total"],
    )

    meter = CostMeter()
    trainer = build_trainer(cfg, checked.task, [meter, *callbacks])
    loggers = trainer.loggers
    for logger in loggers:
        logger.log_hyperparams(
            {
                "config": OmegaConf.to_container(cfg, resolve=True),
                "protocol": protocol,
                "params": params,
            }
        )
    setup_s = time.perf_counter() - started

    # Every way out finishes the W&B run: an open run would swallow the next multirun job's.
    try:
        fit_start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        fit_s = time.perf_counter() - fit_start
        train_steps = int(trainer.global_step)  # validate/test below reload a checkpoint's step

        eval_start = time.perf_counter()
        best = _best_checkpoint(trainer)
        val = trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False)[0]
        test = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)[0]
        cost = meter.summary()  # before the extra test sets below replace its test timing
        # rolling protocol: the new-item events again (EXTRA_TESTS); other splits have none
        new_items = evaluate_sets(trainer, module, datamodule, EXTRA_TESTS, ckpt_path=best)
        options = OmegaConf.to_container(cfg.get("baseline_options") or {}, resolve=True)
        # Under DDP rank 0 alone scores the baselines (the same in every process) and writes.
        names = baseline_names(cfg, checked.task)
        baselines = run_baselines(data, names, options) if trainer.is_global_zero else {}
        eval_s = time.perf_counter() - eval_start

        result = {
            "test": _strip(test, "test/"),
            "val": _strip(val, "val/"),
            **new_items,
            "baselines": baselines,
            "protocol": protocol,
            "params": params,
            "timing": {
                "setup_s": round(setup_s, 2),
                "preadapt_s": round(preadapt_s, 2) if cfg.get("preadapt") else 0.0,
                "fit_s": round(fit_s, 2),
                "eval_s": round(eval_s, 2),
                "total_s": round(time.perf_counter() - started, 2),
                "train_steps": train_steps,
            },
            "cost": cost,
            "checkpoint": best,
            "run": {
                "head": checked.task.name,
                "peft": cfg.peft.name,
                "freeze": get_class(cfg.freeze._target_).name,
                "backbone": cfg.backbone.get("name_or_path", cfg.backbone._target_),
                "precision": str(cfg.trainer.precision),
                "seed": cfg.seed,
                "tags": list(cfg.get("tags") or []),
                "preadapt": _plain(cfg.get("preadapt")),
            },
        }
        if not trainer.is_global_zero:  # the other DDP processes leave the run folder alone
            return result
        if cfg.get("export_model"):
            result["model_dir"] = str(save_model(module, cfg, output_dir / "model"))
        atomic_write_text(output_dir / "metrics.json", json.dumps(result, indent=2))
    except TrainingInterrupted:
        _finish_wandb(loggers)  # resumed later into the same W&B run
        raise
    except BaseException:
        _finish_wandb(loggers, exit_code=1)
        raise
    _finish_wandb(loggers)
    print_summary(result, output_dir)
    return result


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    """The best checkpoint when validation ran, else the last one, else the weights in memory."""
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    if callback.best_model_path:
        return callback.best_model_path
    return callback.last_model_path or None


def _strip(metrics: dict, prefix: str) -> dict[str, float]:
    return {k.removeprefix(prefix): float(v) for k, v in metrics.items() if k.startswith(prefix)}


def _finish_wandb(loggers: list, exit_code: int = 0) -> None:
    # Each multirun job must close its run, or W&B merges the jobs into one.
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish(exit_code=exit_code)


USER_ERRORS = (RecsysLMError, InstantiationException, OmegaConfBaseException)


def resume_config(cfg: DictConfig, overrides: list[str] | None = None) -> DictConfig:
    """The config that continues the run in `cfg.resume`: its saved `.hydra/config.yaml`,
    writing into the same folder, from its newest checkpoint. `overrides` (the resume command
    line's) may change only RESUMABLE_KEYS; any other that differs from the saved value is
    refused. Raises AlreadyFinished for a run that wrote metrics.json."""
    run_dir = Path(cfg.resume)
    saved_file = run_dir / ".hydra" / "config.yaml"
    if not saved_file.is_file():
        raise ResumeError(f"resume={run_dir}: not a run folder (no {saved_file})")
    if (run_dir / "metrics.json").is_file():
        raise AlreadyFinished(str(run_dir))
    saved = OmegaConf.load(saved_file)
    differing = []
    for override in overrides or []:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in ("resume", "ckpt_path") or key.startswith("hydra."):
            continue
        if key in RESUMABLE_KEYS:
            OmegaConf.update(saved, key, OmegaConf.select(cfg, key), force_add=True)
        elif _plain(OmegaConf.select(cfg, key)) != _plain(OmegaConf.select(saved, key)):
            differing.append(key)
    if differing:
        raise ResumeError(
            f"resume={run_dir}: the config differs from the saved run in {differing}; only "
            f"{list(RESUMABLE_KEYS)} may change on resume"
        )
    checkpoint = newest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        raise ResumeError(f"resume={run_dir}: no checkpoint in {run_dir / 'checkpoints'}")
    with open_dict(saved):
        saved.paths.output_dir = str(run_dir.resolve())
        saved.resume = str(run_dir)
        saved.ckpt_path = str(checkpoint)
        if saved.get("logger") and saved.logger.get("wandb") is not None:
            saved.logger.wandb.id = _wandb_run_id(run_dir) or saved.logger.wandb.get("id")
    log.info("resuming %s from %s", run_dir, checkpoint.name)
    return saved


def _plain(node):
    return OmegaConf.to_container(node) if isinstance(node, DictConfig | ListConfig) else node


def _wandb_run_id(run_dir: Path) -> str | None:
    """The id of the newest W&B run in the folder (`wandb/[offline-]run-<time>-<id>`)."""
    runs = sorted((run_dir / "wandb").glob("*run-*-*"), key=lambda p: p.stat().st_mtime)
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None


class JobFailed(RecsysLMError):
    """A multirun job that failed: raised so Hydra records it (failed.json, through
    recsys_lm.launch.record) and goes on with the other jobs, where `sys.exit` would end
    the whole sweep."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def run(
    cfg: DictConfig, overrides: list[str] | None = None, raise_failure: bool = False
) -> dict | int:
    """`train(cfg)`, with a user's mistake (a bad key, value, path or combination) reported
    as one `error: ...` line on stderr and exit status 2 instead of a traceback. With
    `resume` set, continues that run (`resume_config`); an interrupted run (SIGTERM, SIGINT,
    SIGUSR1) exits 128 + the signal number after saving its checkpoint. With
    `raise_failure` (a multirun job) a failure raises JobFailed instead of returning its
    status."""
    try:
        if cfg.get("search") is not None:  # hparams_search=<name> would be ignored here
            raise ConfigError(
                "hparams_search", "set", "null here: a search runs with python -m recsys_lm.search"
            )
        if cfg.get("resume"):
            cfg = resume_config(cfg, overrides)
        return train(cfg)
    except AlreadyFinished as done:
        print(f"nothing to resume: {done} finished (metrics.json is there)", file=sys.stderr)
        return 0
    except TrainingInterrupted as stop:
        hint = RESUME_HINT.format(cfg.paths.output_dir)
        return _failed(
            f"interrupted at step {stop.step}; resume with {hint}",
            128 + int(stop.signum),
            raise_failure,
        )
    except USER_ERRORS as err:
        cause = err.__cause__ if isinstance(err.__cause__, RecsysLMError) else err
        return _failed(f"error: {cause}", 2, raise_failure)


def _failed(message: str, status: int, raise_failure: bool) -> int:
    print(message, file=sys.stderr)
    if raise_failure:
        raise JobFailed(f"{message} (exit status {status})", status)
    return status


def run_seeds(
    cfg: DictConfig, overrides: list[str], raise_failure: bool = False
) -> list[dict] | int:
    """`seeds=N`: the same configuration with seed, seed+1, ..., each in `<run>/seed_<s>/`
    (a run folder of its own: its config, overrides with `seed=<s>`, checkpoints,
    metrics.json), then `<run>/seeds.json` with each metric's mean ± std over them. Run
    again in the same folder (`resume=<run>`), finished seeds are read back and
    interrupted ones resumed. The first failing seed's status is returned after the
    others ran."""
    seeds = seed_range(cfg)
    count = len(seeds)
    if cfg.trainer.get("strategy"):  # each seed's Trainer would start the other ranks again
        raise ConfigError(
            "seeds", count, "1 with trainer.strategy set: run one command per seed (seed=<s>)"
        )
    output_dir = Path(cfg.paths.output_dir)
    kept = [
        o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("seed", "seeds", "resume")
    ]
    results, status = [], 0
    for seed in seeds:
        folder = output_dir / f"seed_{seed}"
        done = folder / "metrics.json"
        if done.is_file():
            results.append(json.loads(done.read_text()))
            continue
        one = _seed_config(cfg, seed, folder, kept)
        (folder / FAILED_FILE).unlink(missing_ok=True)
        try:
            results.append(run(one, raise_failure=True))
        except JobFailed as err:  # recorded like a failed multirun job; the next seed runs
            atomic_write_text(folder / FAILED_FILE, json.dumps({"error": str(err)}, indent=2))
            status = status or err.status
    if status:
        return _failed(f"{count - len(results)} of {count} seeds failed", status, raise_failure)
    summary = {"seeds": list(seeds), **over_seeds(results)}
    atomic_write_text(output_dir / "seeds.json", json.dumps(summary, indent=2))
    _print_seeds(summary)
    return results


def seed_range(cfg: DictConfig) -> range:
    """The seeds of a `seeds=N` run: seed, seed+1, ..., seed+N-1."""
    count = int(cfg.get("seeds") or 1)
    if count < 1:
        raise ConfigError("seeds", count, "a positive number of seeds")
    return range(int(cfg.seed), int(cfg.seed) + count)


def seed_copy(cfg: DictConfig, seed: int, folder: Path) -> DictConfig:
    """`cfg` for one seed of a `seeds=N` run: that seed, run alone, in its own folder."""
    one = copy.deepcopy(cfg)
    with open_dict(one):
        one.seed, one.seeds, one.paths.output_dir = seed, 1, str(folder.resolve())
    return one


def _seed_config(cfg: DictConfig, seed: int, folder: Path, overrides: list[str]) -> DictConfig:
    """One seed's config, saved in its folder as a Hydra run's would be (`.hydra/`), so the
    seed folder resumes (`resume=<run>/seed_<s>`) and reports like any run."""
    one = seed_copy(cfg, seed, folder)
    with open_dict(one):
        one.resume = None
    saved = folder / ".hydra"
    if (folder / "checkpoints").is_dir() and newest_checkpoint(folder / "checkpoints"):
        with open_dict(one):
            one.resume = str(folder)
        return one
    saved.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(one, saved / "config.yaml")
    OmegaConf.save(OmegaConf.create([*overrides, f"seed={seed}"]), saved / "overrides.yaml")
    return one


def _print_seeds(summary: dict) -> None:
    shown = ", ".join(f"{m} {format_mean_std(v)}" for m, v in summary["test"].items())
    print(f"test over {len(summary['seeds'])} seeds (mean ± std): {shown}")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode.name == "MULTIRUN"
    overrides = list(hydra_cfg.overrides.task)
    if multirun:
        cfg = multirun_wandb(cfg, hydra_cfg, overrides)
    saved = _saved_config(cfg)
    if int((saved or cfg).get("seeds") or 1) > 1:
        results = run_seeds(_seeds_config(cfg, saved), overrides, raise_failure=multirun)
    else:
        results = run(cfg, overrides, raise_failure=multirun)
    if isinstance(results, int):
        sys.exit(results)
    results = results if isinstance(results, list) else [results]
    monitor = results[0]["protocol"]["monitor"].removeprefix("val/")
    value = over_seeds(results)["val"].get(monitor, {}).get("mean")
    if multirun:
        log.info("job finished: val/%s = %s", monitor, value)
    return value


def _saved_config(cfg: DictConfig) -> DictConfig | None:
    """`resume=<run>`'s saved config, if there is one (a seeds run resumes seed by seed)."""
    file = Path(cfg.resume) / ".hydra" / "config.yaml" if cfg.get("resume") else None
    return OmegaConf.load(file) if file and file.is_file() else None


def _seeds_config(cfg: DictConfig, saved: DictConfig | None) -> DictConfig:
    if saved is None:
        return cfg
    with open_dict(saved):
        saved.paths.output_dir = str(Path(cfg.resume).resolve())
    return saved


def multirun_wandb(cfg: DictConfig, hydra_cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """A multirun job's W&B run: grouped by the sweep (its folder name), named by the job's
    folder and tagged with its overrides (W&B tags hold at most 64 characters), unless
    the config sets them."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if wandb_cfg is None:
        return cfg
    sweep = Path(str(hydra_cfg.sweep.dir)).name
    with open_dict(cfg):
        wandb_cfg.group = wandb_cfg.get("group") or sweep
        wandb_cfg.name = f"{sweep}/{hydra_cfg.sweep.subdir}"
        wandb_cfg.tags = [*(wandb_cfg.get("tags") or []), *(o[:64] for o in overrides)]
    return cfg


def resume_argv(argv: list[str]) -> list[str]:
    """With `resume=<dir>`, Hydra runs in that folder (`hydra.run.dir`) and writes no new
    `.hydra/` there: the saved config stays the run's record. The folder is quoted for
    Hydra's override grammar (a multirun job's folder name holds `=` and `,`)."""
    found = [i for i, a in enumerate(argv) if a.startswith("resume=")]
    if not found:
        return argv
    folder = argv[found[-1]].split("=", 1)[1]
    if folder in ("", "null"):
        return argv
    if "-m" in argv or "--multirun" in argv:
        print("error: resume=<dir> continues one run or multirun job: drop -m", file=sys.stderr)
        sys.exit(2)
    if folder[:1] not in ("'", '"'):
        folder = "'" + folder.replace("\\", "\\\\").replace("'", "\\'") + "'"
    out = [a for i, a in enumerate(argv) if i not in found]
    return [*out, f"resume={folder}", f"hydra.run.dir={folder}", "hydra.output_subdir=null"]


if __name__ == "__main__":
    sys.argv = resume_argv(sys.argv)
    main()
