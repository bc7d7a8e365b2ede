"""Stage-2 training (METHOD §5): the DeepSpeed fine-tuning loop of HeLLM.

``hellm_ds.train.finetune`` is the module (its docstring is the launch manual); the entry function is
``hellm_ds.train.finetune.finetune(FinetuneConfig(...))`` — deliberately not re-exported here, so that
``hellm_ds.train.finetune`` stays the module."""
from hellm_ds.train.finetune import (
    ADAPTER_CONFIG,
    ADAPTER_NAME,
    FinetuneConfig,
    TrainingDiverged,
    load_adapter,
    lr_at,
)

__all__ = ["ADAPTER_CONFIG", "ADAPTER_NAME", "FinetuneConfig", "TrainingDiverged", "load_adapter", "lr_at"]
