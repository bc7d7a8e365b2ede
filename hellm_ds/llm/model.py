r"""HeLLM, the stage-2 model (METHOD §5): soft item tokens in an instruction prompt, a graph-conditioned
prefix in every layer, a LoRA-adapted LLaMA-family decoder and a trained item head.

For a batch from ``NextItemExamples.collate`` (``input_ids`` [B, n] item ids left-padded with 0,
``attention_mask``, ``targets``)::

    t_j      = W₂ GELU(W₁ [g_{i_j} ‖ s_{i_j}] + b₁) + b₂                   soft item tokens ∈ R^H
    prompt_b = [pad … | emb(instruction) | t_1 … t_{n_b} | emb(response)]   the whole row left-padded
    pos      = cumsum(mask) − 1, clipped at 0                                real tokens count from 0
    prefix   = GramPrefixEncoder(g_{i_1..i_n})     L_p keys/values in every layer (see ``prefix``)
    h_b      = decoder(prompt_b, mask, pos, prefix)[last position]         = ``user_vectors``
    logits   = head(h_b) ∈ R^{I+1}, logits[:, 0] = −∞ (padding)           CE against the target item
             (item_head="tied": logits_i = h_b · t_i + b_i, t_i the item's own soft token)

Per-position objective (``forward`` of a ``SequenceExamples`` batch, which carries ``next_items``): every
history column c predicts i_{c+1} from the prompt position of its own soft token (the last column from the
prompt's last position, as above) — one forward trains every target of a user, as SASRec trains. The
prefix is built from the whole history, so with ``prefix_queries="last"`` only the positions after the last
item attend to it (an additive 4-D mask, ``prefix.prefix_last_mask``) and no position sees an item after it
(``tests/llm/test_per_position.py`` changes a later item and checks every earlier position to the bit).

``prompt="items"`` drops the instruction and response texts: the prompt is the tokenizer's BOS (if any) and
the soft item tokens, and the last item's position predicts. The instruction and response texts are
tokenised once (``instruction`` with the tokenizer's special tokens,
i.e. BOS; ``response`` without). Because padding is masked and positions skip it, a row's logits do not
depend on how much padding the batch adds (tested to 1e-5). ``item_scoring()`` returns ``(item_vectors,
item_bias)`` (``head.weight``/``head.bias``; tied: the projected item table and the bias) that rank exactly
like ``forward`` for ``hellm_ds.eval.evaluator.evaluate``.

Trainable scope (``HeLLMConfig.trainable_scope``):
- ``lora`` (METHOD): LoRA adapters, the projector, the prefix encoder (Gram MLPs, P tables, their RMSNorms —
  the "norms" of METHOD, the authors' ``gnn_*norm``) and the item head. The backbone, its own RMSNorms
  included, is frozen.
- ``full``: every parameter (backbone, LoRA if ``lora_r > 0``, and the above). The frozen stage-1 item
  tables are buffers and never train.

Dtype: every parameter is created in one dtype (``HeLLMConfig.torch_dtype``: bfloat16 on CUDA, float32 on
CPU) — LoRA adapters take their base layer's dtype — so ZeRO-3 partitions a single dtype and keeps the fp32
master copy in the optimiser. The stage-1 item tables are fp32 buffers (not parameters: never partitioned,
never trained); Gram matrices, RMSNorm statistics and the logits/loss are computed in fp32.

ZeRO-3: the backbone's frozen weights are used only through module calls inside their own layer's forward
(``prefix.PrefixAttention`` projects the prefix inside the wrapped attention), sizes come from the config,
and the prompt's token embeddings go through ``embed_tokens(...)``, never ``embed_tokens.weight[...]``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hellm_ds.errors import DataFormatError, UsageError
from hellm_ds.llm.backbone import attention_geometry, cache_kwarg, inject_lora, load_backbone
from hellm_ds.llm.config import HeLLMConfig
from hellm_ds.llm.prefix import (
    PREFIX_KWARG,
    GramPrefixEncoder,
    PrefixMaskCache,
    prefix_attention_mask,
    prefix_last_mask,
    wrap_attention,
)

GRAPH_EMBEDDINGS = "graph_embeddings.safetensors"
SEQUENTIAL_EMBEDDINGS = "sequential_item_embeddings.safetensors"


class ItemProjector(nn.Module):
    """t = W₂ GELU(W₁ x + b₁) + b₂: [g ‖ s] → R^H (the authors' ``gnn_input_item_proj``)."""

    def __init__(self, d_in: int, hidden: int, d_out: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden, dtype=dtype)
        self.fc2 = nn.Linear(hidden, d_out, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x.to(self.fc1.weight.dtype))))

    def functional(self, x: torch.Tensor) -> torch.Tensor:
        """The same map through the weights directly, bypassing module hooks — for use inside
        ``deepspeed.zero.GatheredParameters`` (ZeRO-3's hooks would re-partition mid-context)."""
        w1, b1, w2, b2 = self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
        return F.linear(F.gelu(F.linear(x.to(w1.dtype), w1, b1)), w2, b2)


class TiedItemBias(nn.Module):
    """The tied head's only own parameter: one score offset per item (row 0 = padding)."""

    def __init__(self, n_rows: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(n_rows, dtype=dtype))


class HeLLM(nn.Module):
    """The stage-2 model around a LLaMA-family ``decoder`` (``causal_lm.model``; see ``build_hellm``).

    ``graph_items`` [I+1, d_g] and ``seq_items`` [I+1, d_s] are the frozen stage-1 item tables (row 0 =
    padding); they are non-persistent fp32 buffers (inputs, not weights: never in a checkpoint).
    ``decoder`` is modified in place: LoRA injected, attention modules wrapped for the prefix.
    """

    def __init__(self, cfg: HeLLMConfig, decoder: nn.Module, tokenizer, graph_items: torch.Tensor,
                 seq_items: torch.Tensor, dtype: torch.dtype | None = None):
        super().__init__()
        if graph_items.ndim != 2 or seq_items.ndim != 2 or graph_items.shape[0] != seq_items.shape[0]:
            raise UsageError(f"item tables must be [I+1, d] with the same rows; got graph "
                             f"{tuple(graph_items.shape)}, sequential {tuple(seq_items.shape)}")
        if graph_items.shape[0] < 2:
            raise UsageError("item tables need the padding row and at least one item")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.dtype = dtype or cfg.torch_dtype()
        self.n_items = graph_items.shape[0] - 1
        H, n_layers, n_kv, head_dim = attention_geometry(decoder)
        self.hidden_size, self.n_layers = H, n_layers
        d_g, d_s = graph_items.shape[1], seq_items.shape[1]

        # fp32 (small, replicated, never trained): the Gram matrices see the exported values unrounded
        self.register_buffer("graph_items", graph_items.detach().float(), persistent=False)
        self.register_buffer("seq_items", seq_items.detach().float(), persistent=False)
        if cfg.prompt == "items":  # the tokenizer's own start (BOS, if it adds one) and the items, no text
            instr, resp = tokenizer("", add_special_tokens=True)["input_ids"], []
        else:
            instr = tokenizer(cfg.instruction, add_special_tokens=True)["input_ids"]
            resp = tokenizer(cfg.response, add_special_tokens=False)["input_ids"]
        self.register_buffer("instruction_ids", torch.tensor(instr, dtype=torch.long), persistent=False)
        self.register_buffer("response_ids", torch.tensor(resp, dtype=torch.long), persistent=False)

        self.backbone = inject_lora(decoder, cfg)
        self.projector = ItemProjector(d_g + d_s, cfg.projector_hidden or H, H, dtype=self.dtype)
        self.prefix = None
        if cfg.prefix_on:
            eps = getattr(decoder.config, "rms_norm_eps", 1e-6)
            self.prefix = GramPrefixEncoder(d_g, H, n_layers, n_kv, head_dim, cfg.prefix_len, cfg.prefix_mode,
                                            cfg.gram_hidden, cfg.prefix_dropout, eps, dtype=self.dtype)
            wrap_attention(self.backbone, n_kv, head_dim, project=cfg.prefix_mode == "hidden")
        if cfg.item_head == "tied":
            self.head = TiedItemBias(self.n_items + 1, dtype=self.dtype)
        else:
            self.head = nn.Linear(H, self.n_items + 1, dtype=self.dtype)
        self.sasrec, self.fusion_weight = None, 0.0  # score fusion with the stage-1 SASRec (attach_sasrec)
        self._cache_arg = cache_kwarg(self.backbone.forward)
        if cfg.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(self.backbone, "activation_checkpointing_enable"):  # transformers ≥ 5.2x
                self.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.set_trainable_scope(cfg.trainable_scope)

    # ---- what trains ---------------------------------------------------------------------------------
    def set_trainable_scope(self, scope: str) -> None:
        if scope not in ("lora", "full"):
            raise UsageError(f"trainable_scope must be 'lora' or 'full', got {scope!r}")
        for name, p in self.named_parameters():
            p.requires_grad_(scope == "full" or _is_adapter_param(name))

    def attach_sasrec(self, sasrec: nn.Module, weight: float) -> None:
        """Rank with fused scores HeLLM + ``weight`` · SASRec: ``user_vectors`` becomes [h ‖ weight · u_s] and
        ``item_scoring``'s table [W ‖ s], with u_s the frozen stage-1 SASRec's user vector of the same history
        and s its item table — the ``seq_items`` HeLLM reads (checked to be equal). Training never sees it:
        the trainer picks ``weight`` on validation. ``weight`` 0 ranks exactly like HeLLM alone."""
        check_fusion_table(sasrec, self.seq_items)
        self.sasrec = sasrec.requires_grad_(False).eval()
        self.fusion_weight = float(weight)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.sasrec is not None:
            self.sasrec.eval()  # a frozen input: no dropout
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter by name (detached): LoRA, projector, prefix, head [+ backbone: full].
        Under ZeRO-3 call it inside ``deepspeed.zero.GatheredParameters`` (partitioned tensors are empty)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what ``trainable_state_dict`` wrote; names must match exactly."""
        params = dict(self.named_parameters())
        want = {n for n, p in params.items() if p.requires_grad}
        missing, unknown = sorted(want - set(state)), sorted(set(state) - want)
        if missing or unknown:
            raise UsageError(f"trainable state mismatch: {len(missing)} missing (e.g. {missing[:3]}), "
                             f"{len(unknown)} unexpected (e.g. {unknown[:3]})")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)

    # ---- forward -------------------------------------------------------------------------------------
    def item_tokens(self, input_ids: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """Soft item tokens [B, n, H] (padding positions included; they are never read); ``table`` is the
        whole projected item table when the caller already has it (tied head)."""
        if table is not None:
            return table[input_ids]
        return self.projector(torch.cat([self.graph_items[input_ids], self.seq_items[input_ids]], dim=-1))

    def item_features(self) -> torch.Tensor:
        """Every item's projector input [g ‖ s] — [I+1, d_g + d_s]."""
        return torch.cat([self.graph_items, self.seq_items], dim=-1)

    def item_table(self) -> torch.Tensor:
        """Every item's soft token [I+1, H] (row 0 = padding, masked in the scores)."""
        return self.projector(self.item_features())

    def item_scoring_params(self) -> list[nn.Parameter]:
        """The parameters ``item_scoring`` reads (gather them first under ZeRO-3)."""
        if self.cfg.item_head == "tied":
            return [*self.projector.parameters(), self.head.bias]
        return [self.head.weight, self.head.bias]

    @torch.no_grad()
    def item_scoring(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(item_vectors [I+1, H], item_bias [I+1])`` in fp32, detached copies: scores = u · Wᵀ + b rank
        exactly like ``forward``. Reads parameters directly (no module hooks)."""
        if self.cfg.item_head == "tied":
            W, b = self.projector.functional(self.item_features()).float(), self.head.bias.detach().float()
        else:
            W, b = self.head.weight.detach().float(), self.head.bias.detach().float()
        if self.sasrec is not None:  # [h ‖ w·u_s] · [W ‖ s] = h·W + w · u_s·s
            W = torch.cat([W, self.seq_items.float()], dim=1)
        return W.clone(), b.clone()

    def assemble(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 table: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(inputs_embeds [B, L, H], mask [B, L], position_ids [B, L])`` of the prompt, L = T_i + n + T_r;
        row b is left-padded by n − n_b (n_b = its unmasked items, kept in order wherever they sit)."""
        input_ids, mask = left_align(input_ids, attention_mask)
        B, n = input_ids.shape
        pad = (n - mask.sum(1))[:, None]  # [B, 1]
        Ti, Tr = self.instruction_ids.numel(), self.response_ids.numel()
        L = Ti + n + Tr
        prompt = self.backbone.get_input_embeddings()(torch.cat([self.instruction_ids, self.response_ids]))
        instr, resp = prompt[:Ti], prompt[Ti:]
        soft = self.item_tokens(input_ids, table)
        H = soft.shape[-1]
        # source rows per batch row: [zero | instruction | the n (padded) soft tokens | response]
        src = torch.cat([soft.new_zeros(B, 1, H), instr.expand(B, Ti, H), soft, resp.expand(B, Tr, H)], dim=1)
        j = torch.arange(L, device=input_ids.device)[None, :]
        # padding → row 0; instruction token t at j = pad + t → row 1 + t; soft token of column c
        # (c ≥ pad) at j = Ti + c → row 1 + Ti + c = 1 + j; response token at j = Ti + n + t → 1 + j
        idx = torch.where(j < pad, 0, torch.where(j < pad + Ti, 1 + j - pad, 1 + j))
        embeds = src[torch.arange(B, device=src.device)[:, None], idx]
        full_mask = (j >= pad).to(torch.long)
        position_ids = (full_mask.cumsum(1) - 1).clamp(min=0)
        return embeds, full_mask, position_ids

    def hidden_states(self, batch: dict, table: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states [B, L, H] of the prompt (after the decoder's final norm) and its mask."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]  # Gram: order-free
        embeds, mask, position_ids = self.assemble(input_ids, attention_mask, table)
        kwargs = {}
        mask2d = mask
        if self.prefix is not None:
            kwargs[PREFIX_KWARG] = self.prefix(self.graph_items[input_ids], attention_mask)
            kwargs[self._cache_arg] = PrefixMaskCache(self.cfg.prefix_len, self.n_layers)
            if self.cfg.prefix_queries == "last":  # only the positions after the last item see the prefix
                mask2d = prefix_last_mask(mask, self.cfg.prefix_len, max(1, self.response_ids.numel()),
                                          embeds.dtype)
            else:
                mask2d = prefix_attention_mask(mask, self.cfg.prefix_len)
        out = self.backbone(inputs_embeds=embeds, attention_mask=mask2d, position_ids=position_ids,
                            use_cache=False, **kwargs)
        return out.last_hidden_state, mask

    def user_vectors(self, batch: dict, table: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden state of the last position [B, H] (fused: [h ‖ w · u_s], see ``attach_sasrec``):
        scores = u · Wᵀ + b (``item_scoring``)."""
        h = self.hidden_states(batch, table)[0][:, -1]
        if self.sasrec is None:
            return h
        return torch.cat([h.float(), self.fusion_weight * self.sasrec_user_vectors(batch)], dim=-1)

    def sasrec_user_vectors(self, batch: dict) -> torch.Tensor:
        """The attached SASRec's user vectors [B, d_s] (fp32) of the batch's histories."""
        return sasrec_user_vectors(self.sasrec, batch)

    def position_states(self, batch: dict, table: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden state that predicts the item after each history column, for the columns that have one
        (``batch["next_items"]`` > 0), in row-major order of the left-aligned batch — [N, H]. Column c < n − 1
        reads its own soft token's position (Tᵢ + c), the last column the prompt's last position (as
        ``user_vectors``). Needs ``prefix_queries="last"`` (or no prefix): otherwise every position sees the
        prefix built from the whole history, i.e. the items it is asked to predict."""
        if self.prefix is not None and self.cfg.prefix_queries != "last":
            raise UsageError("the per-position objective needs prefix_queries='last' (or no prefix): with "
                             "'all', position t sees the prefix of the whole history, items after t included")
        h, _ = self.hidden_states(batch, table)
        n = batch["input_ids"].shape[1]
        Ti = self.instruction_ids.numel()
        cols = torch.arange(n, device=h.device)
        rows = torch.where(cols < n - 1, Ti + cols, h.shape[1] - 1)  # prompt position of each column
        return h[:, rows][self.position_targets(batch) > 0]

    def _scores(self, states: torch.Tensor, table: torch.Tensor | None) -> torch.Tensor:
        """HeLLM's own item logits (fp32) of hidden states [N, H]."""
        if self.cfg.item_head == "tied":
            return (states @ table.T + self.head.bias).float()
        return self.head(states).float()

    @staticmethod
    def position_targets(batch: dict) -> torch.Tensor:
        """``batch["next_items"]`` [B, n] left-aligned like the prompt (0 = no target), as ``position_states``
        and ``forward`` order them: ``forward(batch)``'s rows are its non-zero entries, row-major."""
        return left_align(batch["next_items"], batch["attention_mask"])[0]

    def forward(self, batch: dict) -> torch.Tensor:
        """Item logits in fp32, column 0 (padding) −∞: [B, n_items + 1] for the last position, or, for a
        per-position batch (with ``next_items``), [N, n_items + 1] for every position that has a next item
        (targets: ``position_targets(batch)[position_targets(batch) > 0]``)."""
        per_position = "next_items" in batch
        table = self.item_table() if self.cfg.item_head == "tied" else None  # serves the prompt and the scores
        if per_position:
            logits = self._scores(self.position_states(batch, table), table)
        else:
            logits = self._scores(self.hidden_states(batch, table)[0][:, -1], table)
        pad_col = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        pad_col[0] = True
        return logits.masked_fill(pad_col, float("-inf"))

    def loss(self, batch: dict) -> torch.Tensor:
        """``next_item_loss(self(batch), batch)``."""
        return next_item_loss(self(batch), batch)


def next_item_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of ``HeLLM.forward(batch)``'s logits against their targets: ``batch["targets"]``,
    or every position's next item for a per-position batch (``next_items``)."""
    if "next_items" in batch:
        nxt = HeLLM.position_targets(batch)
        return F.cross_entropy(logits, nxt[nxt > 0])
    return F.cross_entropy(logits, batch["targets"])


def check_fusion_table(sasrec: nn.Module, seq_items: torch.Tensor) -> None:
    """A SASRec fused with HeLLM must be the model whose item table HeLLM reads (``seq_items``): the fused
    scores use that table as the SASRec's output layer."""
    table = sasrec.item_embeddings().detach().float().cpu()
    if table.shape != seq_items.shape or not torch.equal(table, seq_items.detach().float().cpu()):
        raise UsageError(f"the SASRec model's item table ({tuple(table.shape)}) is not the sequential item "
                         f"table HeLLM reads ({tuple(seq_items.shape)}): fuse the model of the same "
                         "pretrain-seq run")


def sasrec_user_vectors(sasrec: nn.Module, batch: dict) -> torch.Tensor:
    """A (frozen) SASRec's user vectors [B, d_s] (fp32, no gradient) of a batch's histories, any padding."""
    ids, _ = left_align(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        return sasrec(ids)[:, -1].float()


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's unmasked entries (in order) to the right end: any padding becomes left padding.
    A no-op on the collator's left-padded batches; no host sync."""
    mask = attention_mask.to(torch.long)
    cols = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    order = torch.where(mask.bool(), cols, -1).sort(dim=1, stable=True).indices
    return input_ids.gather(1, order), mask.gather(1, order)


def _is_adapter_param(name: str) -> bool:
    """Trainable in scope ``lora``: peft adapters, projector, prefix encoder, item head."""
    return ".lora_" in name or name.split(".", 1)[0] in ("projector", "prefix", "head")


def load_item_tables(run_dir: str | Path, n_items: int | None = None,
                     dataset=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The stage-1 exports of ``run_dir``: graph ``item`` [I+1, d_g] and SASRec ``item`` [I+1, d_s], read by
    ``hellm_ds.exports.read_item_table`` (tensor SHA-256, shape; with ``dataset``, also made from it — and
    ``n_items`` defaults to its catalogue size)."""
    from hellm_ds.exports import read_item_table  # the one stage-1 reader (it imports this module lazily)

    run_dir = Path(run_dir)
    if dataset is not None and n_items is None:
        n_items = dataset.n_items
    g = read_item_table(run_dir / GRAPH_EMBEDDINGS, dataset, n_items)
    s = read_item_table(run_dir / SEQUENTIAL_EMBEDDINGS, dataset, n_items)
    if g.shape[0] != s.shape[0]:
        raise DataFormatError(run_dir / SEQUENTIAL_EMBEDDINGS, None, f"{s.shape[0]} item rows, but "
                              f"{GRAPH_EMBEDDINGS} has {g.shape[0]}")
    return g, s


def build_hellm(cfg: HeLLMConfig, graph_items: torch.Tensor, seq_items: torch.Tensor,
                device: torch.device | str | None = None, seed: int | None = None,
                init_context=None) -> HeLLM:
    """Backbone (built or loaded, see ``backbone.load_backbone``) + LoRA + prefix + heads, in
    ``cfg.torch_dtype(device)``. ``seed`` makes the random initialisation reproducible without touching the
    caller's RNG state: the backbone is built after ``manual_seed(seed)``, HeLLM's own parameters after
    ``manual_seed(seed + 1)`` (as ``hellm_ds.train.finetune`` does), so they do not depend on the backbone
    build.

    ``init_context`` (e.g. ``deepspeed.zero.Init(...)`` for a config-built backbone) wraps the *backbone's*
    construction only: HeLLM's own parameters (LoRA, projector, prefix, head) are created whole, so their
    initialisation (peft zeroes ``lora_B``) is not lost on empty partitioned tensors; a ZeRO-3 engine
    partitions them when it wraps the model."""
    dtype = cfg.torch_dtype(device)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        decoder, tokenizer = load_backbone(cfg, dtype, init_context=init_context)
        if seed is not None:
            # HeLLM's own parameters (LoRA, projector, prefix, head) depend on ``seed`` only, not on how many
            # random numbers the backbone's construction consumed (ZeRO-3's partitioned build differs)
            torch.manual_seed(seed + 1)
        model = HeLLM(cfg, decoder, tokenizer, graph_items, seq_items, dtype=dtype)
    return model if device is None else model.to(device)
