"""Every metric, both protocols, against a naive per-user Python reference on random scores."""
import math

import pytest
import torch

from hellm_ds.eval.metrics import DEFAULT_KS, MetricAccumulator
from hellm_ds.eval.ranking import rank_targets, rank_targets_from_scores


def naive_metrics(scores_row, target, history, protocol, ks=DEFAULT_KS):
    """Sort the catalogue, ties in the target's favour, and compute each metric by its definition."""
    n_items = len(scores_row) - 1
    masked = set(history) if protocol == "filtered" else set()
    if target in masked or math.isnan(scores_row[target]):
        rank = n_items
    else:
        t = scores_row[target]
        rank = 0
        for item in range(1, n_items + 1):
            if item == target or item in masked:
                continue
            s = scores_row[item]
            if math.isnan(s) or s > t:
                rank += 1
    # ranked list: `rank` items above the target, then the target at position rank (0-based)
    out = {}
    for k in ks:
        relevant_at = [rank] if rank < k else []
        hits = len(relevant_at)
        dcg = sum(1 / math.log2(p + 2) for p in relevant_at)
        precisions_at_hits = [1 / (p + 1) for p in relevant_at]  # 1 relevant item seen by position p
        out[f"Recall@{k}"] = hits / 1
        out[f"NDCG@{k}"] = dcg / 1.0  # ideal DCG with one relevant item = 1/log2(2)
        out[f"MRR@{k}"] = 1 / (relevant_at[0] + 1) if relevant_at else 0.0
        out[f"Precision@{k}"] = hits / k
        out[f"MAP@{k}"] = sum(precisions_at_hits) / min(1, k)
    return out


def random_case(seed, B=40, n_items=37, d=5, ties=False, nan=False):
    g = torch.Generator().manual_seed(seed)
    users = torch.randn(B, d, generator=g, dtype=torch.float64)
    items = torch.randn(n_items + 1, d, generator=g, dtype=torch.float64)
    if ties:  # small integer vectors: every product is exact, so equal scores are bit-equal ties
        users = torch.randint(-3, 4, (B, d), generator=g).double()
        items = torch.randint(-2, 3, (n_items + 1, d), generator=g).double()
    targets = torch.randint(1, n_items + 1, (B,), generator=g)
    L = 6
    history = torch.randint(0, n_items + 1, (B, L), generator=g)
    history[:, :2] = 0  # left padding
    history[0, -1] = targets[0]  # a repeat purchase: masked target → miss under "filtered"
    scores = users @ items.T
    if nan:
        scores[1, 3] = float("nan")
        scores[2, targets[2]] = float("nan")
    return users, items, targets, history, scores


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
def test_metrics_match_naive_reference(seed, ties):
    users, items, targets, history, scores = random_case(seed, ties=ties)
    ranks = rank_targets(users, items, targets, history, chunk_elems=40 * 7)  # several item chunks
    dense = rank_targets_from_scores(scores, targets, history)
    for protocol in ("paper", "filtered"):
        torch.testing.assert_close(ranks[protocol], dense[protocol])
        acc = MetricAccumulator()
        acc.add(ranks[protocol])
        got = acc.result()
        ref = {}
        for b in range(len(targets)):
            m = naive_metrics(scores[b].tolist(), int(targets[b]), history[b][history[b] > 0].tolist(), protocol)
            for k, v in m.items():
                ref[k] = ref.get(k, 0.0) + v / len(targets)
        assert got.keys() == ref.keys()
        for k in ref:
            assert got[k] == pytest.approx(ref[k], abs=1e-12), (protocol, k)


def test_nan_scores_never_flatter():
    users, items, targets, history, scores = random_case(0, nan=True)
    ranks = rank_targets_from_scores(scores, targets, history)
    n_items = scores.shape[1] - 1
    assert ranks["paper"][2] == n_items  # NaN target score → miss
    for protocol in ("paper", "filtered"):
        for b in range(len(targets)):
            ref = naive_metrics(scores[b].tolist(), int(targets[b]), history[b][history[b] > 0].tolist(), protocol)
            acc = MetricAccumulator()
            acc.add(ranks[protocol][b : b + 1])
            assert acc.result()["NDCG@20"] == pytest.approx(ref["NDCG@20"])


def test_ties_count_in_targets_favour():
    scores = torch.tensor([[0.0, 1.0, 1.0, 1.0, 2.0]])  # item 0 is padding
    ranks = rank_targets_from_scores(scores, torch.tensor([2]))
    assert ranks["paper"].item() == 1  # only item 4 is strictly higher
    assert ranks["ties"].item() == 2  # items 1 and 3 score like the target


def test_filtered_masks_history_but_paper_does_not():
    scores = torch.tensor([[0.0, 5.0, 4.0, 3.0, 2.0]])
    history = torch.tensor([[0, 1, 2]])
    r = rank_targets_from_scores(scores, torch.tensor([3]), history)
    assert r["paper"].item() == 2 and r["filtered"].item() == 0


def test_padding_column_is_never_ranked():
    scores = torch.tensor([[100.0, 1.0, 2.0]])
    assert rank_targets_from_scores(scores, torch.tensor([2]))["paper"].item() == 0


def test_chunking_does_not_change_ranks_at_scale():
    g = torch.Generator().manual_seed(3)
    users = torch.randn(64, 16, generator=g)
    items = torch.randn(5001, 16, generator=g)
    targets = torch.randint(1, 5001, (64,), generator=g)
    history = torch.randint(0, 5001, (64, 20), generator=g)
    a = rank_targets(users, items, targets, history, chunk_elems=64 * 333)
    b = rank_targets(users, items, targets, history, chunk_elems=1 << 30)
    for p in a:
        assert torch.equal(a[p], b[p])


def test_accumulator_means_over_all_users_including_misses():
    acc = MetricAccumulator(ks=(1,))
    acc.add(torch.tensor([0, 5, 10**6]))
    res = acc.result()
    assert res["Recall@1"] == pytest.approx(1 / 3)
    assert res["Precision@1"] == pytest.approx(1 / 3)


def test_empty_accumulator_gives_nan():
    assert all(math.isnan(v) for v in MetricAccumulator().result().values())


def test_item_bias_is_added():
    users = torch.ones(1, 1)
    items = torch.tensor([[0.0], [1.0], [1.0]])
    bias = torch.tensor([0.0, 0.0, 0.5])
    assert rank_targets(users, items, torch.tensor([1]), item_bias=bias)["paper"].item() == 1
    assert rank_targets(users, items, torch.tensor([2]), item_bias=bias)["paper"].item() == 0


def test_factorised_path_never_builds_users_by_items(monkeypatch):
    """Only B × chunk score blocks are ever materialised."""
    shapes = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        out = real(a, b)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    rank_targets(torch.randn(8, 4), torch.randn(1001, 4), torch.randint(1, 1001, (8,)), chunk_elems=8 * 100)
    assert shapes and max(r * c for r, c in shapes) <= 8 * 100
    assert sum(c for _, c in shapes) == 1000  # every item scored exactly once
