"""InfoNCE (METHOD §3) against the naive dense formula, blocked and batch variants."""
import math

import pytest
import torch

from hellm_ds.pretrain.contrastive import info_nce_batch, info_nce_full


def naive(z1, z2, tau):
    """Literally the formula, one node at a time."""
    cos = lambda a, b: (a @ b) / (a.norm() * b.norm())  # noqa: E731
    n = z1.shape[0]
    total = 0.0
    for i in range(n):
        num = math.exp(cos(z1[i], z2[i]) / tau)
        den = sum(math.exp(cos(z1[i], z1[m]) / tau) for m in range(n)) - math.exp(cos(z1[i], z1[i]) / tau)
        den += sum(math.exp(cos(z1[i], z2[m]) / tau) for m in range(n))
        total += -math.log(num / den)
    return total / n


@pytest.mark.parametrize("block", [1, 3, 7, 100])
def test_full_equals_naive_any_block(block):
    g = torch.Generator().manual_seed(block)
    z1 = torch.randn(7, 5, generator=g, dtype=torch.float64)
    z2 = torch.randn(7, 5, generator=g, dtype=torch.float64)
    assert info_nce_full(z1, z2, 0.3, block=block).item() == pytest.approx(naive(z1, z2, 0.3), rel=1e-10)


def test_gradients_match_unblocked_and_checkpointing_is_exact():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ga = torch.autograd.grad(info_nce_full(a, b, 0.5, block=3), (a, b))
    gb = torch.autograd.grad(info_nce_full(a, b, 0.5, block=11), (a, b))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)
    assert torch.autograd.gradcheck(lambda x, y: info_nce_full(x, y, 0.5, block=4), (a, b))


def test_batch_variant_is_full_loss_on_the_batch_nodes():
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(20, 6, generator=g, dtype=torch.float64)
    z2 = torch.randn(20, 6, generator=g, dtype=torch.float64)
    nodes = torch.tensor([3, 5, 5, 17, 3, 0])  # duplicates count once
    ref = naive(z1[[0, 3, 5, 17]], z2[[0, 3, 5, 17]], 0.2)
    assert info_nce_batch(z1, z2, 0.2, nodes).item() == pytest.approx(ref, rel=1e-10)


def test_aligned_views_score_lower_than_random():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(50, 8, generator=g)
    assert info_nce_full(z, z + 0.01 * torch.randn(50, 8, generator=g), 0.2) < info_nce_full(z, torch.randn(50, 8), 0.2)
