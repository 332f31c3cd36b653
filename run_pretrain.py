"""Pretrain a language model: ``run_pretrain.py CONFIG.json [--key value ...]``.

Launch on several processes with ``python -m paddle.distributed.launch --nproc_per_node N run_pretrain.py ...``
(``--gpus 0-7`` on a GPU machine). ``--help`` lists every option.
"""

import sys

from fleetlm.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
