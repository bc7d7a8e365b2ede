"""Benchmark a stage-2 fine-tuning step: the project's HeLLM vs a plain HF + peft LoRA loop (a table and JSON).

Both methods train on the SAME synthetic Beauty-shaped batches (history lengths 5–50, mean ≈ 9: 4 + a
geometric draw with p = 0.2, clipped at 50; item ids uniform over ``--items``; ``--batch-size`` rows):

- ``hellm``     the project's HeLLM (``build_hellm``: soft item tokens, graph-conditioned prefix, LoRA on
  gate/up/down, item head). With ``--deepspeed-config FILE`` it is wrapped in a DeepSpeed engine exactly as
  ``hellm_ds.train.finetune`` does (same config loading, ZeRO-3 construction under ``HfDeepSpeedConfig``,
  same AdamW param groups; ``engine(batch)`` → CE → ``engine.backward`` → ``engine.step``); if DeepSpeed
  cannot be used in-process the record says so and the plain-torch path is timed instead. Without the flag:
  plain torch (forward + backward + ``torch.optim.AdamW`` step), no DeepSpeed.
- ``hf_peft``   ``LlamaForCausalLM`` of the same shape (same ``llama_config``) with ``peft`` LoRA r=16 on
  gate/up/down (``--trainable-scope full``: every parameter trains, no LoRA), fed the same number of tokens
  per sample (the prompt's instruction/response tokens + one ordinary token id per history item,
  left-padded), loss = cross-entropy of the last position's hidden state through a Linear head of
  ``--items + 1`` classes, torch AdamW on the trainable parameters. Always plain torch.

Metrics per method: median ms/step over ``--steps`` timed steps after ``--warmup`` (``time.perf_counter``,
CUDA synchronised), samples/s, tokens/s (non-padding prompt tokens), MFU = 6·N_params·tokens/s ÷ peak FLOP/s
(N_params = all parameters incl. frozen; the usual 6N rule — an approximation with LoRA, whose frozen weights
need no weight gradient; ``--peak-tflops``: default 989 = H100 dense bf16 on CUDA, and on CPU a rough value,
default 1.0 TFLOP/s, labelled ``peak_flops_source``), peak memory (CUDA ``max_memory_allocated`` per method;
CPU: the process's max RSS so far, cumulative — the method timed second includes the first's peak), and
``summary.ratio_samples_per_s`` = hellm / hf_peft. Both run in one process, hellm first — except with
``--deepspeed-config``, where hf_peft is timed first so the engine's process group, hooks and threads do
not touch the baseline (``results`` keep the order hellm, hf_peft).

Run (GPU, 7B shape, ZeRO-3 engine)::

    PYTHONPATH=. python launch/bench_finetune.py --model llama-7b-shape --steps 20 --warmup 3 \
        --deepspeed-config ds_configs/zero3.json --out runs/bench/finetune.json

CPU (defaults drop to ``--model tiny --steps 10``; well under a minute)::

    OMP_NUM_THREADS=1 python launch/bench_finetune.py

Options: ``--model tiny|small|llama-7b-shape``, ``--trainable-scope lora|full``, ``--batch-size 8``,
``--steps N``, ``--warmup N``, ``--items 12000``, ``--device auto|cpu|cuda``, ``--dtype auto|bfloat16|float32|
float16`` (auto: bf16 on CUDA, fp32 on CPU), ``--deepspeed-config FILE``, ``--offload-optimizer
auto|cpu_adam|torch`` (with a config that offloads the optimiser, e.g. ``ds_configs/zero3_offload.json``: the
optimiser ``hellm-ds finetune`` builds, ``hellm_ds.train.optim``; ``torch`` avoids DeepSpeedCPUAdam's JIT build),
``--attn-implementation sdpa|eager|flash_attention_2`` (both methods), ``--peak-tflops X``,
``--methods hellm,hf_peft``, ``--seed``, ``--threads N``, ``--out FILE`` (default ``bench_finetune.json``),
``--quiet``.

The JSON has the shape of ``bench_kernels.py``'s: a header (``benchmark``, ``date``, ``device``, ``torch``,
``transformers``, ``peft``, ``deepspeed``, ``config``, ``command``, ``environment`` with the git commit and
load, ...), ``results`` (one record per method: ``name``,
``params``, ``metrics``, ``status`` ``ok|oom|error``, ``note``) and ``summary``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.util
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
# a plain checkout (not installed): its two source roots, the repository (hellm_ds) and kernels/ (hellm_kernels),
# each added only when that package is not importable already
for _name, _src in (("hellm_ds", REPO_ROOT), ("hellm_kernels", REPO_ROOT / "kernels")):
    if importlib.util.find_spec(_name) is None:
        sys.path.append(str(_src))

from hellm_ds.utils.bench import device_name, fmt_cell, max_rss_mb, sync  # noqa: E402

METHODS = ("hellm", "hf_peft")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
H100_BF16_TFLOPS = 989.0
CPU_ROUGH_TFLOPS = 1.0
GRAPH_DIM = SEQ_DIM = 64  # widths of the synthetic stage-1 item tables
LR, BETAS, WD = 3e-4, (0.9, 0.95), 0.1


# ---- data ---------------------------------------------------------------------------------------------
def history_lengths(n: int, rng: np.random.Generator, lo: int = 5, hi: int = 50, p: float = 0.2) -> np.ndarray:
    """Beauty-like history lengths: ``lo − 1 + Geometric(p)`` clipped to [lo, hi]; mean ≈ lo − 1 + 1/p = 9."""
    return np.clip(lo - 1 + rng.geometric(p, size=n), lo, hi)


def make_batches(n_batches: int, batch_size: int, n_items: int, seed: int = 0) -> list[dict]:
    """``n_batches`` collator-shaped batches: ``input_ids`` [B, max n_b] item ids (1..n_items) left-padded with
    0, ``attention_mask``, ``targets`` [B] (uniform items)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        lens = history_lengths(batch_size, rng)
        n = int(lens.max())
        ids = np.zeros((batch_size, n), dtype=np.int64)
        mask = np.zeros((batch_size, n), dtype=np.int64)
        for b, m in enumerate(lens):
            ids[b, n - m:] = rng.integers(1, n_items + 1, size=m)
            mask[b, n - m:] = 1
        out.append({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                    "targets": torch.from_numpy(rng.integers(1, n_items + 1, size=batch_size))})
    return out


def baseline_batch(batch: dict, prompt_ids: torch.Tensor, resp_ids: torch.Tensor, vocab: int) -> dict:
    """The same samples as ordinary token ids: [instruction | one token per history item | response],
    left-padded (pad id 0), with positions counting real tokens from 0 — the same token count per row as
    HeLLM's prompt."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    B, n = ids.shape
    lo = 3  # skip the special ids
    items = torch.where(mask.bool(), lo + (ids - 1) % (vocab - lo), 0)
    Ti, Tr = prompt_ids.numel(), resp_ids.numel()
    L = Ti + n + Tr
    tok = torch.zeros(B, L, dtype=torch.long)
    full = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        m = int(mask[b].sum())
        row = torch.cat([prompt_ids, items[b, n - m:], resp_ids])
        tok[b, L - row.numel():] = row
        full[b, L - row.numel():] = 1
    pos = (full.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": tok, "attention_mask": full, "position_ids": pos, "targets": batch["targets"]}


# ---- helpers -------------------------------------------------------------------------------------------
def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001  (deepspeed may fail to import on odd set-ups)
        return None


def command_line(script, argv):
    from hellm_ds.utils.bench import command_line as _command_line  # imported late (see write_json)

    return _command_line(script, argv)


def write_json(path: Path, header: dict, records: list[dict], summary: dict) -> None:
    from hellm_ds.utils.bench import write_bench_json  # imported late: the script may set up sys.path first

    write_bench_json(path, header, records, summary)


def _param_groups(model: torch.nn.Module) -> list[dict]:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and not n.endswith("bias") else no_decay).append(p)
    return [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}]


def _counts(model: torch.nn.Module) -> tuple[int, int]:
    total = train = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        train += n if p.requires_grad else 0
    return total, train


# ---- the two methods: each returns (step_fn(batch) -> loss float, n_params, n_trainable, note) ---------
def random_item_tables(n_items: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_items + 1, GRAPH_DIM, generator=g) * 0.1,
            torch.randn(n_items + 1, SEQ_DIM, generator=g) * 0.1)


def setup_hellm_plain(args, device, dtype):
    from hellm_ds.llm import HeLLMConfig
    from hellm_ds.llm.model import build_hellm

    cfg = HeLLMConfig(model=args.model, trainable_scope=args.trainable_scope, dtype=_dtype_name(dtype),
                      attn_implementation=args.attn_implementation)
    g, s = random_item_tables(args.items, args.seed)
    # the backbone is created on the device: a 7B random init on the host takes minutes
    model = build_hellm(cfg, g, s, device=device, seed=args.seed, init_context=torch.device(device)).train()
    opt = torch.optim.AdamW(_param_groups(model), lr=LR, betas=BETAS, weight_decay=WD)

    def step(batch):
        loss = model.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    n, t = _counts(model)
    return step, n, t, "plain torch (no DeepSpeed): forward + backward + torch AdamW", model


def setup_hellm_deepspeed(args, device, dtype):
    """The engine as ``hellm_ds.train.finetune.finetune`` builds it (minus data, scheduler, checkpoints)."""
    import deepspeed

    from hellm_ds.train import finetune as ft

    fcfg = ft.FinetuneConfig(data="-", graph_emb="-", seq_emb="-", out="-", model=args.model,
                             deepspeed_config=args.deepspeed_config, micro_batch_size=args.batch_size,
                             grad_accum=1, trainable_scope=args.trainable_scope,
                             dtype="auto" if args.dtype == "auto" else args.dtype, seed=args.seed,
                             attn_implementation=args.attn_implementation)
    from hellm_ds.train.distributed import init_distributed

    _, _, ds_device = init_distributed()
    ds_cfg = ft.load_ds_config(fcfg, ds_device)
    from hellm_ds.train.optim import build_optimizer, offload_optimizer_plan

    ds_cfg, opt_kind = offload_optimizer_plan(ds_cfg, args.offload_optimizer)
    stage = ft.zero_stage(ds_cfg)
    mdtype = ft.model_dtype(fcfg, ds_cfg, ds_device)
    hcfg = fcfg.hellm_config()
    from dataclasses import replace

    hcfg = replace(hcfg, dtype=_dtype_name(mdtype))
    hf_ds_config = None
    if stage == 3:
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        from hellm_ds.train.distributed import preimport_for_zero_init

        preimport_for_zero_init()
        hf_ds_config = HfDeepSpeedConfig(ds_cfg)
    g, s = random_item_tables(args.items, args.seed)
    from hellm_ds.llm.model import build_hellm

    model = build_hellm(hcfg, g, s, seed=args.seed)  # hcfg.dtype is mdtype
    if stage != 3:
        model = model.to(ds_device)
    else:
        for name in ("graph_items", "seq_items", "instruction_ids", "response_ids"):
            setattr(model, name, getattr(model, name).to(ds_device))
    opt = build_optimizer(ft.param_groups(model, WD), opt_kind, LR, BETAS, WD)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    engine.train()

    def step(batch):
        loss = F.cross_entropy(engine(batch), batch["targets"])
        engine.backward(loss)
        engine.step()
        return loss.detach()

    step._keep = hf_ds_config  # HfDeepSpeedConfig is held through a weakref by transformers
    n, t = _counts(engine.module)
    note = (f"DeepSpeed engine, ZeRO-{stage}, {str(mdtype).replace('torch.', '')}, config "
            f"{args.deepspeed_config}, "
            + ("DeepSpeedCPUAdam (ZeRO-Offload)" if opt_kind == "cpu_adam" else "torch AdamW")
            + " wrapped by the engine")
    return step, n, t, note, engine.module


def setup_hf_peft(args, device, dtype, hellm_model=None):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hellm_ds.llm.backbone import build_offline_tokenizer, llama_config
    from hellm_ds.llm.config import INSTRUCTION, MODEL_SIZES, RESPONSE

    tokenizer = build_offline_tokenizer([INSTRUCTION, RESPONSE])
    prompt_ids = torch.tensor(tokenizer(INSTRUCTION, add_special_tokens=True)["input_ids"])
    resp_ids = torch.tensor(tokenizer(RESPONSE, add_special_tokens=False)["input_ids"])
    config = llama_config(MODEL_SIZES[args.model], len(tokenizer), args.attn_implementation)
    torch.manual_seed(args.seed)
    with torch.device(device):  # created on the device in its dtype, as HeLLM's backbone
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    lm_head = lm.lm_head.weight.numel()  # never runs here (the item head does): not counted in MFU
    if args.trainable_scope == "lora":
        # adapters in the base dtype, as HeLLM's (peft's default would keep them in fp32: a slower baseline)
        lm = get_peft_model(lm, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, bias="none",
                                           target_modules=["gate_proj", "up_proj", "down_proj"]),
                            autocast_adapter_dtype=False)
        decoder = lm.base_model.model.model
    else:
        decoder = lm.model
        for p in lm.parameters():
            p.requires_grad_(True)
    head = torch.nn.Linear(config.hidden_size, args.items + 1, dtype=dtype)
    model = torch.nn.ModuleDict({"lm": lm, "head": head}).to(device).train()
    opt = torch.optim.AdamW(_param_groups(model), lr=LR, betas=BETAS, weight_decay=WD)
    vocab = config.vocab_size

    def convert(batch):
        return baseline_batch(batch, prompt_ids, resp_ids, vocab)

    def step(b):
        out = decoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                      position_ids=b["position_ids"], use_cache=False)
        loss = F.cross_entropy(head(out.last_hidden_state[:, -1]).float(), b["targets"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step.convert = convert
    n, t = _counts(model)
    n -= lm_head
    what = ("peft LoRA r16 on gate/up/down, adapters in the base dtype" if args.trainable_scope == "lora"
            else "every parameter trains")
    return step, n, t, f"plain torch: HF LlamaForCausalLM ({what}) + Linear item head, torch AdamW", model


def _dtype_name(dt: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dt]


# ---- timing -------------------------------------------------------------------------------------------
def prompt_token_counts(model_name: str) -> tuple[int, int]:
    """(instruction tokens incl. BOS, response tokens) of the config-built models' offline tokenizer."""
    from hellm_ds.llm.backbone import build_offline_tokenizer
    from hellm_ds.llm.config import INSTRUCTION, RESPONSE

    tk = build_offline_tokenizer([INSTRUCTION, RESPONSE])
    return (len(tk(INSTRUCTION, add_special_tokens=True)["input_ids"]),
            len(tk(RESPONSE, add_special_tokens=False)["input_ids"]))


def run_method(name: str, setup, args, device, dtype, batches, prompt_len: int, peak_flops: float) -> dict:
    params = {"model": args.model, "trainable_scope": args.trainable_scope, "batch_size": args.batch_size,
              "steps": args.steps, "warmup": args.warmup, "dtype": _dtype_name(dtype), "items": args.items}
    rec = {"name": name, "params": params, "metrics": {}, "status": "ok", "note": ""}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        step, n_params, n_train, note, _model = setup(args, device, dtype)
        rec["note"] = note
        convert = getattr(step, "convert", None)
        times, losses, tokens = [], [], []
        for i, batch in enumerate(batches):
            b = convert(batch) if convert else batch
            b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
            sync(device)
            t0 = time.perf_counter()
            loss = step(b)
            loss = float(loss)  # host sync
            sync(device)
            dt = time.perf_counter() - t0
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss} at step {i}")
            if i >= args.warmup:
                times.append(dt)
                losses.append(loss)
                tokens.append(int(batch["attention_mask"].sum()) + prompt_len * batch["input_ids"].shape[0])
        med = statistics.median(times)
        tok_per_step = statistics.mean(tokens)
        tok_s = tok_per_step / med
        rec["metrics"] = {
            "ms_per_step": med * 1e3, "ms_per_step_mean": statistics.mean(times) * 1e3,
            "samples_per_s": args.batch_size / med, "tokens_per_s": tok_s, "tokens_per_step": tok_per_step,
            "n_params": n_params, "n_trainable": n_train,
            "mfu": 6.0 * n_params * tok_s / peak_flops,
            "peak_mem_mb": (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                            else max_rss_mb()),
            "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_max_rss_cumulative",
            "loss_first": losses[0], "loss_last": losses[-1],
        }
        del step, _model
    except torch.cuda.OutOfMemoryError as e:  # type: ignore[attr-defined]
        rec.update(status="oom", note=f"{rec['note']}; OOM: {str(e).splitlines()[0]}")
    except Exception as e:  # noqa: BLE001  (a benchmark records the failure and goes on)
        rec.update(status="error", note=f"{rec['note']}; {type(e).__name__}: {e}"[:500])
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


# ---- command line -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench_finetune.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "small", "llama-7b-shape"), default=None,
                    help="model shape (default: llama-7b-shape on CUDA, tiny on CPU)")
    ap.add_argument("--trainable-scope", choices=("lora", "full"), default="lora")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on CUDA, 10 on CPU)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--items", type=int, default=12000)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--dtype", choices=("auto", *DTYPES), default="auto")
    ap.add_argument("--deepspeed-config", "--deepspeed_config", dest="deepspeed_config", default=None,
                    help="run HeLLM through a DeepSpeed engine with this JSON (e.g. ds_configs/zero3.json)")
    ap.add_argument("--attn-implementation", default="sdpa",
                    help="transformers attention kernel of both methods: sdpa | eager | flash_attention_2 "
                         "(needs flash-attn and a GPU)")
    ap.add_argument("--offload-optimizer", choices=("auto", "cpu_adam", "torch"), default="auto",
                    help="with a config that offloads the optimiser (ds_configs/zero3_offload.json): "
                         "DeepSpeedCPUAdam (auto, cpu_adam: its op is JIT-built on first use, minutes) or "
                         "torch's AdamW on the CPU (torch), as hellm-ds finetune --offload-optimizer")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help=f"peak FLOP/s for MFU (default {H100_BF16_TFLOPS} on CUDA = H100 bf16 dense; "
                         f"{CPU_ROUGH_TFLOPS} on CPU, a rough guess)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default="bench_finetune.json")
    ap.add_argument("--quiet", action="store_true")
    return ap


def table(records: list[dict]) -> str:
    lines = [(f"{'method':<9} {'status':<6} {'ms/step':>9} {'samples/s':>10} {'tokens/s':>10} {'MFU %':>8} "
              f"{'params':>11} {'trainable':>10} {'peak MB':>9}")]
    for r in records:
        m = r["metrics"]
        mfu = m.get("mfu")
        lines.append(f"{r['name']:<9} {r['status']:<6} {fmt_cell(m.get('ms_per_step'), '9.2f')} "
                     f"{fmt_cell(m.get('samples_per_s'), '10.1f')} {fmt_cell(m.get('tokens_per_s'), '10.0f')} "
                     f"{fmt_cell(None if mfu is None else 100 * mfu, '8.4f')} {fmt_cell(m.get('n_params'), '11,d')} "
                     f"{fmt_cell(m.get('n_trainable'), '10,d')} {fmt_cell(m.get('peak_mem_mb'), '9.0f')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    on_cuda = device.type == "cuda"
    if args.model is None:
        args.model = "llama-7b-shape" if on_cuda else "tiny"
    if args.steps is None:
        args.steps = 20 if on_cuda else 10
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.items < 1:
        raise SystemExit("--steps, --batch-size, --items must be ≥ 1 and --warmup ≥ 0")
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if on_cuda else torch.float32)
    if args.peak_tflops is not None:
        peak_tflops, peak_src = args.peak_tflops, "--peak-tflops"
    elif on_cuda:
        peak_tflops, peak_src = H100_BF16_TFLOPS, "default: H100 SXM dense bf16"
    else:
        peak_tflops, peak_src = CPU_ROUGH_TFLOPS, "default: rough CPU guess (not measured)"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHODS)}")

    def log(s: str) -> None:
        if not args.quiet:
            print(s, flush=True)

    batches = make_batches(args.warmup + args.steps, args.batch_size, args.items, args.seed)
    Ti, Tr = prompt_token_counts(args.model)
    header = {
        "benchmark": "finetune", "command": command_line(__file__, argv),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "transformers": _version("transformers"), "peft": _version("peft"),
        "deepspeed": _version("deepspeed") if args.deepspeed_config else None,
        "threads": torch.get_num_threads(), "peak_tflops": peak_tflops, "peak_flops_source": peak_src,
        "config": {k: v for k, v in vars(args).items()},
        "data": {"history_len_mean": float(np.mean([int(m) for b in batches for m in b["attention_mask"].sum(1)])),
                 "prompt_tokens": Ti + Tr, "generator": "4 + Geometric(0.2), clipped to [5, 50]"},
    }
    log(f"# finetune benchmark on {header['device']} (torch {header['torch']}), model {args.model}, "
        f"scope {args.trainable_scope}, batch {args.batch_size}, {args.steps} steps after {args.warmup} warm-up, "
        f"{_dtype_name(dtype)}; MFU vs {peak_tflops} TFLOP/s ({peak_src})")

    records = []
    # with DeepSpeed, time the baseline first: the engine leaves a process group, hooks and threads behind
    order = sorted(methods, key=lambda m: m != "hf_peft") if args.deepspeed_config else methods
    for name in order:
        if name == "hellm":
            rec = None
            if args.deepspeed_config:
                rec = run_method(name, setup_hellm_deepspeed, args, device, dtype, batches, Ti + Tr,
                                 peak_tflops * 1e12)
                if rec["status"] == "error":
                    failed = rec["note"]
                    rec = run_method(name, setup_hellm_plain, args, device, dtype, batches, Ti + Tr,
                                     peak_tflops * 1e12)
                    rec["note"] += f" — DeepSpeed path failed, fell back: {failed}"[:500]
            if rec is None:
                rec = run_method(name, setup_hellm_plain, args, device, dtype, batches, Ti + Tr,
                                 peak_tflops * 1e12)
        else:
            rec = run_method(name, setup_hf_peft, args, device, dtype, batches, Ti + Tr, peak_tflops * 1e12)
        records.append(rec)
        write_json(Path(args.out), header, records, None)  # so far: a run cut short keeps what it measured
    records.sort(key=lambda r: methods.index(r["name"]))
    by = {r["name"]: r for r in records if r["status"] == "ok"}
    summary = {"ratio_samples_per_s": (by["hellm"]["metrics"]["samples_per_s"]
                                       / by["hf_peft"]["metrics"]["samples_per_s"])
               if "hellm" in by and "hf_peft" in by else None}
    log(table(records))
    for r in records:
        log(f"  {r['name']}: {r['status']} — {r['note']}")
    if summary["ratio_samples_per_s"] is not None:
        log(f"hellm / hf_peft samples/s = {summary['ratio_samples_per_s']:.3f}")
    out_path = Path(args.out)
    write_json(out_path, header, records, summary)
    log(f"wrote {out_path}")
    return {**header, "results": records, "summary": summary}


if __name__ == "__main__":
    main()
