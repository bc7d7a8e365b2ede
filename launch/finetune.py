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
    # a checkout that is not pip-installed: Python puts this script's folder (launch/) on sys.path, not the
    # checkout; add its two source roots, the repository (hellm_ds) and kernels/ (hellm_kernels), each only
    # when that package is not importable already (an installed one is used as it is)
    root = Path(__file__).resolve().parents[1]
    for name, src in (("hellm_ds", root), ("hellm_kernels", root / "kernels")):
        if find_spec(name) is None:
            sys.path.append(str(src))
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from hellm_ds.train.finetune import main

    sys.exit(main())
