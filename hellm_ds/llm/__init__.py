"""Stage 2 (METHOD §5): the HeLLM model around a LLaMA-family causal LM.

- ``config``: ``HeLLMConfig`` (every switch) and ``MODEL_SIZES`` (config-built sizes: tiny, small,
  llama-7b-shape).
- ``backbone``: build/load the decoder and its tokenizer offline, check the module layout, inject LoRA.
- ``prefix``: the Gram-matrix prefix encoder and its per-layer injection through the attention's cache path.
- ``model``: ``HeLLM`` (prompt assembly, soft item tokens, item head, loss, trainable scope) and
  ``build_hellm``.
"""
from hellm_ds.llm.config import MODEL_SIZES, HeLLMConfig, ModelSize
from hellm_ds.llm.model import HeLLM, ItemProjector, build_hellm, load_item_tables
from hellm_ds.llm.prefix import GramPrefixEncoder, PrefixAttention, PrefixMaskCache

__all__ = [
    "MODEL_SIZES",
    "GramPrefixEncoder",
    "HeLLM",
    "HeLLMConfig",
    "ItemProjector",
    "ModelSize",
    "PrefixAttention",
    "PrefixMaskCache",
    "build_hellm",
    "load_item_tables",
]
