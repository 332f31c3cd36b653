"""fleetlm.pretrain.exit_process: a launched worker that finished skips interpreter teardown; failures exit normally."""

import pytest

from fleetlm import pretrain


class LeftWithoutTeardown(Exception):
    pass


@pytest.fixture
def os_exit(monkeypatch):
    calls = []

    def fake_exit(code):
        calls.append(code)
        raise LeftWithoutTeardown

    monkeypatch.setattr(pretrain.os, "_exit", fake_exit)
    return calls


def test_launched_worker_success_skips_teardown(monkeypatch, os_exit):
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "2")
    with pytest.raises(LeftWithoutTeardown):
        pretrain.exit_process(0)
    assert os_exit == [0]


@pytest.mark.parametrize("trainers, code", [("2", 2), ("2", 130), ("1", 0), ("1", 2)])
def test_failure_or_single_process_exits_normally(monkeypatch, os_exit, trainers, code):
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", trainers)
    with pytest.raises(SystemExit) as leaving:
        pretrain.exit_process(code)
    assert leaving.value.code == code
    assert os_exit == []
