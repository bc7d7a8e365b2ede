"""``python -m hellm_ds.train ...`` = ``launch/finetune.py ...`` for an installed package (launchers:
``deepspeed --module hellm_ds.train ...``, ``torchrun -m hellm_ds.train ...``)."""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from hellm_ds.train.finetune import main  # noqa: E402  (after DS_ACCELERATOR is set)

sys.exit(main())
