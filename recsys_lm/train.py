"""`python -m recsys_lm.train [overrides]`: compose conf/train.yaml, train, evaluate, report."""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
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
    warm_start,
)
from recsys_lm.data.prepared import EXTRA_TESTS
from recsys_lm.durable import (
    TrainingInterrupted,
    atomic_write_text,
    newest_checkpoint,
)
from recsys_lm.errors import ConfigError, RecsysLMError
from recsys_lm.models.export import save_model
from recsys_lm.models.module import count_parameters
from recsys_lm.report import print_summary

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


def train(cfg: DictConfig) -> dict:
    """Train and evaluate one configuration; returns what is written to metrics.json."""
    started = time.perf_counter()
    check_precision(cfg)
    checked = check_config(cfg)  # before any data or weights are loaded
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
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

    trainer = build_trainer(cfg, checked.task)
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

    fit_start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except TrainingInterrupted:
        _finish_wandb(loggers)
        raise
    fit_s = time.perf_counter() - fit_start
    train_steps = int(trainer.global_step)  # validate/test below reload a checkpoint's step

    eval_start = time.perf_counter()
    best = _best_checkpoint(trainer)
    val = trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False)[0]
    test = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)[0]
    # rolling protocol: the new-item events again (EXTRA_TESTS); other splits have none
    new_items = evaluate_sets(trainer, module, datamodule, EXTRA_TESTS, ckpt_path=best)
    options = OmegaConf.to_container(cfg.get("baseline_options") or {}, resolve=True)
    baselines = run_baselines(data, baseline_names(cfg, checked.task), options)
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
            "fit_s": round(fit_s, 2),
            "eval_s": round(eval_s, 2),
            "total_s": round(time.perf_counter() - started, 2),
            "train_steps": train_steps,
        },
        "checkpoint": best,
        "run": {
            "head": checked.task.name,
            "peft": cfg.peft.name,
            "freeze": get_class(cfg.freeze._target_).name,
            "backbone": cfg.backbone.get("name_or_path", cfg.backbone._target_),
            "precision": str(cfg.trainer.precision),
            "seed": cfg.seed,
            "tags": list(cfg.get("tags") or []),
        },
    }
    if cfg.get("export_model"):
        result["model_dir"] = str(save_model(module, cfg, output_dir / "model"))
    atomic_write_text(output_dir / "metrics.json", json.dumps(result, indent=2))
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


def _finish_wandb(loggers: list) -> None:
    # Each multirun job must close its run, or W&B merges the jobs into one.
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()


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


def run(cfg: DictConfig, overrides: list[str] | None = None) -> dict | int:
    """`train(cfg)`, with a user's mistake (a bad key, value, path or combination) reported
    as one `error: ...` line on stderr and exit status 2 instead of a traceback. With
    `resume` set, continues that run (`resume_config`); an interrupted run (SIGTERM, SIGINT,
    SIGUSR1) exits 128 + the signal number after saving its checkpoint."""
    try:
        if cfg.get("resume"):
            cfg = resume_config(cfg, overrides)
        return train(cfg)
    except AlreadyFinished as done:
        print(f"nothing to resume: {done} finished (metrics.json is there)", file=sys.stderr)
        return 0
    except TrainingInterrupted as stop:
        hint = RESUME_HINT.format(cfg.paths.output_dir)
        print(f"interrupted at step {stop.step}; resume with {hint}", file=sys.stderr)
        return 128 + int(stop.signum)
    except USER_ERRORS as err:
        cause = err.__cause__ if isinstance(err.__cause__, RecsysLMError) else err
        print(f"error: {cause}", file=sys.stderr)
        return 2


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    result = run(cfg, list(HydraConfig.get().overrides.task))
    if isinstance(result, int):
        sys.exit(result)
    monitor = result["protocol"]["monitor"].removeprefix("val/")
    value = result["val"].get(monitor)
    if HydraConfig.get().mode.name == "MULTIRUN":
        log.info("job finished: val/%s = %s", monitor, value)
    return value


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
