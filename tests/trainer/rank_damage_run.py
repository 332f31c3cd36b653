"""run_pretrain.py in which one rank finds a checkpoint damaged that the other ranks read fine.

usage: rank_damage_run.py RANK CHECKPOINT_NAME [run_pretrain arguments...]
Rank RANK's verification of CHECKPOINT_NAME (e.g. checkpoint-8) fails as if its optimizer file were
truncated, which models a file that reads differently on different nodes.
"""

import os
import sys

from fleetlm.pretrain import main
from fleetlm.trainer import checkpoint
from fleetlm.trainer.checkpoint import DamagedCheckpointError

damaged_rank, damaged_name, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
original_verify = checkpoint.verify_file_sizes


def verify_or_fail_on_one_rank(path):
    if int(os.environ.get("PADDLE_TRAINER_ID", "0")) == damaged_rank and os.path.basename(path) == damaged_name:
        raise DamagedCheckpointError(path, "optimizer.tp00_pp00_sd00.pdopt", "100 bytes, but 9000 were saved")
    original_verify(path)


checkpoint.verify_file_sizes = verify_or_fail_on_one_rank
sys.exit(main(argv))
