"""Configuration of the stage-2 model (METHOD §5): one flat dataclass, plus the table of config-built sizes.

``HeLLMConfig`` holds every switch of the model; nothing else in ``hellm_ds.llm`` has defaults of its own::

    cfg = HeLLMConfig(model="tiny")                         # random-init LLaMA from MODEL_SIZES["tiny"]
    cfg = HeLLMConfig(model="/ckpt/Llama-2-7b-hf")          # a local HF checkpoint directory (never the hub)
    cfg = HeLLMConfig(prefix_mode="off")                    # ablation: no graph-conditioned prefix
    cfg = HeLLMConfig(trainable_scope="full", dtype="bfloat16")

Fields (defaults = METHOD §5 / the authors' values):

- ``model``: a name in ``MODEL_SIZES`` (a random-init ``LlamaForCausalLM`` built from a ``LlamaConfig``, with
  the offline word-level tokenizer of ``backbone.build_offline_tokenizer``) or a local checkpoint directory of
  a LLaMA-family causal LM (LLaMA, Mistral, Qwen2: ``model.layers[i].self_attn.{q,k,v,o}_proj``,
  ``mlp.{gate,up,down}_proj``).
- ``attn_implementation``: ``sdpa`` | ``eager`` | ``flash_attention_2`` | … (passed to transformers).
- ``dtype``: ``auto`` (bfloat16 on CUDA, float32 on CPU) | ``bfloat16`` | ``float32`` | ``float16``. Every
  parameter of the model, trainable or frozen, is created in this one dtype (ZeRO-3 partitions parameters of
  one dtype; the fp32 master copy lives in the optimiser).
- ``prefix_len`` L_p, ``prefix_mode``: ``hidden`` (METHOD: norm(P_k[ℓ] + k) through the layer's own frozen
  ``k_proj``/``v_proj``, inside the layer), ``kv`` (per-layer, per-kv-head prefix keys/values learned directly
  in key/value space; the Gram context is mapped to key/value width), ``off`` (ablation: no prefix).
- ``gram_hidden``: hidden width of the Gram MLPs d²→gram_hidden→out (None = H), ``prefix_dropout`` (0.3).
- ``projector_hidden``: hidden width of the soft-token projector [g‖s]→hidden→H (None = H).
- ``lora_r`` (0 = no LoRA), ``lora_alpha``, ``lora_dropout``, ``lora_targets`` (module-name suffixes).
- ``item_head``: ``linear`` (METHOD: a trained Linear(H → I+1) on the last hidden state) | ``tied`` (hellm_ds:
  scores = u · t_i + b_i with t_i the item's own soft token from the projector — the output side shares the
  input side's weights, as SASRec ties its embedding table; the head then starts from the stage-1 item
  geometry instead of a random I×H matrix, and only a bias of I+1 is added).
- ``trainable_scope``: ``lora`` (METHOD: LoRA + projector + prefix encoder + head train, the backbone is
  frozen) | ``full`` (the backbone trains too).
- ``prompt``: ``method`` (METHOD: ``instruction`` + the soft item tokens + ``response``) | ``items`` (only
  the tokenizer's BOS and the soft item tokens: the last item's position is the one that predicts; the
  English text is noise to a randomly initialised backbone and doubles the sequence).
- ``instruction`` / ``response``: the prompt text around the soft item tokens (tokenised once; ``method``).
- ``prefix_queries``: which prompt positions attend to the prefix. ``all`` (METHOD: every query sees it) |
  ``last`` (only the positions after the last history item — the response, or the last item's own position
  with ``prompt="items"``). ``last`` is what the per-position objective needs: the prefix is built from the
  whole history, so a position that predicts item t+1 must not see it (``HeLLM.hidden_states``).
- ``gradient_checkpointing``: HF activation checkpointing of the decoder layers (non-reentrant).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch

from hellm_ds.errors import UsageError

PrefixMode = Literal["hidden", "kv", "off"]
TrainableScope = Literal["lora", "full"]

PREFIX_MODES = ("hidden", "kv", "off")
TRAINABLE_SCOPES = ("lora", "full")
ITEM_HEADS = ("linear", "tied")
PROMPTS = ("method", "items")
PREFIX_QUERIES = ("all", "last")
# transformers' attention kernels the CLI offers (the prefix injection works under each; see prefix.py)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}

# METHOD §5: an Alpaca-style template; the soft item tokens go between the two texts.
INSTRUCTION = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nGiven the user's purchase history, predict next possible item to be purchased.\n\n"
    "### Input:\n"
)
RESPONSE = "\n\n### Response:\n"


@dataclass(frozen=True)
class ModelSize:
    """Shape of a config-built LLaMA. ``vocab_size`` None = the offline tokenizer's vocabulary."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int | None = None
    max_position_embeddings: int = 2048


MODEL_SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(64, 2, 4, 2, 128, max_position_embeddings=512),  # unit tests
    "small": ModelSize(256, 4, 8, 4, 688, max_position_embeddings=1024),  # trains on a CPU in minutes
    "llama-7b-shape": ModelSize(4096, 32, 32, 32, 11008, vocab_size=32000, max_position_embeddings=4096),
}

AUTO = "auto"


def is_config_built(model: str) -> bool:
    """True for a size name of ``MODEL_SIZES`` (a randomly initialised backbone built from a ``LlamaConfig``),
    False for a local checkpoint directory (pre-trained weights)."""
    return model in MODEL_SIZES


def resolve_scope_and_head(model: str, trainable_scope: str = AUTO, item_head: str = AUTO,
                           warn: bool = True) -> tuple[str, str]:
    """The one rule for what trains and how items are scored, shared by every entry point (``hellm-ds
    finetune``, ``launch/finetune.py`` and ``python -m hellm_ds.train`` through ``FinetuneConfig``, ``hellm-ds
    pipeline``): ``auto`` resolves to scope ``full`` and the ``tied`` head for a config-built backbone (its
    weights are random: LoRA would adapt noise, and a random I×H head starts from nothing where the tied
    head starts from the stage-1 item geometry), and to METHOD's ``lora`` scope and ``linear`` head for a
    checkpoint directory. An explicit value is kept; an explicit ``lora`` on a config-built backbone prints
    one warning on stderr (``warn``) saying why it is not sensible."""
    if trainable_scope != AUTO and trainable_scope not in TRAINABLE_SCOPES:
        raise UsageError(
            f"trainable_scope must be {AUTO!r} or one of {TRAINABLE_SCOPES}, got {trainable_scope!r}")
    if item_head != AUTO and item_head not in ITEM_HEADS:
        raise UsageError(f"item_head must be {AUTO!r} or one of {ITEM_HEADS}, got {item_head!r}")
    built = is_config_built(model)
    scope = trainable_scope if trainable_scope != AUTO else ("full" if built else "lora")
    head = item_head if item_head != AUTO else ("tied" if built else "linear")
    if warn and built and trainable_scope == "lora":
        import sys

        print(f"hellm-ds: warning: --trainable-scope lora on the config-built backbone {model!r}: its "
              "weights are random, not pre-trained, so freezing it and adapting it with LoRA trains around "
              "noise; scope full (the default for a size name) trains the backbone itself", file=sys.stderr,
              flush=True)
    return scope, head


OBJECTIVES = ("last", "all")


def resolve_objective(model: str, objective: str = AUTO, prompt: str = AUTO, prefix_queries: str = AUTO,
                      prefix_mode: str = "hidden") -> tuple[str, str, str]:
    """The one rule for the training objective and the prompt, shared like ``resolve_scope_and_head``:
    ``(objective, prompt, prefix_queries)``. ``auto`` is, for a config-built backbone, the per-position
    objective (``all``: every history position predicts its next item in one forward) on the ``items``
    prompt, and for a checkpoint directory METHOD's (``last``: the last position predicts the target; the
    ``method`` instruction prompt). ``prefix_queries`` ``auto`` is ``last`` under the per-position objective
    (a position must not see the prefix built from items after it) and METHOD's ``all`` otherwise; an
    explicit ``all`` with the per-position objective and a prefix is refused."""
    for name, value, choices in (("objective", objective, OBJECTIVES), ("prompt", prompt, PROMPTS),
                                 ("prefix_queries", prefix_queries, PREFIX_QUERIES)):
        if value != AUTO and value not in choices:
            raise UsageError(f"{name} must be {AUTO!r} or one of {choices}, got {value!r}")
    built = is_config_built(model)
    objective = objective if objective != AUTO else ("all" if built else "last")
    prompt = prompt if prompt != AUTO else ("items" if built else "method")
    prefix_queries = prefix_queries if prefix_queries != AUTO else ("last" if objective == "all" else "all")
    if objective == "all" and prefix_queries == "all" and prefix_mode != "off":
        raise UsageError("the per-position objective (objective 'all') with prefix_queries 'all' would let "
                         "every position see the prefix built from the whole history, i.e. the items it "
                         "predicts: use prefix_queries 'last' (or auto)")
    return objective, prompt, prefix_queries


@dataclass(frozen=True)
class HeLLMConfig:
    model: str = "tiny"
    attn_implementation: str = "sdpa"
    dtype: str = "auto"
    # graph-conditioned prefix
    prefix_len: int = 10
    prefix_mode: PrefixMode = "hidden"
    gram_hidden: int | None = None
    prefix_dropout: float = 0.3
    # soft item tokens
    projector_hidden: int | None = None
    # LoRA
    lora_r: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    # item scores
    item_head: str = "linear"
    # what trains
    trainable_scope: TrainableScope = "lora"
    # prompt
    prompt: str = "method"
    instruction: str = INSTRUCTION
    response: str = RESPONSE
    prefix_queries: str = "all"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if isinstance(self.lora_targets, (list, str)):  # from JSON / CLI
            targets = (self.lora_targets,) if isinstance(self.lora_targets, str) else tuple(self.lora_targets)
            object.__setattr__(self, "lora_targets", targets)
        if self.prefix_mode not in PREFIX_MODES:
            raise UsageError(f"prefix_mode must be one of {PREFIX_MODES}, got {self.prefix_mode!r}")
        if self.trainable_scope not in TRAINABLE_SCOPES:
            raise UsageError(
                f"trainable_scope must be one of {TRAINABLE_SCOPES}, got {self.trainable_scope!r}")
        if self.item_head not in ITEM_HEADS:
            raise UsageError(f"item_head must be one of {ITEM_HEADS}, got {self.item_head!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise UsageError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.prefix_mode != "off" and self.prefix_len < 1:
            raise UsageError(
                f"prefix_len must be ≥ 1 with prefix_mode={self.prefix_mode!r}, got {self.prefix_len}")
        if self.lora_r < 0:
            raise UsageError(f"lora_r must be ≥ 0 (0 = no LoRA), got {self.lora_r}")
        if self.lora_r > 0 and not self.lora_targets:
            raise UsageError("lora_targets is empty; set lora_r=0 for no LoRA")
        for name in ("prefix_dropout", "lora_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UsageError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("gram_hidden", "projector_hidden"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"{name} must be ≥ 1 or None, got {getattr(self, name)}")
        if self.prompt not in PROMPTS:
            raise UsageError(f"prompt must be one of {PROMPTS}, got {self.prompt!r}")
        if self.prompt == "method" and (not self.instruction.strip() or not self.response.strip()):
            raise UsageError("instruction and response texts must not be empty")
        if self.prefix_queries not in PREFIX_QUERIES:
            raise UsageError(f"prefix_queries must be one of {PREFIX_QUERIES}, got {self.prefix_queries!r}")
        if self.prefix_queries == "last" and self.prefix_on and self.attn_implementation not in ("sdpa", "eager"):
            # flash attention takes a 2-D padding mask, flex a BlockMask: the per-query prefix mask is an
            # additive 4-D tensor, which sdpa and eager take as is
            raise UsageError(f"prefix_queries='last' needs an additive 4-D attention mask, which "
                             f"{self.attn_implementation} does not take: use sdpa or eager")

    @property
    def prefix_on(self) -> bool:
        return self.prefix_mode != "off"

    def torch_dtype(self, device: torch.device | str | None = None) -> torch.dtype:
        """The one parameter dtype: ``auto`` = bfloat16 on CUDA, float32 elsewhere."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HeLLMConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UsageError(f"unknown HeLLMConfig field(s) {unknown}")
        return cls(**d)
