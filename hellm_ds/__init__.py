"""hellm_ds — HeLLM (hypergraph-enhanced LLM recommendation, arXiv 2504.10541) as a DeepSpeed-scaled trainer.

Pipeline, one sub-package per stage: ``data`` → ``graph`` → kernels → ``pretrain`` → ``llm`` → ``train`` →
``eval``. The kernels are their own package, ``hellm_kernels`` (source root: the top-level ``kernels/`` folder,
which is deliberately not a package: a ``kernels`` package there would shadow Hugging Face's ``kernels``
distribution that transformers imports). The command-line tool is ``hellm-ds`` (``python -m hellm_ds``).
"""
from hellm_ds.errors import DataFormatError
from hellm_ds.version import __version__

__all__ = ["DataFormatError", "__version__"]
