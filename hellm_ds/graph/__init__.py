"""Graph structures of METHOD §1: the UI bipartite operator, the user and item hypergraphs, kNN, caching."""
from hellm_ds.graph.build import GraphConfig, Graphs, build_graphs, load_or_build, product_nnz
from hellm_ds.graph.csr import CSR
from hellm_ds.graph.knn import hyperedges, knn_incidence
from hellm_ds.graph.operators import (
    BipartiteOperator,
    TwoStageOperator,
    bipartite_operator,
    interaction_matrix,
    item_hypergraph,
    user_hypergraph,
)

__all__ = [
    "CSR", "BipartiteOperator", "GraphConfig", "Graphs", "TwoStageOperator", "bipartite_operator",
    "build_graphs", "hyperedges", "interaction_matrix", "item_hypergraph", "knn_incidence", "load_or_build",
    "product_nnz", "user_hypergraph",
]
