"""recsys_lm.launch.naming: job folder names stay under the file-name limit and unique."""

from __future__ import annotations

from omegaconf import OmegaConf

from recsys_lm.launch.naming import MAX_NAME, job_dirname


def test_short_names_are_hydras_own() -> None:
    assert job_dirname(3, "peft=ia3,seed=2") == "3_peft=ia3,seed=2"
    assert job_dirname(0, "") == "0"


def test_long_names_are_cut_with_a_digest_of_the_whole() -> None:
    common = ",".join(f"data.option_{i}=value_{i}" for i in range(20))
    one, other = job_dirname(12, common + ",seed=1"), job_dirname(12, common + ",seed=2")
    assert one != other  # the cut part is the same: the digest tells them apart
    assert one.startswith("12_data.option_0=value_0")
    assert len(one.encode()) == MAX_NAME + 2 + 8 < 255


def test_the_resolver_is_registered_for_the_sweep_subdir() -> None:
    cfg = OmegaConf.create(
        {"num": 7, "dirname": "a=1,b=2", "subdir": "${job_dirname:${num},${dirname}}"}
    )
    assert cfg.subdir == "7_a=1,b=2"  # the commas inside the interpolation stay one argument
