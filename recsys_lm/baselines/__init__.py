"""Reference models scored with the same split, candidates and metrics as the language model.

`BASELINES` (registry.py) lists them, one row each; `run_baselines(data, names, options)`
(run.py) fits those that apply to the task and scores them on val and test through
`evaluate_scores` (evaluate.py), the one path by which baselines are measured.
"""

from recsys_lm.baselines.evaluate import evaluate_points, evaluate_scores
from recsys_lm.baselines.registry import BASELINES, Baseline
from recsys_lm.baselines.run import check_names, run_baselines

__all__ = [
    "BASELINES",
    "check_names",
    "Baseline",
    "evaluate_points",
    "evaluate_scores",
    "run_baselines",
]
