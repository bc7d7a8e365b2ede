"""Top-k cosine neighbourhoods in row blocks: brute force agreement, zero vectors, multi-hot."""
import numpy as np
import torch

from hellm_ds.data.dataset import Modality
from hellm_ds.data.readers import MultiHot
from hellm_ds.graph.knn import hyperedges, knn_incidence


def brute(x, k):
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    s = x @ x.T
    np.fill_diagonal(s, np.inf)
    return [set(np.argsort(-row, kind="stable")[:k].tolist()) for row in s]


def rows_of(A):
    return [set(A.indices[A.indptr[i] : A.indptr[i + 1]].tolist()) for i in range(A.shape[0])]


def test_dense_matches_brute_force_any_block():
    x = np.random.default_rng(0).normal(size=(57, 9)).astype(np.float32)
    ref = brute(x.astype(np.float64), 4)
    for block in (5, 16, 1000):
        A = knn_incidence(Modality("m", 9, dense=x), 4, block=block, device="cpu")
        assert rows_of(A) == ref
        assert A.values is None and (A.row_nnz() == 4).all()


def test_zero_vectors_get_only_themselves_and_are_nobodys_neighbour():
    x = np.random.default_rng(1).normal(size=(20, 5)).astype(np.float32)
    x[[3, 11]] = 0
    rows = rows_of(knn_incidence(Modality("m", 5, dense=x), 5, block=7, device="cpu"))
    assert rows[3] == {3} and rows[11] == {11}
    assert all(3 not in r and 11 not in r for i, r in enumerate(rows) if i not in (3, 11))
    assert all(i in r and len(r) == 5 for i, r in enumerate(rows) if i not in (3, 11))


def test_multi_hot_equals_dense_path():
    rng = np.random.default_rng(2)
    n, dim = 40, 12
    dense = (rng.random((n, dim)) < 0.3).astype(np.float32)
    dense[5] = 0
    indptr = np.concatenate([[0], np.cumsum(dense.sum(1).astype(np.int64))])
    indices = np.nonzero(dense)[1].astype(np.int64)
    mh = Modality("attributes", dim, multi_hot=MultiHot(indptr, indices, dim))
    # ties among equal attribute sets make the exact choice arbitrary: compare similarity of the chosen sets
    a = knn_incidence(mh, 6, block=9, device="cpu")
    b = knn_incidence(Modality("d", dim, dense=dense), 6, block=9, device="cpu")
    norm = dense / np.maximum(np.linalg.norm(dense, axis=1, keepdims=True), 1e-30)
    sim = norm @ norm.T
    for i, (ra, rb) in enumerate(zip(rows_of(a), rows_of(b))):
        assert i in ra and len(ra) == len(rb)
        np.testing.assert_allclose(sorted(sim[i, list(ra - {i})]), sorted(sim[i, list(rb - {i})]), atol=1e-6)


def test_hyperedges_stack_modalities():
    x = np.random.default_rng(3).normal(size=(10, 4)).astype(np.float32)
    a = knn_incidence(Modality("a", 4, dense=x), 3, device="cpu")
    b = knn_incidence(Modality("b", 4, dense=-x[::-1].copy()), 2, device="cpu")
    H = hyperedges([a, b])
    assert H.shape == (10, 20) and H.nnz == a.nnz + b.nnz
    torch.testing.assert_close(H.to_dense(), torch.cat([a.to_dense(), b.to_dense()], 1))
