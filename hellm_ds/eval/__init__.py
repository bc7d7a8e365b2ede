"""Full-ranking evaluation shared by every stage (METHOD §6)."""
from hellm_ds.eval.evaluator import evaluate, evaluate_splits
from hellm_ds.eval.metrics import DEFAULT_KS, METRICS, TIE_RULES, MetricAccumulator, per_user_metrics
from hellm_ds.eval.ranking import PROTOCOLS, rank_targets, rank_targets_from_scores

__all__ = [
    "DEFAULT_KS", "METRICS", "PROTOCOLS", "TIE_RULES", "MetricAccumulator", "evaluate", "evaluate_splits",
    "per_user_metrics", "rank_targets", "rank_targets_from_scores",
]
