"""Merge a fine-tuned HeLLM's LoRA into a full Hugging Face model directory.

    hellm-ds merge-lora --checkpoint OUT --out MERGED [--dtype bfloat16] [--overwrite]

``OUT`` is a fine-tuning run's directory (``hellm_adapter.*``). ``MERGED`` becomes:

- a plain HF causal-LM directory (``config.json``, ``model.safetensors``, tokenizer files) whose decoder
  weights are W + (α/r)·B·A for every LoRA-adapted projection (scope ``full``: the trained backbone too) — it
  loads with ``AutoModelForCausalLM.from_pretrained(MERGED)`` and needs neither peft nor hellm_ds. The LM head
  is the source checkpoint's (HeLLM never uses or trains it; a config-built backbone's is random);
- ``hellm_adapter.safetensors`` + ``hellm_adapter.json`` with HeLLM's own trained parts (projector, prefix
  encoder, item head) and a model config with ``model = "."`` (this directory) and ``lora_r = 0``, so
  ``hellm-ds evaluate --checkpoint MERGED`` / ``recommend`` score exactly like the unmerged run (tested),
  without the per-step LoRA matmuls. ``merged_from`` records the source run's config.

The merge runs in one plain CPU process in fp32 (peft's ``safe_merge`` refuses non-finite results) and the
result is written in the run's dtype (or ``--dtype``). The directory appears complete or not at all (built
beside it, then renamed).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from hellm_ds.errors import UsageError

MERGED_MODEL = "."  # a merged export's backbone is its own directory


def merge_lora_layers(module: nn.Module) -> int:
    """Fold every peft LoRA layer under ``module`` into its base layer and put the base layer back in its
    place; returns how many were merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, sub in list(module.named_modules()):
        if isinstance(sub, LoraLayer):
            sub.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, child, sub.get_base_layer())
            merged += 1
    return merged


def decoder_state_dict(decoder: nn.Module) -> dict[str, torch.Tensor]:
    """The decoder's weights under the plain HF names (the prefix wrapper's ``self_attn.base_layer.`` level
    removed)."""
    return {k.replace("self_attn.base_layer.", "self_attn."): v for k, v in decoder.state_dict().items()}


def merge_lora(checkpoint_dir: str | Path, out_dir: str | Path, dtype: str | None = None,
               overwrite: bool = False) -> dict:
    """Write ``out_dir`` as described in the module docstring; returns a summary dict."""
    from transformers import AutoModelForCausalLM

    from hellm_ds.llm.backbone import llama_config
    from hellm_ds.llm.config import DTYPES, MODEL_SIZES, HeLLMConfig
    from hellm_ds.exports import ADAPTER_NAME, load_adapter, read_adapter_meta, write_adapter
    from hellm_ds.utils.checkpoint import read_metadata

    src, out = Path(checkpoint_dir), Path(out_dir)
    meta = read_adapter_meta(src)
    cfg = HeLLMConfig.from_dict(meta["model"])
    if cfg.lora_r == 0:
        raise UsageError(f"{src} has no LoRA adapters to merge (lora_r = 0)")
    if out.resolve() == src.resolve():
        raise UsageError("--out must differ from --checkpoint")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    out_dtype = DTYPES[dtype] if dtype else cfg.torch_dtype("cpu")
    fingerprint = read_metadata(src / ADAPTER_NAME).get("dataset", meta.get("dataset"))

    model = load_adapter(src, meta=meta).float()  # merge in fp32 (after the SHA-256 checks)
    n_merged = merge_lora_layers(model.backbone)
    decoder_state = decoder_state_dict(model.backbone)
    own = {n: p.detach() for n, p in model.named_parameters()
           if not n.startswith("backbone.")}  # projector, prefix encoder, item head

    # the causal-LM shell whose decoder receives the merged weights (its LM head is the source's)
    if cfg.model in MODEL_SIZES:
        lm = AutoModelForCausalLM.from_config(
            llama_config(MODEL_SIZES[cfg.model], len(model.tokenizer), cfg.attn_implementation),
            dtype=torch.float32)
    else:
        lm = AutoModelForCausalLM.from_pretrained(_source_model_dir(src, cfg.model), local_files_only=True,
                                                  dtype=torch.float32)
    lm.base_model.load_state_dict(decoder_state, strict=True)
    lm = lm.to(out_dtype)

    merged_cfg = replace(cfg, model=MERGED_MODEL, lora_r=0, trainable_scope="lora",
                         dtype={v: k for k, v in DTYPES.items()}[out_dtype])
    new_meta = {**{k: v for k, v in meta.items() if k not in ("model", "base", "dataset")},
                "model": merged_cfg.to_dict(), "base": None,
                "merged_from": {"checkpoint": str(src.resolve()), "model": meta["model"]}}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        lm.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        write_adapter(tmp, {k: v.to(out_dtype) for k, v in own.items()}, new_meta, fingerprint)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "merged_lora_layers": n_merged, "dtype": str(out_dtype).replace("torch.", ""),
            "decoder_parameters": sum(v.numel() for v in decoder_state.values()),
            "hellm_parameters": sum(v.numel() for v in own.values())}


def _source_model_dir(checkpoint_dir: Path, model: str) -> Path:
    path = checkpoint_dir / model if model == MERGED_MODEL else Path(model)
    if not path.is_dir():
        raise UsageError(f"the run's backbone directory {path} is not there (the merge reads its LM head "
                         "and config)")
    return path


def add_cli(sub) -> None:
    p = sub.add_parser("merge-lora", help="fold a fine-tuned run's LoRA into a full HF model directory",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="the fine-tuning run's --out directory")
    p.add_argument("--out", required=True, help="new directory: HF model + HeLLM's own trained parts")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="dtype of the written weights (default: the run's)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=lambda args: merge_lora(args.checkpoint, args.out, args.dtype, args.overwrite))
