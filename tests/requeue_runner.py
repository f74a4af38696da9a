"""Stands in for submitit in a SLURM job: before training it installs a SIGUSR2 handler that records the requeue
(with the global step of last.ckpt at that moment) and exits as submitit does (``sys.exit(-1)``), then runs
``src.train`` with the command-line arguments, as the job would."""

import json
import os
import signal
import sys

import torch


def requeue(signum, frame):
    ckpt = torch.load(os.environ["REQUEUE_CKPT"], weights_only=True)
    with open(os.environ["REQUEUE_MARKER"], "w") as f:
        json.dump({"signal": signum, "step": ckpt["global_step"]}, f)
    sys.exit(-1)


if __name__ == "__main__":
    signal.signal(signal.SIGUSR2, requeue)
    from src.train import main

    sys.argv = ["src.train", *sys.argv[1:]]
    main()
