"""Stage 1 model: hypergraph pre-training with synergistic contrastive learning (MMHCL, METHOD §3).

Four ID tables E_u^ui, E_i^ui, E_u^h, E_i^h (Xavier init). Per step, over the whole graph:

    u_ui, i_ui = mean_{l=0..K} Â^l [E_u^ui; E_i^ui]           (LightGCN, K = ui_layers)
    u_h = U2U^{L_u} E_u^h,   i_h = I2I^{L_i} E_i^h              (hypergraph views)
    u = u_ui + normalize(u_h),   i = i_ui + normalize(i_h)     (fusion)

    loss = BPR(u, i⁺, i⁻) + λ_reg (‖u‖² + ‖i⁺‖² + ‖i⁻‖²) / (2·batch)
           + λ_i · InfoNCE(i, i_h) + λ_u · InfoNCE(u, u_h)

Propagation goes through ``hellm_kernels`` (Triton on GPU, torch CSR on CPU; backward via the stored
transposes). Without item modalities there is no item hypergraph: i = i_ui and the item InfoNCE is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from hellm_ds.graph.build import Graphs
from hellm_kernels import lightgcn_propagate, propagate
from hellm_ds.pretrain.contrastive import info_nce_batch, info_nce_full

CONTRASTS = ("full", "batch")


@dataclass(frozen=True)
class MMHCLConfig:
    # metadata["help"] is the `hellm-ds pretrain-graph` flag's help text (the flags are made from the fields)
    dim: int = field(default=64, metadata={"help": "embedding size of every ID table"})
    ui_layers: int = field(default=2, metadata={"help": "LightGCN layers K on the user-item graph"})
    user_layers: int = field(default=3, metadata={"help": "user hypergraph (U2U) layers L_u"})
    item_layers: int = field(default=2, metadata={"help": "item hypergraph (I2I) layers L_i"})
    lambda_u: float = field(default=0.03, metadata={"help": "weight λ_u of the user InfoNCE term"})
    lambda_i: float = field(default=0.07, metadata={"help": "weight λ_i of the item InfoNCE term"})
    tau: float = field(default=0.3, metadata={"help": "InfoNCE temperature τ"})
    reg: float = field(default=1e-3, metadata={"help": "L2 regularisation weight λ_reg"})
    contrast: str = field(default="batch", metadata={  # see README
        "help": "InfoNCE negatives: full = all nodes (METHOD), batch = the step's nodes only",
        "choices": CONTRASTS})
    contrast_block: int = field(default=2048, metadata={"help": "query rows per block of the full InfoNCE"})


class MMHCL(nn.Module):
    def __init__(self, graphs: Graphs, cfg: MMHCLConfig, backend: str = "auto"):
        super().__init__()
        if cfg.contrast not in CONTRASTS:
            raise ValueError(f"contrast must be one of {CONTRASTS}, got {cfg.contrast!r}")
        self.cfg, self.backend = cfg, backend
        U, I = graphs.R.shape
        self.user_ui = nn.Parameter(nn.init.xavier_uniform_(torch.empty(U, cfg.dim)))
        self.item_ui = nn.Parameter(nn.init.xavier_uniform_(torch.empty(I, cfg.dim)))
        self.user_h = nn.Parameter(nn.init.xavier_uniform_(torch.empty(U, cfg.dim)))
        self.has_item_graph = graphs.H is not None
        self.item_h = nn.Parameter(nn.init.xavier_uniform_(torch.empty(I, cfg.dim))) if self.has_item_graph else None
        self._graphs = graphs
        self._ops = None

    def _operators(self):
        dev = self.user_ui.device
        if self._ops is None or self._ops[0].R.device != dev:
            g = self._graphs
            self._ops = (g.ui().to(dev), g.u2u().to(dev), g.i2i().to(dev) if self.has_item_graph else None)
        return self._ops

    def forward(self) -> dict[str, torch.Tensor]:
        """All users' and items' fused embeddings, and the hypergraph views the contrast needs."""
        ui, u2u, i2i = self._operators()
        u_ui, i_ui = lightgcn_propagate(ui, self.user_ui, self.item_ui, self.cfg.ui_layers, backend=self.backend)
        u_h = propagate(u2u, self.user_h, self.cfg.user_layers, "last", backend=self.backend)
        out = {"user": u_ui + F.normalize(u_h, dim=1), "user_h": u_h}
        if i2i is not None:
            i_h = propagate(i2i, self.item_h, self.cfg.item_layers, "last", backend=self.backend)
            out.update(item=i_ui + F.normalize(i_h, dim=1), item_h=i_h)
        else:
            out["item"] = i_ui
        return out

    def loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms for one BPR batch; ``pos``/``neg`` are 0-based item rows."""
        cfg = self.cfg
        z = self.forward()
        u, ip, ineg = z["user"][users], z["item"][pos], z["item"][neg]
        bpr = -F.logsigmoid((u * ip).sum(1) - (u * ineg).sum(1)).mean()
        reg = cfg.reg * (u.square().sum() + ip.square().sum() + ineg.square().sum()) / (2 * users.numel())
        if cfg.contrast == "full":
            cl_u = info_nce_full(z["user"], z["user_h"], cfg.tau, cfg.contrast_block)
            cl_i = info_nce_full(z["item"], z["item_h"], cfg.tau, cfg.contrast_block) if "item_h" in z else None
        else:
            cl_u = info_nce_batch(z["user"], z["user_h"], cfg.tau, users)
            cl_i = info_nce_batch(z["item"], z["item_h"], cfg.tau, torch.cat([pos, neg])) if "item_h" in z else None
        total = bpr + reg + cfg.lambda_u * cl_u + (cfg.lambda_i * cl_i if cl_i is not None else 0.0)
        terms = {"loss": total, "bpr": bpr, "reg": reg, "cl_user": cl_u}
        if cl_i is not None:
            terms["cl_item"] = cl_i
        return terms

    @torch.no_grad()
    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused (user [U, d], item [I, d]) for recommendation (scores u · iᵀ) and export."""
        z = self.forward()
        return z["user"], z["item"]
