"""The CSR matrix type lives in the kernel package (``hellm_kernels.csr``, the format the kernels compute
on); this module keeps ``hellm_ds.graph.csr`` importable for existing callers."""
from hellm_kernels.csr import INT32_LIMIT, CSR, index_dtype, sparse_csr_tensor

__all__ = ["CSR", "INT32_LIMIT", "index_dtype", "sparse_csr_tensor"]
