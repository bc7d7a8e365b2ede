"""`--model DIR` that is not a Hugging Face checkpoint: one UsageError naming the directory and what it lacks,
raised before anything is built, loaded or written — by every entry point (the shared check in
``hellm_ds.llm.backbone``)."""
from __future__ import annotations

import json
import shutil

import pytest

from hellm_ds.errors import UsageError
from hellm_ds.llm.backbone import check_model, checkpoint_layout


def _missing_text(path):
    with pytest.raises(UsageError) as e:
        check_model(str(path))
    msg = str(e.value)
    assert str(path.resolve()) in msg and "You need to have" not in msg, msg  # not transformers' own
    return msg


def test_sizes_pass_and_unknown_names_are_refused(tmp_path):
    assert check_model("tiny") == "tiny"
    with pytest.raises(UsageError, match="neither a size"):
        check_model("meta-llama/Llama-2-7b-hf")
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        check_model(str(tmp_path / "f"))


def test_empty_directory_names_everything_missing(tmp_path):
    msg = _missing_text(tmp_path)
    assert "config.json" in msg and "*.safetensors or pytorch_model*.bin" in msg
    assert "tokenizer.json" in msg and "tokenizer.model" in msg and "tokenizer_config.json" in msg


def test_partial_layouts(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    msg = _missing_text(tmp_path)
    assert "config.json;" not in msg and "weights" in msg and "tokenizer" in msg
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "hellm_adapter.safetensors").write_bytes(b"")
    (tmp_path / "tokenizer_config.json").write_text("{}")  # describes a tokenizer, is none
    lay = checkpoint_layout(tmp_path)
    assert lay["weights"] == ["model.safetensors"] and lay["config"] and lay["model_type"] == "llama"
    assert len(lay["missing"]) == 1 and "tokenizer_config.json alone" in lay["missing"][0]
    (tmp_path / "tokenizer.json").write_text("{}")
    assert checkpoint_layout(tmp_path)["missing"] == []
    assert check_model(str(tmp_path)) == str(tmp_path.resolve())
    (tmp_path / "config.json").write_text("{not json")
    assert "readable config.json" in _missing_text(tmp_path)


def test_our_own_exports_are_not_backbone_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "hellm_base.safetensors").write_bytes(b"")
    assert "model weights" in _missing_text(tmp_path)


def test_sharded_index_names_absent_shards(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert "model-00002-of-00002.safetensors" in _missing_text(tmp_path)


def test_tokenizer_model_without_sentencepiece(tmp_path, monkeypatch):
    import importlib.util

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    (tmp_path / "tokenizer.model").write_bytes(b"")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "sentencepiece" else real(n, *a))
    assert "sentencepiece package" in _missing_text(tmp_path)


def test_a_saved_checkpoint_passes(local_llama):
    lay = checkpoint_layout(local_llama)
    assert lay["missing"] == [] and "tokenizer.json" in lay["tokenizer"] and lay["weights"]


def test_load_backbone_checks_first(tmp_path, local_llama):
    """What evaluate / recommend / merge-lora reach through load_adapter: the layout error, not the
    tokenizer's."""
    import torch

    from hellm_ds.llm.backbone import load_backbone
    from hellm_ds.llm.config import HeLLMConfig

    broken = tmp_path / "ckpt"
    shutil.copytree(local_llama, broken)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).unlink(missing_ok=True)
    with pytest.raises(UsageError, match="tokenizer files"):
        load_backbone(HeLLMConfig(model=str(broken)), torch.float32)


def test_finetune_config_and_pipeline_refuse_before_writing(tmp_path, synth_dir):
    from hellm_ds.pipeline import PipelineConfig, run_pipeline
    from hellm_ds.train.finetune import FinetuneConfig, config_from_args, main

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="config.json"):
        FinetuneConfig("d", "g", "s", str(tmp_path / "o"), model=str(empty))
    with pytest.raises(UsageError, match="config.json"):
        config_from_args(["--data", "d", "--graph-emb", "g", "--seq-emb", "s", "--out", "o", "--model",
                          str(empty)])
    # the trainer's entry (launch/finetune.py, python -m hellm_ds.train): one line, status 2
    assert main(["--data", "d", "--graph-emb", "g", "--seq-emb", "s", "--out", str(tmp_path / "o"),
                 "--model", str(empty)]) == 2
    # the pipeline checks the fine-tuning backbone before stage 1 runs or --out exists
    with pytest.raises(UsageError, match="config.json"):
        run_pipeline(PipelineConfig(data=str(synth_dir), out=str(tmp_path / "run"), model=str(empty)))
    assert not (tmp_path / "o").exists() and not (tmp_path / "run").exists()
