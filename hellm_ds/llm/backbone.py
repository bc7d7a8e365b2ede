"""The LLM backbone: build (config-built sizes) or load (a local directory), the offline tokenizer, the
module layout HeLLM relies on, and LoRA injection.

Everything here works offline: a size name from ``MODEL_SIZES`` builds a random-init ``LlamaForCausalLM``
from a ``LlamaConfig`` with a word-level tokenizer constructed in code; a directory is read with
``local_files_only=True``. Nothing ever resolves a hub name.

Layout (LLaMA and the cousins that share it: Mistral, Qwen2)::

    causal_lm.model                 the decoder (``LlamaModel``): what HeLLM keeps; the LM head is dropped
      .embed_tokens                 token embeddings (only the prompt's tokens are looked up)
      .layers[i].self_attn          .{q,k,v,o}_proj, .layer_idx  (wrapped by prefix.PrefixAttention)
      .layers[i].mlp                .{gate,up,down}_proj         (LoRA targets by default)
      .norm                         final RMSNorm → the hidden state HeLLM's item head reads

ZeRO-3 note: sizes are read from ``config`` (never from a parameter's ``.shape``, which is empty for a
partitioned parameter) and frozen weights are only ever used through module calls.
"""
from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from hellm_ds.errors import UsageError
from hellm_ds.llm.config import MODEL_SIZES, HeLLMConfig, ModelSize

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3, LLaMA-like names


def build_offline_tokenizer(texts: Iterable[str]):
    """A word-level ``PreTrainedTokenizerFast`` whose vocabulary is ``SPECIAL_TOKENS`` + the words and
    punctuation runs of ``texts`` (sorted, so the same texts give the same ids). Unknown words map to
    ``<unk>``; a single sequence gets ``<s>`` prepended (as LLaMA's tokenizer does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)} - set(SPECIAL_TOKENS))
    vocab = {w: i for i, w in enumerate((*SPECIAL_TOKENS, *words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    bos = vocab["<s>"]
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def llama_config(size: ModelSize, vocab_size: int, attn_implementation: str = "sdpa"):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=size.vocab_size or vocab_size,
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_key_value_heads,
        intermediate_size=size.intermediate_size,
        max_position_embeddings=size.max_position_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = attn_implementation
    return cfg


# a local Hugging Face checkpoint directory: what ``from_pretrained`` reads (checked before it is asked to)
CONFIG_FILE = "config.json"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_OWN_EXPORTS = "hellm_"  # hellm_adapter/hellm_base.safetensors: HeLLM's own exports, not backbone weights


def checkpoint_layout(path: str | Path) -> dict:
    """What the local checkpoint directory ``path`` holds of what ``load_backbone`` reads, without reading
    any weights: ``{"path", "config", "model_type", "weights", "tokenizer", "missing"}`` — ``missing`` lists
    what is absent or unusable (empty: the layout loads). Shared by ``check_model`` and ``hellm-ds doctor``.

    Needed: ``config.json`` (a JSON object); weights (``*.safetensors`` other than HeLLM's own
    ``hellm_*`` exports, or ``pytorch_model*.bin``; every shard a ``*.index.json`` names); a tokenizer
    (``tokenizer.json``, or ``tokenizer.model`` with the sentencepiece package, or ``vocab.json`` +
    ``merges.txt``) — ``tokenizer_config.json`` alone describes a tokenizer but is none."""
    import importlib.util
    import json

    root = Path(path)
    out = {"path": str(root.resolve()), "config": False, "model_type": None, "weights": [], "tokenizer": [],
           "missing": []}
    if not root.is_dir():
        out["missing"].append("the directory itself" if not root.exists() else "a directory (it is a file)")
        return out
    names = sorted(p.name for p in root.iterdir() if p.is_file())
    cfg_path = root / CONFIG_FILE
    if not cfg_path.is_file():
        out["missing"].append(CONFIG_FILE)
    else:
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            out["missing"].append(f"a readable {CONFIG_FILE} ({type(e).__name__}: {str(e)[:120]})")
        else:
            if isinstance(cfg, dict):
                out["config"], out["model_type"] = True, cfg.get("model_type")
            else:
                out["missing"].append(f"a {CONFIG_FILE} holding a JSON object")
    weights = sorted({p.name for pattern in WEIGHT_PATTERNS for p in root.glob(pattern)
                      if p.is_file() and not p.name.startswith(_OWN_EXPORTS)})
    out["weights"] = weights
    if not weights:
        out["missing"].append("model weights (*.safetensors or pytorch_model*.bin)")
    for index in sorted(root.glob("*.index.json")):
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            out["missing"].append(f"a readable {index.name}")
            continue
        absent = sorted(s for s in shards if not (root / s).is_file())
        if absent:
            out["missing"].append(f"the weight shards {index.name} names ({', '.join(absent[:3])}"
                                  f"{', …' if len(absent) > 3 else ''})")
    out["tokenizer"] = [n for n in (*TOKENIZER_FILES, "vocab.json", "merges.txt") if n in names]
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= set(names):
        if "tokenizer.model" not in names:
            out["missing"].append(f"tokenizer files ({' / '.join(TOKENIZER_FILES[:2])}; "
                                  f"{TOKENIZER_FILES[2]} alone is not a tokenizer)")
        elif importlib.util.find_spec("sentencepiece") is None:
            out["missing"].append("tokenizer.json, or the sentencepiece package to read tokenizer.model "
                                  "(pip install sentencepiece)")
    return out


def check_model(model: str) -> str:
    """``model`` checked before anything is built or loaded: a size name of ``MODEL_SIZES`` is returned as is,
    a local checkpoint directory whose layout loads (``checkpoint_layout``) as its resolved path; anything
    else raises one ``UsageError`` naming the directory and everything it lacks."""
    if model in MODEL_SIZES:
        return model
    path = Path(model)
    if not path.exists():
        raise UsageError(
            f"--model {model!r} is neither a size ({', '.join(MODEL_SIZES)}) nor a local checkpoint "
            "directory (hub names are never downloaded)"
        )
    if not path.is_dir():
        raise UsageError(f"--model {path} is a file, not a size or a local checkpoint directory")
    layout = checkpoint_layout(path)
    if layout["missing"]:
        raise UsageError(f"--model {layout['path']}: not a Hugging Face checkpoint directory, it lacks "
                         + "; ".join(layout["missing"]))
    return layout["path"]


def load_backbone(cfg: HeLLMConfig, dtype: torch.dtype, init_context=None):
    """``(decoder, tokenizer)`` for ``cfg.model``: the causal LM's decoder (``causal_lm.model``) in ``dtype``,
    layout-checked. ``init_context`` (e.g. ``deepspeed.zero.Init(...)``) wraps the construction so a ZeRO-3
    run partitions the frozen weights as they are created."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model(cfg.model)  # the layout first: not a tokenizer's error from deep inside transformers
    ctx = init_context if init_context is not None else contextlib.nullcontext()
    if cfg.model in MODEL_SIZES:
        tokenizer = build_offline_tokenizer([cfg.instruction, cfg.response])
        config = llama_config(MODEL_SIZES[cfg.model], len(tokenizer), cfg.attn_implementation)
        with ctx:
            lm = AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation=cfg.attn_implementation
            )
    elif Path(cfg.model).is_dir():
        path = Path(cfg.model)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        with ctx:
            lm = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype=dtype, attn_implementation=cfg.attn_implementation
            )
    else:
        raise UsageError(
            f"--model {cfg.model!r} is neither a size ({', '.join(MODEL_SIZES)}) nor a local checkpoint "
            "directory (hub names are never downloaded)"
        )
    decoder = lm.base_model  # drop the LM head: HeLLM predicts items with its own head
    check_layout(decoder)
    return decoder, tokenizer


def decoder_layers(decoder: nn.Module) -> nn.ModuleList:
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UsageError(f"{type(decoder).__name__} has no `layers` ModuleList: not a LLaMA-family decoder")
    return layers


def check_layout(decoder: nn.Module) -> None:
    """Raise ``UsageError`` unless ``decoder`` has the LLaMA module layout (see the module docstring)."""
    layers = decoder_layers(decoder)
    if not hasattr(decoder, "embed_tokens") or not hasattr(decoder, "config"):
        raise UsageError(f"{type(decoder).__name__} lacks embed_tokens/config: not a LLaMA-family decoder")
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        mlp = getattr(layer, "mlp", None)
        missing = [f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(attn, n)]
        missing += [f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj") if not hasattr(mlp, n)]
        if missing:
            raise UsageError(f"layer {i} of {type(decoder).__name__} lacks {missing}: unsupported layout")


def attention_geometry(decoder: nn.Module) -> tuple[int, int, int, int]:
    """``(hidden_size, n_layers, n_kv_heads, head_dim)`` from the config (ZeRO-3 safe)."""
    c = decoder.config
    n_heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    n_kv = getattr(c, "num_key_value_heads", None) or n_heads
    return c.hidden_size, c.num_hidden_layers, n_kv, head_dim


def cache_kwarg(forward) -> str:
    """The name under which ``forward`` takes the KV cache: ``cache`` (transformers ≥ 5.2x),
    ``past_key_values`` or ``past_key_value`` (older releases)."""
    params = inspect.signature(forward).parameters
    for name in ("cache", "past_key_values", "past_key_value"):
        if name in params:
            return name
    raise UsageError(f"{forward} takes no cache argument: unsupported transformers version")


def inject_lora(decoder: nn.Module, cfg: HeLLMConfig) -> nn.Module:
    """peft LoRA (``cfg.lora_r/alpha/dropout/targets``) injected in place; ``lora_r == 0`` → unchanged.
    Adapter weights take the dtype of the layer they adapt (one dtype for ZeRO-3)."""
    if cfg.lora_r == 0:
        return decoder
    from peft import LoraConfig, inject_adapter_in_model

    lcfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        bias="none",
    )
    try:
        return inject_adapter_in_model(lcfg, decoder)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise UsageError(f"LoRA targets {list(cfg.lora_targets)}: {e}") from None
