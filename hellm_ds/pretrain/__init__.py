"""Stage 1: hypergraph pre-training (MMHCL) and sequential item embeddings (SASRec)."""
