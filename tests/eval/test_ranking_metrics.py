"""Every metric, both protocols and both tie rules, against naive per-user Python references: a sort with
the target's possible positions averaged, and (small catalogues) every tie-break order enumerated."""
import itertools
import math

import pytest
import torch

from hellm_ds.eval.metrics import DEFAULT_KS, MEAN_TIES, TIE_RULES, USERS, MetricAccumulator
from hellm_ds.eval.ranking import rank_targets, rank_targets_from_scores


def naive_metrics(scores_row, target, history, protocol, ks=DEFAULT_KS, rule="optimistic"):
    """Count the items above and beside the target; optimistic: the target first among its ties; expected:
    each metric averaged over the target's possible positions."""
    n_items = len(scores_row) - 1
    masked = set(history) if protocol == "filtered" else set()
    above = tied = 0
    if target in masked or math.isnan(scores_row[target]):
        above = n_items
    else:
        t = scores_row[target]
        for item in range(1, n_items + 1):
            if item == target or item in masked:
                continue
            s = scores_row[item]
            if math.isnan(s) or s > t:
                above += 1
            elif s == t:
                tied += 1
    positions = [above] if rule == "optimistic" else range(above, above + tied + 1)
    runs = [metrics_at_rank(r, ks) for r in positions]
    return {k: sum(m[k] for m in runs) / len(runs) for k in runs[0]}


def metrics_at_rank(rank, ks=DEFAULT_KS):
    """Each metric by its definition for a ranked list with the target at 0-based position ``rank``."""
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


def mean_naive(scores, targets, history, protocol, rule, ks=DEFAULT_KS):
    ref = {}
    for b in range(len(targets)):
        m = naive_metrics(scores[b].tolist(), int(targets[b]), history[b][history[b] > 0].tolist(), protocol,
                          ks, rule)
        for k, v in m.items():
            ref[k] = ref.get(k, 0.0) + v / len(targets)
    return ref


def accumulate(ranks, protocol, rule, ks=DEFAULT_KS):
    acc = MetricAccumulator(ks, rule)
    acc.add(ranks[protocol], ranks["ties"][protocol])
    return acc.result()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("rule", TIE_RULES)
def test_metrics_match_naive_reference(seed, ties, rule):
    users, items, targets, history, scores = random_case(seed, ties=ties)
    ranks = rank_targets(users, items, targets, history, chunk_elems=40 * 7)  # several item chunks
    dense = rank_targets_from_scores(scores, targets, history)
    for protocol in ("paper", "filtered"):
        torch.testing.assert_close(ranks[protocol], dense[protocol])
        torch.testing.assert_close(ranks["ties"][protocol], dense["ties"][protocol])
        got = accumulate(ranks, protocol, rule)
        ref = mean_naive(scores, targets, history, protocol, rule)
        assert got.keys() == ref.keys() | {MEAN_TIES, USERS}
        assert got[USERS] == len(targets)
        for k in ref:
            assert got[k] == pytest.approx(ref[k], abs=1e-12), (protocol, k)
    if ties:  # the integer case has real ties, so the rules must disagree
        assert accumulate(ranks, "paper", "expected")["NDCG@10"] < accumulate(ranks, "paper", "optimistic")["NDCG@10"]


def brute_force_expected(scores_row, target, history, protocol, ks):
    """Every ordering of the unmasked catalogue that sorts its scores (NaN first), all equally likely."""
    n_items = len(scores_row) - 1
    masked = set(history) if protocol == "filtered" else set()
    if target in masked or math.isnan(scores_row[target]):
        return metrics_at_rank(n_items, ks)
    key = [math.inf if math.isnan(scores_row[i]) else scores_row[i] for i in range(n_items + 1)]
    pool = [i for i in range(1, n_items + 1) if i not in masked]
    runs = [metrics_at_rank(order.index(target), ks) for order in itertools.permutations(pool)
            if all(key[a] >= key[b] for a, b in zip(order, order[1:]))]
    return {k: sum(m[k] for m in runs) / len(runs) for k in runs[0]}


def small_scorer(kind, seed, B=6, n_items=7):
    g = torch.Generator().manual_seed(seed)
    if kind == "constant":
        scores = torch.full((B, n_items + 1), 0.25)
    elif kind == "two-level":
        scores = torch.randint(0, 2, (B, n_items + 1), generator=g).float()
    else:  # bf16-quantised: values within 3 % of 1 land on 4 or 5 bf16 levels (spacing 2^-7)
        scores = (1 + 0.03 * torch.rand(B, n_items + 1, generator=g)).to(torch.bfloat16)
    targets = torch.randint(1, n_items + 1, (B,), generator=g)
    history = torch.randint(0, n_items + 1, (B, 3), generator=g)
    history[0] = torch.tensor([0, 0, 0])
    history[1, -1] = targets[1]  # a repeat purchase: a miss under "filtered"
    return scores, targets, history


@pytest.mark.parametrize("kind", ["constant", "two-level", "bf16"])
@pytest.mark.parametrize("seed", range(2))
def test_expected_rule_equals_every_tie_break_order(kind, seed):
    scores, targets, history = small_scorer(kind, seed)
    ks = (1, 3, 5)
    ranks = rank_targets_from_scores(scores, targets, history)
    for protocol in ("paper", "filtered"):
        got = accumulate(ranks, protocol, "expected", ks)
        ref = {}
        for b in range(len(targets)):
            row = scores[b].float().tolist()
            m = brute_force_expected(row, int(targets[b]), history[b][history[b] > 0].tolist(), protocol, ks)
            for k, v in m.items():
                ref[k] = ref.get(k, 0.0) + v / len(targets)
        for k in ref:
            assert got[k] == pytest.approx(ref[k], abs=1e-12), (kind, protocol, k)


def test_constant_scorer_gets_chance_not_a_perfect_score():
    n_items = 50
    # every item scores the same; integer vectors make each product exact whatever BLAS's summation order
    users = torch.randint(-3, 4, (8, 4)).float()
    items = torch.tensor([[1.0, -2.0, 0.0, 3.0]]).expand(n_items + 1, 4)
    ranks = rank_targets(users, items, torch.randint(1, n_items + 1, (8,)), chunk_elems=8 * 7)
    assert ranks["ties"]["paper"].tolist() == [n_items - 1] * 8
    expected, optimistic = accumulate(ranks, "paper", "expected"), accumulate(ranks, "paper", "optimistic")
    for k in DEFAULT_KS:
        assert expected[f"Recall@{k}"] == pytest.approx(k / n_items)
        assert optimistic[f"Recall@{k}"] == 1.0
    assert expected[MEAN_TIES] == optimistic[MEAN_TIES] == n_items - 1


def test_low_precision_vectors_are_ranked_in_fp32():
    g = torch.Generator().manual_seed(5)
    users = torch.randn(16, 32, generator=g).bfloat16()
    items = torch.randn(301, 32, generator=g).bfloat16()
    targets = torch.randint(1, 301, (16,), generator=g)
    low = rank_targets(users, items, targets)
    wide = rank_targets(users.float(), items.float(), targets)
    assert torch.equal(low["paper"], wide["paper"]) and torch.equal(low["ties"]["paper"], wide["ties"]["paper"])
    # the same scores rounded to bf16 tie massively: what ranking in the model's dtype would have reported
    coarse = rank_targets_from_scores(torch.cat([torch.zeros(16, 1), users.float() @ items[1:].float().T], 1)
                                      .bfloat16(), targets)
    assert coarse["ties"]["paper"].sum() > wide["ties"]["paper"].sum()


def test_nan_scores_never_flatter():
    users, items, targets, history, scores = random_case(0, nan=True)
    ranks = rank_targets_from_scores(scores, targets, history)
    n_items = scores.shape[1] - 1
    assert ranks["paper"][2] == n_items  # NaN target score → miss
    for protocol in ("paper", "filtered"):
        for b in range(len(targets)):
            for rule in TIE_RULES:
                acc = MetricAccumulator(rule=rule)
                acc.add(ranks[protocol][b : b + 1], ranks["ties"][protocol][b : b + 1])
                ref = naive_metrics(scores[b].tolist(), int(targets[b]), history[b][history[b] > 0].tolist(),
                                    protocol, rule=rule)
                assert acc.result()["NDCG@20"] == pytest.approx(ref["NDCG@20"])


def test_ties_count_in_targets_favour():
    scores = torch.tensor([[0.0, 1.0, 1.0, 1.0, 2.0]])  # item 0 is padding
    ranks = rank_targets_from_scores(scores, torch.tensor([2]))
    assert ranks["paper"].item() == 1  # only item 4 is strictly higher
    assert ranks["ties"]["paper"].item() == 2  # items 1 and 3 score like the target
    # expected rule: rank 1, 2 or 3, each with probability 1/3
    assert accumulate(ranks, "paper", "expected", ks=(2,))["Recall@2"] == pytest.approx(1 / 3)
    assert accumulate(ranks, "paper", "optimistic", ks=(2,))["Recall@2"] == 1.0


def test_filtered_ties_exclude_history():
    scores = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0]])
    r = rank_targets_from_scores(scores, torch.tensor([2]), torch.tensor([[0, 1, 3]]))
    assert r["ties"]["paper"].item() == 3 and r["ties"]["filtered"].item() == 1


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
    for p in ("paper", "filtered"):
        assert torch.equal(a[p], b[p]) and torch.equal(a["ties"][p], b["ties"][p])


def test_accumulator_means_over_all_users_including_misses():
    acc = MetricAccumulator(ks=(1,))
    acc.add(torch.tensor([0, 5, 10**6]))
    res = acc.result()
    assert res["Recall@1"] == pytest.approx(1 / 3)
    assert res["Precision@1"] == pytest.approx(1 / 3)


def test_empty_accumulator_gives_nan():
    res = MetricAccumulator().result()
    assert res.pop(USERS) == 0  # the count says why the means are NaN (printed as JSON null)
    assert all(math.isnan(v) for v in res.values())


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
    assert shapes[0] == (8, 8)  # the targets' scores: one users × targets block
    assert max(r * c for r, c in shapes[1:]) <= 8 * 100
    assert sum(c for _, c in shapes[1:]) == 1000  # every item scored exactly once
