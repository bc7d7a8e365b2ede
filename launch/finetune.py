"""HeLLM stage-2 fine-tuning entry point (thin): see ``hellm_ds.train.finetune`` for the manual.

    python launch/finetune.py --data DIR --graph-emb FILE --seq-emb FILE --model tiny --out OUT \
        --deepspeed_config ds_configs/zero3.json
    deepspeed --num_gpus N launch/finetune.py ...      |   torchrun --nproc_per_node N launch/finetune.py ...
"""
import os
import sys
from importlib.util import find_spec
from pathlib import Path

if __name__ == "__main__":
    if find_spec("hellm_ds") is None:
        # a checkout that is not pip-installed: Python puts this script's folder (launch/) on sys.path, not
        # the checkout, so `import hellm_ds` worked only with PYTHONPATH=. from the repository root. Import
        # this checkout's packages wherever the launcher runs (an installed hellm_ds is used as it is).
        root = Path(__file__).resolve().parents[1]
        sys.path[:0] = [str(root), str(root / "kernels")]
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from hellm_ds.train.finetune import main

    sys.exit(main())
