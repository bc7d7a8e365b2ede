"""LoRA merge into a full HF directory: it loads without peft, the LoRA'd projections changed by exactly the
adapter's product, and the merged export scores exactly like the unmerged run."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from hellm_ds.cli import main as cli_main
from hellm_ds.data.dataset import load_dataset
from hellm_ds.eval.checkpoint import evaluate_checkpoint
from hellm_ds.train.merge import merge_lora

from tests.train.common import ZERO2, run


@pytest.mark.parametrize("backbone", ["tiny", "local"])
def test_merged_export_scores_like_the_run(tables, local_llama, tmp_path, backbone):
    from transformers import AutoModelForCausalLM

    model = "tiny" if backbone == "tiny" else str(local_llama)
    out, merged = tmp_path / "run", tmp_path / "merged"
    # tiny: scope lora explicitly (its default is full), so the merge also reads the exported frozen base
    scope = ("--trainable-scope", "lora", "--item-head", "linear") if backbone == "tiny" else ()
    run(tables, out, "--epochs", "1", "--steps-per-epoch", "4", "--skip-eval", "--lr", "1e-2",
        "--model", model, *scope, config=ZERO2)
    adapter = {}
    with safe_open(str(out / "hellm_adapter.safetensors"), "pt") as f:
        adapter = {k: f.get_tensor(k) for k in f.keys()}
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in adapter.items())  # LoRA did train

    res = merge_lora(out, merged)
    assert res["merged_lora_layers"] == 2 * 3  # tiny: 2 layers × gate/up/down
    lm = AutoModelForCausalLM.from_pretrained(merged, local_files_only=True)  # plain HF, no peft
    sd = lm.state_dict()
    assert not any("lora" in k or "base_layer" in k for k in sd)
    # W' = W + (α/r)·B·A exactly where LoRA sat; untouched elsewhere
    from hellm_ds.exports import load_adapter

    src = load_adapter(out)
    layer = src.backbone.layers[0]
    up = layer.mlp.up_proj
    scale = up.scaling["default"]
    want = up.base_layer.weight + scale * up.lora_B["default"].weight @ up.lora_A["default"].weight
    torch.testing.assert_close(sd["model.layers.0.mlp.up_proj.weight"], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(sd["model.layers.0.self_attn.q_proj.weight"],
                               layer.self_attn.base_layer.q_proj.weight, rtol=0, atol=0)

    meta = json.loads((merged / "hellm_adapter.json").read_text())
    assert meta["model"]["model"] == "." and meta["model"]["lora_r"] == 0 and meta["base"] is None
    ds = load_dataset(tables[0], max_len=10)
    before = evaluate_checkpoint(out, ds, batch_size=200)
    after = evaluate_checkpoint(merged, ds, batch_size=200)
    assert before["ties"] == after["ties"] == "expected"
    for split in ("valid", "test"):
        for proto in before[split]:
            for k, v in before[split][proto].items():
                assert after[split][proto][k] == pytest.approx(v, abs=1e-9), (split, proto, k)

    # the merged directory is relocatable (the backbone is named relative to it) and not overwritten
    moved = tmp_path / "moved"
    merged.rename(moved)
    assert evaluate_checkpoint(moved, ds, splits=("test",), batch_size=200)["test"] == after["test"]
    assert cli_main(["merge-lora", "--checkpoint", str(out), "--out", str(moved)]) == 2


def test_merge_refuses_a_run_without_lora(tables, tmp_path):
    out = tmp_path / "run"
    run(tables, out, "--epochs", "1", "--steps-per-epoch", "1", "--skip-eval", "--lora-r", "0",
        "--trainable-scope", "full", config=ZERO2)
    assert cli_main(["merge-lora", "--checkpoint", str(out), "--out", str(tmp_path / "m")]) == 2
    assert not (tmp_path / "m").exists()
