"""Dataset directories: reading, validation, the leave-one-out split, batching, synthetic data."""
from hellm_ds.data.batching import NextItemExamples, ShardedSampler, left_pad
from hellm_ds.data.dataset import Dataset, EvalSplit, Modality, TrainSamples, load_dataset

__all__ = [
    "Dataset", "EvalSplit", "Modality", "NextItemExamples", "ShardedSampler", "TrainSamples",
    "left_pad", "load_dataset",
]
