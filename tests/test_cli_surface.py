"""The command-line surface a newcomer meets first: help texts with defaults, a fast top-level help that
imports no torch, choices checked by argument parsing, errors under the subcommand's own usage."""
import argparse
import subprocess
import sys
import time

import pytest

from hellm_ds import cli
from hellm_ds.cli import COMMANDS, build_parser, main

HEAVY = ("torch", "numpy", "transformers", "deepspeed")


def walk(parser: argparse.ArgumentParser, path=("hellm-ds",)):
    """(path, parser) for the parser and every subcommand below it (``baseline popularity`` included)."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, path + (name,))


def all_parsers():
    from hellm_ds.train.finetune import build_parser as trainer_parser

    return [*walk(build_parser()), (("launch/finetune.py",), trainer_parser())]


def test_every_option_has_help_and_shows_its_default():
    parsers = all_parsers()
    paths = {" ".join(path[1:]) for path, _ in parsers}
    assert set(COMMANDS) - {"doctor"} <= paths and "baseline popularity" in paths
    missing, no_default = [], []
    for path, parser in parsers:
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue  # positionals (the subcommand) / deliberately hidden (--local_rank)
            flag = f"{' '.join(path)} {action.option_strings[0]}"
            if not (action.help or "").strip():
                missing.append(flag)
                continue
            text = formatter._expand_help(action)  # what --help prints for it, %(default)s expanded
            default = action.default
            if default not in (None, argparse.SUPPRESS) and not isinstance(default, bool):
                if "default" not in text or str(default) not in text:
                    no_default.append(f"{flag}: {text!r}")
        parser.format_help()  # every help text formats (no stray % in it)
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"options whose help does not show the default: {no_default}"


def run(*args, timeout=120):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def imported(importtime_err: str) -> set[str]:
    """Top-level package names in ``python -X importtime`` output."""
    names = set()
    for line in importtime_err.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_top_level_help_and_version_are_fast_and_import_no_torch():
    p = run("-X", "importtime", "-m", "hellm_ds", "--help")
    assert p.returncode == 0, p.stderr
    for name in COMMANDS:  # every subcommand listed with its one-line help
        assert name in p.stdout, name
    heavy = imported(p.stderr) & set(HEAVY)
    assert not heavy, f"hellm-ds --help imported {heavy}"

    start = time.perf_counter()
    p = run("-X", "importtime", "-m", "hellm_ds", "--version")
    seconds = time.perf_counter() - start
    assert p.returncode == 0 and p.stdout.startswith("hellm-ds ")
    assert not imported(p.stderr) & set(HEAVY)
    assert seconds < 5, f"--version took {seconds:.1f} s"  # ~0.1 s idle; loose for a loaded machine


def test_a_subcommand_help_imports_only_that_subcommand():
    p = run("-X", "importtime", "-m", "hellm_ds", "stats", "--help")
    assert p.returncode == 0 and "--data" in p.stdout and "(default: 50)" in p.stdout
    assert not imported(p.stderr) & set(HEAVY)


def test_a_missing_subcommand_module_does_not_break_the_others(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(COMMANDS, "later", ("hellm_ds.not_written_yet", "a subcommand still being written"))
    parser = build_parser()  # the full parser (all modules) still builds
    assert "later" in dict(walk(parser))[("hellm-ds",)].format_help()
    assert main(["later"]) == 2
    assert "hellm-ds later` is not available" in capsys.readouterr().err
    (tmp_path / "sequences.txt").write_text("1 1 2 3\n2 2 3 4\n")
    assert main(["stats", "--data", str(tmp_path)]) == 0


@pytest.mark.parametrize("argv, usage", [
    (["stats", "--data", "D", "--bogus"], "usage: hellm-ds stats"),
    (["baseline", "popularity", "--data", "D", "--bogus", "1"], "usage: hellm-ds baseline popularity"),
    (["pretrain-seq", "--data", "D", "--out", "O", "--epoch", "3", "--bogus"], "usage: hellm-ds pretrain-seq"),
])
def test_a_mistyped_flag_shows_the_subcommands_usage(argv, usage, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage) and "error: unrecognized arguments: --bogus" in err
    assert "hellm-ds: error" not in err  # not the top-level parser's


def test_a_mistyped_flag_in_a_subprocess_exits_2():
    p = run("-m", "hellm_ds", "plot", "--run", "R", "--metirc", "x")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("usage: hellm-ds plot") and "unrecognized arguments: --metirc x" in p.stderr


FT = ["finetune", "--data", "D", "--graph-emb", "G", "--seq-emb", "S", "--out", "O"]


@pytest.mark.parametrize("argv, message", [
    (FT + ["--item-head", "mlp"], "argument --item-head: invalid choice: 'mlp'"),
    (FT + ["--trainable-scope", "lora+"], "argument --trainable-scope: invalid choice"),
    (FT + ["--attn-implementation", "flash"], "argument --attn-implementation: invalid choice"),
    (FT + ["--dtype", "fp16"], "argument --dtype: invalid choice"),
    (FT + ["--prefix-mode", "none"], "argument --prefix-mode: invalid choice"),
    (FT + ["--select-metric", "paper/NDCG@7"], "argument --select-metric: invalid choice"),
    (["pretrain-graph", "--data", "D", "--out", "O", "--backend", "cuda"], "argument --backend: invalid choice"),
    (["pretrain-graph", "--data", "D", "--out", "O", "--contrast", "all"], "argument --contrast: invalid choice"),
    (["pretrain-seq", "--data", "D", "--out", "O", "--device", "gpu"], "argument --device: expected auto, cpu"),
    (["evaluate", "--checkpoint", "C", "--data", "D", "--device", "cuda:x"], "argument --device: expected"),
    (["evaluate", "--checkpoint", "C", "--data", "D", "--splits", "valid,train"], "argument --splits: expected"),
    (["pipeline", "--data", "D", "--out", "O", "--item-head", "big"], "argument --item-head: invalid choice"),
    (["pipeline", "--data", "D", "--out", "O", "--redo", "graph,sasrek"], "argument --redo: expected"),
    (["merge-lora", "--checkpoint", "C", "--out", "O", "--dtype", "fp32"], "argument --dtype: invalid choice"),
])
def test_choices_are_checked_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)  # the paths do not exist: the parser stops before anything reads them
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: hellm-ds {argv[0]}" in err and message in err, err


def test_finetune_scope_and_head_default_to_auto():
    from hellm_ds.train.finetune import build_parser as trainer_parser
    from hellm_ds.train.finetune import config_from_args

    for args in (trainer_parser().parse_args(FT[1:]), build_parser(["finetune"]).parse_args(FT)):
        assert (args.trainable_scope, args.item_head) == ("auto", "auto")
    cfg = config_from_args(FT[1:])  # FinetuneConfig takes "auto" (and resolves it against --model)
    assert cfg.trainable_scope in ("lora", "full") and cfg.item_head in ("linear", "tied")
    cfg = config_from_args(FT[1:] + ["--trainable-scope", "lora", "--item-head", "tied"])
    assert (cfg.trainable_scope, cfg.item_head) == ("lora", "tied")


@pytest.mark.parametrize("argv", [
    ["stats"], ["baseline", "popularity", "--quiet"], ["build-graphs", "--out", "{tmp}/g"],
    ["encode-text"], ["pretrain-graph", "--out", "{tmp}/r"], ["pretrain-seq", "--out", "{tmp}/r"],
    ["pipeline", "--out", "{tmp}/run"],
])
def test_data_that_is_a_file_is_named_as_not_a_directory(argv, tmp_path, capsys):
    seqs = tmp_path / "sequences.txt"
    seqs.write_text("1 1 2 3\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv + ["--data", str(seqs)]) == 2
    err = capsys.readouterr().err
    assert f"hellm-ds: error: {seqs}: not a directory" in err, err
    assert not (tmp_path / "run").exists()  # nothing written for a bad --data
    assert main(["stats", "--data", str(tmp_path / "absent")]) == 2
    assert "dataset directory not found" in capsys.readouterr().err


def test_module_table_points_at_registrars():
    for name, (target, text) in COMMANDS.items():
        assert text and "%" not in text, name
        module, _, function = target.partition(":")
        if module == "hellm_ds.cli":
            assert callable(getattr(cli, function)), name
