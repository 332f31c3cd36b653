"""run_pretrain.py that SIGKILLs itself at a chosen point, to test resume after a crash.

usage: killing_run.py after_step|rank1_after_step|during_save STEP [run_pretrain arguments...]
  after_step STEP        die right after optimizer step STEP, before its metrics line or checkpoint
  rank1_after_step STEP  the same on global rank 1 only (under the launcher); the other ranks go on
  during_save STEP       die while saving checkpoint-STEP, after every file is written but before the rename
"""

import os
import signal
import sys

from fleetlm.pretrain import main
from fleetlm.trainer import checkpoint, trainer


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


mode, at_step, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

if mode in ("after_step", "rank1_after_step"):
    original_step = trainer.Trainer._train_step
    dies = mode == "after_step" or os.environ.get("PADDLE_TRAINER_ID") == "1"

    def train_step_then_die(self):
        metrics = original_step(self)
        if dies and self.step == at_step:
            kill_self()
        return metrics

    trainer.Trainer._train_step = train_step_then_die
elif mode == "during_save":
    original_commit = checkpoint._commit

    def commit_or_die(tmp, final):
        if final.endswith(f"checkpoint-{at_step}"):
            kill_self()
        original_commit(tmp, final)

    checkpoint._commit = commit_or_die
else:
    raise SystemExit(f"unknown mode {mode!r}")

sys.exit(main(argv))
