"""Synthetic dataset directory with planted structure — the project's embedded default.

Generative story (all vectorised over users, one time step at a time):
- ``n_clusters`` item clusters with centroids in a ``latent_dim`` space; each item = centroid + noise, and a
  Zipf popularity weight (exponent ``zipf``) over a random order, so a few items dominate.
- Each item has a designated successor, another item of its own cluster, giving sequential dependence.
- Each user has 1–3 interest clusters (Dirichlet mixture). A sequence of length 3 + Geometric starts from
  an interest cluster; each next item is, with probability ``p_next``, the successor of the previous item,
  otherwise an item of a cluster drawn from the user's interests, by popularity. Items already in the
  sequence are re-drawn (by popularity, then uniformly in the cluster, then in any cluster).
- Modalities: ``image`` and ``text`` are two noisy random projections of the item latent (so kNN over
  either recovers clusters), ``attributes`` are {cluster category, brand sub-cluster, a random tag}, and
  ``items.tsv`` names each item's category and brand.

The same arguments give the same bytes: one seeded ``numpy`` generator, deterministic file writers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hellm_ds.errors import UsageError
from hellm_ds.utils.io import new_directory


@dataclass(frozen=True)
class SynthConfig:
    users: int = 2000
    items: int = 500
    seed: int = 0
    n_clusters: int = 0  # 0 → about one cluster per 25 items
    latent_dim: int = 16
    zipf: float = 1.0
    p_next: float = 0.5
    mean_extra_len: float = 7.0  # sequence length = 3 + Geometric(1 / (1 + mean_extra_len)) - 1
    max_seq_len: int = 60
    image_dim: int = 32
    text_dim: int = 24
    n_brands_per_cluster: int = 4
    n_tags: int = 20


def _check(cfg: SynthConfig) -> None:
    if cfg.users < 1:
        raise UsageError(f"users must be ≥ 1, got {cfg.users}")
    if cfg.items < 4:
        raise UsageError(f"items must be ≥ 4, got {cfg.items}")
    if not 0 <= cfg.p_next <= 1:
        raise UsageError(f"p_next must be in [0, 1], got {cfg.p_next}")


def generate(cfg: SynthConfig) -> dict:
    """Return the dataset's arrays: sequences (list of int64 arrays), features, attributes, clusters."""
    _check(cfg)
    rng = np.random.default_rng(cfg.seed)
    I = cfg.items
    C = cfg.n_clusters or max(2, min(I // 4, round(I / 25)))
    cluster = rng.integers(0, C, size=I)
    cluster[:C] = np.arange(C)  # every cluster non-empty
    centroids = rng.normal(size=(C, cfg.latent_dim))
    latent = centroids[cluster] + 0.35 * rng.normal(size=(I, cfg.latent_dim))

    ranks = rng.permutation(I) + 1
    pop = 1.0 / ranks.astype(np.float64) ** cfg.zipf

    # items grouped by cluster; per-cluster cumulative popularity for vectorised sampling
    by_cluster = np.argsort(cluster, kind="stable")
    c_start = np.searchsorted(cluster[by_cluster], np.arange(C + 1))
    cum = np.concatenate([[0.0], np.cumsum(pop[by_cluster])])

    def draw_from_clusters(cs: np.ndarray) -> np.ndarray:
        lo, hi = cum[c_start[cs]], cum[c_start[cs + 1]]
        x = lo + rng.random(cs.size) * (hi - lo)
        pos = np.searchsorted(cum, x, side="right") - 1
        pos = np.clip(pos, c_start[cs], c_start[cs + 1] - 1)
        return by_cluster[pos]

    def draw_uniform(cs: np.ndarray) -> np.ndarray:
        n = c_start[cs + 1] - c_start[cs]
        return by_cluster[c_start[cs] + (rng.random(cs.size) * n).astype(np.int64)]

    # successor: another item of the same cluster, uniformly (the next volume of a series, say)
    size = c_start[cluster + 1] - c_start[cluster]
    off = rng.integers(1, np.maximum(size, 2)) % np.maximum(size, 1)
    own = np.empty(I, dtype=np.int64)
    own[by_cluster] = np.arange(I) - c_start[cluster[by_cluster]]
    successor = by_cluster[c_start[cluster] + (own + off) % size]

    U = cfg.users
    n_interests = rng.integers(1, 4, size=U)
    interests = rng.integers(0, C, size=(U, 3))
    weights = rng.dirichlet(np.ones(3), size=U) * (np.arange(3)[None, :] < n_interests[:, None])
    weights /= weights.sum(1, keepdims=True)
    cumw = np.cumsum(weights, 1)
    cumw[:, -1] = 1.0 + 1e-9  # guard against rounding so draws always land on a valid slot

    lengths = np.minimum(2 + rng.geometric(1.0 / (1.0 + cfg.mean_extra_len), size=U), cfg.max_seq_len)
    T = int(lengths.max())
    seq = np.zeros((U, T), dtype=np.int64)
    for t in range(T):
        slot = (rng.random(U)[:, None] > cumw).sum(1)
        fresh = draw_from_clusters(interests[np.arange(U), slot])
        if t == 0:
            nxt = fresh
        else:
            prev = seq[:, t - 1]
            nxt = np.where(rng.random(U) < cfg.p_next, successor[prev], fresh)
            for attempt in range(8):  # real logs rarely repeat an item: re-draw repeats
                again = (seq[:, :t] == nxt[:, None]).any(1)
                if not again.any():
                    break
                # later attempts ignore popularity and then the user's clusters, so long sequences escape
                cs = interests[again, slot[again]] if attempt < 6 else rng.integers(0, C, int(again.sum()))
                nxt[again] = draw_from_clusters(cs) if attempt < 3 else draw_uniform(cs)
        seq[:, t] = nxt
    # The catalogue size is read from the largest id in sequences.txt, so item I must occur somewhere.
    if not (seq[np.arange(T)[None, :] < lengths[:, None]] == I - 1).any():
        seq[0, 0] = I - 1
    sequences = [seq[u, : lengths[u]] + 1 for u in range(U)]  # item ids are 1-based

    image = latent @ rng.normal(size=(cfg.latent_dim, cfg.image_dim)) + 0.5 * rng.normal(size=(I, cfg.image_dim))
    text = latent @ rng.normal(size=(cfg.latent_dim, cfg.text_dim)) + 0.5 * rng.normal(size=(I, cfg.text_dim))
    brand = rng.integers(0, cfg.n_brands_per_cluster, size=I)
    tag = rng.integers(0, cfg.n_tags, size=I)
    attributes = {
        i + 1: [1 + int(cluster[i]), 1 + C + int(cluster[i]) * cfg.n_brands_per_cluster + int(brand[i]),
                1 + C + C * cfg.n_brands_per_cluster + int(tag[i])]
        for i in range(I)
    }
    return {
        "sequences": sequences,
        "image": image.astype(np.float32),
        "text": text.astype(np.float32),
        "attributes": attributes,
        "cluster": cluster,
        "brand": brand,
    }


def write_synthetic(out: str | Path, cfg: SynthConfig, overwrite: bool = False) -> Path:
    """Write a dataset directory (atomically: built in a temporary sibling, then renamed into place)."""
    out = Path(out)
    with new_directory(out, overwrite) as tmp:  # a non-empty out is refused before the generation's work
        data = generate(cfg)
        lines = [f"{u + 1} " + " ".join(map(str, s.tolist())) + "\n" for u, s in enumerate(data["sequences"])]
        (tmp / "sequences.txt").write_text("".join(lines))
        (tmp / "item2attributes.json").write_text(json.dumps({str(k): v for k, v in data["attributes"].items()}))
        (tmp / "features").mkdir()
        np.save(tmp / "features" / "image.npy", data["image"])
        np.save(tmp / "features" / "text.npy", data["text"])
        titles = [
            f"{i + 1}\tSynthetic item {i + 1}. Category {int(c) + 1}. Brand {int(c) + 1}-{int(b) + 1}.\n"
            for i, (c, b) in enumerate(zip(data["cluster"], data["brand"]))
        ]
        (tmp / "items.tsv").write_text("".join(titles))
        (tmp / "SOURCE.md").write_text(
            "# Synthetic dataset (hellm_ds)\n\nGenerated by `hellm-ds synth` with "
            + json.dumps(cfg.__dict__, sort_keys=True)
            + ".\nPlanted structure: item clusters driving sequences and features, Zipf popularity, "
            "item successors.\n"
        )
    return out


def write_random_item_tables(dataset, out_dir: str | Path, graph_dim: int = 8, seq_dim: int = 6,
                             seed: int = 0) -> tuple[Path, Path]:
    """Random stage-1 item tables for ``dataset`` (row 0 = padding = zeros), exported as stage 1 exports
    them (``graph_embeddings`` / ``sequential_item_embeddings`` ``.safetensors``): the inputs of a stage-2
    run that does not need trained ones (tests, drills, timing)."""
    import torch

    from hellm_ds.utils.checkpoint import export_tensors

    g = torch.Generator().manual_seed(seed)
    paths = []
    for name, dim in (("graph_embeddings", graph_dim), ("sequential_item_embeddings", seq_dim)):
        t = torch.randn(dataset.n_items + 1, dim, generator=g)
        t[0] = 0
        paths.append(Path(export_tensors(Path(out_dir) / f"{name}.safetensors", {"item": t}, {},
                                         dataset.fingerprint)))
    return paths[0], paths[1]
