"""hellm_ds — HeLLM (hypergraph-enhanced LLM recommendation, arXiv 2504.10541) as a DeepSpeed-scaled trainer.

Pipeline, one sub-package per stage: ``data`` → ``graph`` → ``kernels`` → ``pretrain`` → ``llm`` → ``train``
→ ``eval``. The command-line tool is ``hellm-ds`` (``python -m hellm_ds``).
"""
from pathlib import Path as _Path

from hellm_ds.errors import DataFormatError
from hellm_ds.version import __version__

# setup.py installs the top-level kernels/ folder as hellm_ds.kernels; mirror that mapping when the package is
# used straight from a checkout (PYTHONPATH=., e.g. on a lent GPU machine where nothing is pip-installed).
_repo = _Path(__file__).resolve().parent.parent
if (_repo / "kernels" / "__init__.py").is_file() and str(_repo) not in __path__:
    __path__.append(str(_repo))

__all__ = ["DataFormatError", "__version__"]
