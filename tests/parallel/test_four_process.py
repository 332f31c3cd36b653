"""Modes that need 4 CPU processes: dp2 x mp2 (fleet.init creates many groups) and pp4 with 2 virtual stages."""

import pytest
from launch_util import launch

TOLERANCE = 1e-5  # relative, fp32


@pytest.fixture(scope="module")
def dp2_mp2_ranks():
    return launch("four_process_checks.py", nproc=4, args=("dp2_mp2",))


@pytest.fixture(scope="module")
def pp4_vpp2_ranks():
    return launch("four_process_checks.py", nproc=4, args=("pp4_vpp2",))


def test_dp2_mp2_fleet_init(dp2_mp2_ranks):
    for rank, results in enumerate(dp2_mp2_ranks):
        assert "error" not in results["dp2_mp2_fleet_init"], f"rank {rank}:\n{results['dp2_mp2_fleet_init']}"


def test_dp2_mp2_training_matches_reference(dp2_mp2_ranks):
    for rank, results in enumerate(dp2_mp2_ranks):
        result = results["tensor_parallel_training"]
        assert "error" not in result, f"rank {rank}:\n{result.get('error')}"
        assert result["rel_diff"] <= TOLERANCE, f"rank {rank}: {result}"


def test_interleaved_pipeline_matches_reference(pp4_vpp2_ranks):
    for rank, results in enumerate(pp4_vpp2_ranks):
        result = results["pp4_vpp2_training"]
        assert "error" not in result, f"rank {rank}:\n{result.get('error')}"
        assert result["rel_diff"] <= TOLERANCE, f"rank {rank}: {result}"
