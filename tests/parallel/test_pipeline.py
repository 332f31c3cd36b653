"""Pipeline parallel (pp2, tied embedding/head, 1F1B) on 2 CPU processes against the same layers in one process."""

import pytest
from launch_util import launch

TOLERANCE = 1e-5  # relative, fp32


@pytest.fixture(scope="module")
def ranks():
    return launch("pp2_checks.py", nproc=2)


def test_pipeline_training_matches_reference(ranks):
    for rank, results in enumerate(ranks):
        result = results["pipeline_tied_embedding_training"]
        assert "error" not in result, f"rank {rank}:\n{result.get('error')}"
        assert result["rel_diff"] <= TOLERANCE, f"rank {rank}: {result}"


def test_parallel_env_device_id_still_missing(ranks):
    for results in ranks:
        assert "no attribute '_device_id'" in results["unpatched_parallel_env_device_id"]["raised"]
