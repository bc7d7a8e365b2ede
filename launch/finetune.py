"""HeLLM stage-2 fine-tuning entry point (thin): see ``hellm_ds.train.finetune`` for the manual.

    python launch/finetune.py --data DIR --graph-emb FILE --seq-emb FILE --model tiny --out OUT \
        --deepspeed_config ds_configs/zero3.json
    deepspeed --num_gpus N launch/finetune.py ...      |   torchrun --nproc_per_node N launch/finetune.py ...
"""
import os
import sys

if __name__ == "__main__":
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from hellm_ds.train.finetune import main

    sys.exit(main())
