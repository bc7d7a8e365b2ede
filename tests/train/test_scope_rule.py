"""One rule for the backbone's training scope and the item head, for every entry point: ``auto`` → full + tied
for a config-built (random) backbone, lora + linear for a checkpoint directory; resolved in ``FinetuneConfig``
(so ``hellm-ds finetune``, ``launch/finetune.py`` and ``python -m hellm_ds.train`` agree) and used by the
pipeline; an explicit lora on a random backbone warns once."""
from __future__ import annotations

import pytest

from hellm_ds.errors import UsageError
from hellm_ds.llm.config import resolve_scope_and_head
from hellm_ds.train.finetune import FinetuneConfig
from tests.train.common import log, run


def test_auto_rule(local_llama, capsys):
    for size in ("tiny", "small", "llama-7b-shape"):
        assert resolve_scope_and_head(size) == ("full", "tied")
    assert resolve_scope_and_head(str(local_llama)) == ("lora", "linear")
    assert resolve_scope_and_head("tiny", "full", "linear") == ("full", "linear")
    assert resolve_scope_and_head(str(local_llama), "full", "tied") == ("full", "tied")
    assert resolve_scope_and_head(str(local_llama), "lora", "auto") == ("lora", "linear")
    assert capsys.readouterr().err == ""
    with pytest.raises(UsageError, match="trainable_scope"):
        resolve_scope_and_head("tiny", "everything")
    with pytest.raises(UsageError, match="item_head"):
        resolve_scope_and_head("tiny", "auto", "mlp")


def test_explicit_lora_on_a_random_backbone_warns_once(capsys, monkeypatch):
    assert resolve_scope_and_head("tiny", "lora") == ("lora", "tied")
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "random" in err and "'tiny'" in err, err
    resolve_scope_and_head("tiny", "lora", warn=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "1")  # the other ranks of a launch stay quiet
    FinetuneConfig("d", "g", "s", "o", trainable_scope="lora")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    FinetuneConfig("d", "g", "s", "o", trainable_scope="lora")
    assert capsys.readouterr().err.count("warning:") == 1


def test_finetune_config_resolves_auto(local_llama):
    from dataclasses import fields

    from hellm_ds.train.finetune import config_from_args

    defaults = {f.name: f.default for f in fields(FinetuneConfig)}
    assert (defaults["trainable_scope"], defaults["item_head"]) == ("auto", "auto")
    cfg = FinetuneConfig("d", "g", "s", "o")
    assert (cfg.trainable_scope, cfg.item_head) == ("full", "tied")
    assert cfg.to_dict()["trainable_scope"] == "full" and cfg.hellm_config().item_head == "tied"
    cfg = config_from_args(["--data", "d", "--graph-emb", "g", "--seq-emb", "s", "--out", "o", "--model",
                            str(local_llama)])
    assert (cfg.trainable_scope, cfg.item_head) == ("lora", "linear")
    assert cfg.model == str(local_llama.resolve())  # the export names the backbone from any directory


def test_tiny_run_records_full_tied_and_notes_the_capped_steps(tables, tmp_path):
    """`launch/finetune.py --model tiny` with the default scope and head: the run log records the resolved
    full + tied; --steps-per-epoch above what the data gives is capped with one note on stderr."""
    out = tmp_path / "run"
    p = run(tables, out, "--epochs", "1", "--steps-per-epoch", "100000", "--max-steps", "1", "--skip-eval")
    start = [r for r in log(out) if r["event"] == "start"][0]
    for rec in (start["config"], start["model"]):
        assert (rec["trainable_scope"], rec["item_head"]) == ("full", "tied"), rec
    assert start["steps_per_epoch"] < 100000
    notes = [line for line in p.stderr.splitlines() if "note:" in line]
    assert len(notes) == 1 and "100000" in notes[0] and f"using {start['steps_per_epoch']}" in notes[0], notes
    assert "warning: --trainable-scope" not in p.stderr


def test_objective_rule(local_llama):
    """auto → the per-position objective on the items prompt (prefix for the last position only) for a
    config-built backbone, METHOD's last-position objective and instruction prompt for a checkpoint directory;
    the per-position objective with a prefix every position sees is refused (it would leak)."""
    from hellm_ds.llm.config import resolve_objective

    assert resolve_objective("tiny") == ("all", "items", "last")
    assert resolve_objective(str(local_llama)) == ("last", "method", "all")
    assert resolve_objective("tiny", "last") == ("last", "items", "all")
    assert resolve_objective(str(local_llama), "all", "method") == ("all", "method", "last")
    assert resolve_objective("tiny", "all", prefix_queries="all", prefix_mode="off") == ("all", "items", "all")
    with pytest.raises(UsageError, match="prefix_queries 'last'"):
        resolve_objective("tiny", "all", prefix_queries="all")
    with pytest.raises(UsageError, match="objective"):
        resolve_objective("tiny", "every")
    cfg = FinetuneConfig("d", "g", "s", "o")
    assert (cfg.objective, cfg.prompt, cfg.prefix_queries) == ("all", "items", "last")
    assert (cfg.hellm_config().prompt, cfg.hellm_config().prefix_queries) == ("items", "last")
    cfg = FinetuneConfig("d", "g", "s", "o", model=str(local_llama))
    assert (cfg.objective, cfg.prompt, cfg.hellm_config().prefix_queries) == ("last", "method", "all")
