"""Reference recommenders every model is compared with."""
from hellm_ds.baselines.popularity import evaluate_popularity, popularity_scores

__all__ = ["evaluate_popularity", "popularity_scores"]
