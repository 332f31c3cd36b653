"""Sharding stages 1, 2 and 3 on 2 CPU processes against plain AdamW in one process."""

import pytest
from launch_util import launch

TOLERANCE = 1e-5  # relative, fp32


@pytest.fixture(scope="module")
def ranks():
    return launch("sharding2_checks.py", nproc=2)


@pytest.mark.parametrize("name", ["sharding_stage1", "sharding_stage2", "sharding_stage3"])
def test_sharding_matches_adamw(ranks, name):
    for rank, results in enumerate(ranks):
        result = results[name]
        assert "error" not in result, f"rank {rank}:\n{result.get('error')}"
        assert result["rel_diff"] <= TOLERANCE, f"rank {rank}: {result}"


def test_group_sharded_parallel_still_rejects_cpu(ranks):
    for results in ranks:
        assert "only support gpu, xpu and custom_device" in results["unpatched_group_sharded_parallel"]["raised"]
