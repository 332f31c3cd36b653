"""Pretrain a language model: ``run_pretrain.py CONFIG.json [--key value ...]``.

Launch on several processes with ``python -m paddle.distributed.launch --nproc_per_node N run_pretrain.py ...``
(``--gpus 0-7`` on a GPU machine). ``--help`` lists every option.
"""

import signal

if __name__ == "__main__":
    # Until training starts, Ctrl-C ends the process quietly, imports included; fleetlm.pretrain
    # then takes over SIGINT and SIGTERM (fleetlm.trainer.interrupt).
    signal.signal(signal.SIGINT, signal.SIG_DFL)

    from fleetlm.pretrain import exit_process, main

    exit_process(main())
