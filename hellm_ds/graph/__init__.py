"""Graph structures of METHOD §1 built from data: the UI bipartite operator, the user and item hypergraphs,
kNN, caching — on the kernel package's types (``hellm_kernels.csr.CSR``, ``hellm_kernels.operators``)."""
from hellm_ds.graph.build import GraphConfig, Graphs, build_graphs, load_or_build, product_nnz
from hellm_ds.graph.knn import hyperedges, knn_incidence
from hellm_ds.graph.operators import bipartite_operator, interaction_matrix, item_hypergraph, user_hypergraph
from hellm_kernels.csr import CSR
from hellm_kernels.operators import BipartiteOperator, TwoStageOperator

__all__ = [
    "CSR", "BipartiteOperator", "GraphConfig", "Graphs", "TwoStageOperator", "bipartite_operator",
    "build_graphs", "hyperedges", "interaction_matrix", "item_hypergraph", "knn_incidence", "load_or_build",
    "product_nnz", "user_hypergraph",
]
