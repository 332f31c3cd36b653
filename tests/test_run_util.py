"""The test helper's relaunch rule: only Paddle's TCP-store abort at start-up, never a run that trained."""

from run_util import _tcp_store_abort

ABORT = ("I1205 06:09:57.860760 14105 tcp_store.cc:336] create libuv server at port: 51830\n"
         "python: /paddle/third_party/libuv/src/unix/core.c:314: uv__finish_close: Assertion "
         "`handle->flags & UV_HANDLE_CLOSING' failed.\n"
         "2   phi::distributed::detail::TCPServer::create(unsigned short, int, int, bool)\n")


def write_log(tmp_path, text):
    (tmp_path / "workerlog.0").write_text(text)
    return str(tmp_path)


def test_start_up_abort_is_recognised(tmp_path):
    assert _tcp_store_abort(write_log(tmp_path, ABORT))


def test_run_that_trained_is_not_relaunched(tmp_path):
    trained = "06:09:59 [rank 0] INFO fleetlm.trainer.trainer: step 1/4 | loss 6.26\n" + ABORT
    assert not _tcp_store_abort(write_log(tmp_path, trained))


def test_other_failure_is_not_relaunched(tmp_path):
    assert not _tcp_store_abort(write_log(tmp_path, "Traceback (most recent call last):\nValueError: bad\n"))
