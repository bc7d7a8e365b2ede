"""``hellm-ds`` — the command-line tool. Every subcommand prints one JSON object on stdout; progress and
messages go to stderr. Bad input exits with status 2 and one line naming the file, line and value.

    hellm-ds synth --out DIR [--users N --items M --seed S]
    hellm-ds stats --data DIR
    hellm-ds import --format csv|parquet|recbole|amazon --input FILE --out DIR [--k-core 5]   (your own logs)
    hellm-ds baseline popularity --data DIR
    hellm-ds build-graphs --data DIR --out DIR [--knn-k 10] [--modalities image,text]
    hellm-ds pretrain-graph --data DIR --out DIR [--preset toys] [--epochs N] [--time-budget SECONDS]
    hellm-ds pretrain-seq --data DIR --out DIR [--epochs N] [--time-budget SECONDS]
    hellm-ds finetune --data DIR --graph-emb FILE --seq-emb FILE --out OUT [...]   (one process)
    hellm-ds evaluate --checkpoint OUT --data DIR [--splits valid,test] [--batch-size N] [--per-user FILE]
    hellm-ds pipeline --data DIR --out OUT [--model tiny|PATH] [--ranks N] [--redo STAGE]   (every stage)
    hellm-ds recommend --checkpoint OUT --data DIR --users 1,2,3 [--k 10] [--exclude-history] [--users-file F]
    hellm-ds merge-lora --checkpoint OUT --out MERGED [--dtype bfloat16]
    hellm-ds encode-text --data DIR [--model PATH] [--out-name text] [--max-length 128] [--overwrite]
    hellm-ds report [--results results] [--readme README.md] [--check]   (README tables from result files)
    hellm-ds plot --run DIR [--out DIR/plots] [--metrics Recall@10,NDCG@10]   (PNG curves of DIR/log.jsonl)
    hellm-ds cuda-compile [--arch 90 --arch 80]   (the Triton kernels compiled for those GPUs, no GPU needed)
    hellm-ds doctor   (checks of this installation and machine)

`hellm-ds --help` lists the subcommands from ``COMMANDS`` without importing them; `hellm-ds SUB ...` imports
only SUB's module.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import fields
from typing import Callable, Iterable, Sequence

from hellm_ds.errors import DataFormatError, UsageError
from hellm_ds.utils.cli_args import ArgumentParser, add_ties_arg, csv_choices, device_arg
from hellm_ds.utils.io import strict_json
from hellm_ds.version import __version__


def _print_json(obj) -> None:
    json.dump(strict_json(obj), sys.stdout, indent=2, allow_nan=False)  # NaN → null
    sys.stdout.write("\n")
    sys.stdout.flush()


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset directory (sequences.txt, …)")
    p.add_argument("--max-len", type=int, default=50, help="keep each user's last N items")


def cmd_synth(args) -> dict:
    from hellm_ds.data.synth import SynthConfig, write_synthetic
    from hellm_ds.data.dataset import load_dataset

    cfg = SynthConfig(**{f.name: getattr(args, f.name) for f in fields(SynthConfig) if hasattr(args, f.name)})
    out = write_synthetic(args.out, cfg, overwrite=args.overwrite)
    print(f"wrote {out}", file=sys.stderr)
    return {"out": str(out), **load_dataset(out).stats()}


def cmd_stats(args) -> dict:
    from hellm_ds.data.dataset import load_dataset

    return load_dataset(args.data, max_len=args.max_len).stats()


def cmd_baseline_popularity(args) -> dict:
    from hellm_ds.baselines.popularity import evaluate_popularity
    from hellm_ds.data.dataset import load_dataset

    ds = load_dataset(args.data, max_len=args.max_len)
    ds.require_eval_users()  # exit 2 with a clear message rather than NaN metrics
    return evaluate_popularity(ds, batch_size=args.batch_size, progress=not args.quiet, ties=args.ties)


def cmd_build_graphs(args) -> dict:
    import time

    from hellm_ds.data.dataset import load_dataset
    from hellm_ds.graph.build import GraphConfig, cache_key, load_or_build

    ds = load_dataset(args.data, max_len=args.max_len)
    mods = None if args.modalities is None else tuple(m for m in args.modalities.split(",") if m)
    cfg = GraphConfig(knn_k=args.knn_k, modalities=mods)
    start = time.perf_counter()
    graphs = load_or_build(ds, cfg, args.out, device=args.device)
    seconds = time.perf_counter() - start
    path = f"{args.out}/graphs-{cache_key(ds, cfg)}.safetensors"
    print(f"graphs in {path} ({seconds:.1f} s)", file=sys.stderr)
    return {"cache": path, "seconds": round(seconds, 3), **graphs.sizes(exact_products=not args.no_exact)}


def cmd_finetune(args) -> dict:
    """Stage-2 fine-tuning in this one process (a world of one); multi-rank runs use
    ``deepspeed``/``torchrun launch/finetune.py`` (see ``hellm_ds.train.finetune``)."""
    import contextlib
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist

    from hellm_ds.train.finetune import FinetuneConfig, TrainingDiverged, finetune
    from hellm_ds.utils.verbosity import configure_deepspeed_output

    kwargs = {f.name: getattr(args, f.name) for f in fields(FinetuneConfig) if hasattr(args, f.name)}
    try:  # stdout carries only the result JSON: DeepSpeed's own prints go to stderr
        with contextlib.redirect_stdout(sys.stderr):
            # its INFO logs and its collectives' FutureWarnings only with --verbose
            configure_deepspeed_output(verbose=args.verbose)
            res = finetune(FinetuneConfig(**kwargs))
    except TrainingDiverged as e:
        print(f"hellm-ds: error: {e}", file=sys.stderr)
        raise SystemExit(3) from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return {k: v for k, v in res.items() if k != "losses"}


def cmd_evaluate(args) -> dict:
    from hellm_ds.eval.checkpoint import evaluate_checkpoint
    from hellm_ds.exports import load_run_dataset

    ds, meta = load_run_dataset(args.checkpoint, args.data, args.max_len)
    ds.require_eval_users()  # exit 2 with a clear message rather than NaN metrics
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    return evaluate_checkpoint(args.checkpoint, ds, splits=splits, batch_size=args.batch_size,
                               device=args.device, progress=not args.quiet, meta=meta, ties=args.ties,
                               per_user=args.per_user)


# ---- the parser --------------------------------------------------------------------------------------------
# subcommand → (what registers its parser: "module" = module.add_cli(sub), "module:function"; the one-line
# help of the top-level listing). Only the chosen subcommand's module is imported: `hellm-ds --help` and
# `--version` answer without importing torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("hellm_ds.cli:_add_synth", "write a synthetic dataset directory with planted structure"),
    "stats": ("hellm_ds.cli:_add_stats", "sizes of a dataset directory and its split"),
    "import": ("hellm_ds.data.import_data",
               "import a CSV/TSV, Parquet, RecBole or Amazon log into a dataset directory (dense ids, k-core)"),
    "baseline": ("hellm_ds.cli:_add_baseline", "reference recommenders (popularity)"),
    "build-graphs": ("hellm_ds.cli:_add_build_graphs",
                     "build and cache the UI, user- and item-hypergraph structures"),
    "encode-text": ("hellm_ds.data.encode_text",
                    "encode DIR/items.tsv with a local sentence encoder → features/NAME.npy"),
    "pretrain-graph": ("hellm_ds.pretrain.train_graph",
                       "stage 1: hypergraph pre-training (MMHCL) → graph embeddings"),
    "pretrain-seq": ("hellm_ds.pretrain.train_sasrec", "train SASRec and export its item embeddings (stage 1b)"),
    "finetune": ("hellm_ds.cli:_add_finetune", "stage-2 HeLLM fine-tuning with DeepSpeed, in this one process"),
    "evaluate": ("hellm_ds.cli:_add_evaluate",
                 "full-ranking metrics of an exported fine-tuned HeLLM (OUT of finetune)"),
    "recommend": ("hellm_ds.eval.recommend", "top-k items for given users from an exported fine-tuned HeLLM"),
    "merge-lora": ("hellm_ds.train.merge", "fold a fine-tuned run's LoRA into a full HF model directory"),
    "pipeline": ("hellm_ds.pipeline",
                 "every stage: baseline, graphs, stage 1, DeepSpeed fine-tuning, evaluation (skips what is done)"),
    "report": ("hellm_ds.report", "regenerate the README's results tables from the committed result files"),
    "plot": ("hellm_ds.utils.plot", "training curves of a run (loss, learning rate, metrics) as PNG files"),
    "cuda-compile": ("hellm_ds.cli:_add_cuda_compile",
                     "compile the Triton kernels for a CUDA GPU without one (pre-flight)"),
    "doctor": ("hellm_ds.doctor", "check this installation and machine"),
}


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help=COMMANDS["synth"][1])
    p.add_argument("--out", required=True, help="directory to write (absent or empty)")
    p.add_argument("--users", type=int, default=2000, help="number of users")
    p.add_argument("--items", type=int, default=500, help="number of items")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--p-next", dest="p_next", type=float, default=0.5, help="probability of a sequential step")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty directory")
    p.set_defaults(func=cmd_synth)


def _add_stats(sub) -> None:
    p = sub.add_parser("stats", help=COMMANDS["stats"][1])
    _add_data_args(p)
    p.set_defaults(func=cmd_stats)


def _add_baseline(sub) -> None:
    p = sub.add_parser("baseline", help=COMMANDS["baseline"][1])
    bsub = p.add_subparsers(dest="baseline", required=True, metavar="BASELINE")
    b = bsub.add_parser("popularity", help="rank items by training-part popularity")
    _add_data_args(b)
    b.add_argument("--batch-size", type=int, default=1024, help="users ranked per batch")
    add_ties_arg(b)
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_baseline_popularity)


def _add_build_graphs(sub) -> None:
    p = sub.add_parser("build-graphs", help=COMMANDS["build-graphs"][1])
    _add_data_args(p)
    p.add_argument("--out", required=True, help="cache directory (graphs-<hash>.safetensors)")
    p.add_argument("--knn-k", type=int, default=10, help="neighbours per item and modality (self included)")
    p.add_argument("--modalities", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--device", type=device_arg, default=None,
                   help="device for the kNN search: cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--no-exact", action="store_true", help="skip counting nnz(R Rᵀ), nnz(H Hᵀ) exactly")
    p.set_defaults(func=cmd_build_graphs)


def _add_finetune(sub) -> None:
    from hellm_ds.train.finetune import build_parser as finetune_parser

    p = sub.add_parser("finetune", parents=[finetune_parser()], add_help=False, conflict_handler="resolve",
                       help=COMMANDS["finetune"][1],
                       description="Stage-2 HeLLM fine-tuning with DeepSpeed in one process (a world of one; "
                       "gloo on CPU). Multi-GPU/multi-rank: `deepspeed --num_gpus N launch/finetune.py ...` "
                       "or `torchrun --nproc_per_node N launch/finetune.py ...` "
                       "(see hellm_ds.train.finetune).")
    p.set_defaults(func=cmd_finetune)


def _add_evaluate(sub) -> None:
    from hellm_ds.eval.checkpoint import SPLITS

    p = sub.add_parser("evaluate", help=COMMANDS["evaluate"][1])
    p.add_argument("--checkpoint", required=True, help="the fine-tuning run's --out directory")
    p.add_argument("--data", required=True, help="the run's dataset directory")
    p.add_argument("--max-len", type=int, default=None,
                   help="history length (default: the run's, from OUT/log.jsonl; else 50)")
    p.add_argument("--splits", type=csv_choices(SPLITS), default=",".join(SPLITS),
                   help=f"comma-separated subset of {','.join(SPLITS)}")
    p.add_argument("--batch-size", type=int, default=256, help="users scored per batch")
    p.add_argument("--device", type=device_arg, default="auto",
                   help="auto (cuda if available), cpu, cuda, cuda:N")
    add_ties_arg(p)
    p.add_argument("--per-user", metavar="FILE", default=None,
                   help="also write one JSON line per evaluated user and split: the target, the items scored "
                        "above it and tied with it per protocol, raw ids and title when the dataset has them")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)


def cmd_cuda_compile(args) -> dict:
    from hellm_kernels.cuda_compile import report
    from hellm_kernels.errors import KernelUsageError

    try:
        return report(tuple(args.arch or [90]), args.cache_dir)
    except KernelUsageError as e:  # the kernel package is a leaf: its refusals become ours here
        raise UsageError(str(e)) from None


def _add_cuda_compile(sub) -> None:
    from hellm_kernels.cuda_compile import add_arguments

    p = sub.add_parser("cuda-compile", help=COMMANDS["cuda-compile"][1] + "; exit 1 on a failure or a "
                       "register spill")
    add_arguments(p)
    p.set_defaults(func=cmd_cuda_compile, exit_status=lambda result: 1 if result["failed"] else 0)


def _registrar(target: str) -> Callable:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function or "add_cli")


def _unavailable(name: str, err: ModuleNotFoundError) -> Callable:
    def func(args):
        raise UsageError(f"`hellm-ds {name}` is not available in this installation ({err})")

    return func


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``hellm-ds`` parser. ``commands``: the subcommands whose own parsers are built (their modules are
    imported); the others are listed by name and help only. None: all of them."""
    parser = ArgumentParser(prog="hellm-ds", description=__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument("--version", action="version", version=f"hellm-ds {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (target, text) in COMMANDS.items():
        if commands is not None and name not in commands:
            sub.add_parser(name, help=text)
            continue
        try:
            register = _registrar(target)
        except ModuleNotFoundError as e:
            if e.name != target.partition(":")[0]:
                raise  # a missing dependency of an existing module is a real error
            # a subcommand whose module is not in this tree: the others still work
            sub.add_parser(name, help=text).set_defaults(func=_unavailable(name, e))
            continue
        register(sub)
    return parser


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost subcommand's parser that ``args`` went through (``baseline popularity`` → popularity's)."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs else None
        if name not in (subs[0].choices if subs else ()):
            return parser
        parser = subs[0].choices[name]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the top-level parser has no option that takes a value: the first bare word is the subcommand
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(commands=[chosen] if chosen in COMMANDS else [])
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse would report them under the top-level usage; the subcommand's usage is the useful one
        _chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    func: Callable = args.func
    from hellm_ds.utils.io import removed_if_left_empty

    try:
        with removed_if_left_empty(getattr(args, "out", None)):  # a failed command leaves no empty --out
            result = func(args)
    except (DataFormatError, UsageError, FileExistsError) as e:
        print(f"hellm-ds: error: {e}", file=sys.stderr)
        return 2
    _print_json(result)
    exit_status = getattr(args, "exit_status", None)  # a command whose JSON can report a failure
    return exit_status(result) if exit_status else 0
