"""Stage-2 configuration and backbone: validation, the offline tokenizer, config-built sizes, local
checkpoint directories (LLaMA and cousins), the layout check."""
import pytest
import torch

from hellm_ds.errors import UsageError
from hellm_ds.llm import MODEL_SIZES, HeLLMConfig, build_hellm
from hellm_ds.llm.backbone import (
    SPECIAL_TOKENS,
    attention_geometry,
    build_offline_tokenizer,
    check_layout,
    load_backbone,
)
from hellm_ds.llm.config import INSTRUCTION, RESPONSE

from tests.llm.common import tables


@pytest.mark.parametrize("bad", [
    dict(prefix_mode="deep"), dict(trainable_scope="all"), dict(dtype="int8"), dict(lora_r=-1),
    dict(prefix_len=0), dict(prefix_dropout=1.0), dict(lora_dropout=-0.1), dict(gram_hidden=0),
    dict(instruction="  "), dict(lora_targets=()),
])
def test_config_rejects_bad_values(bad):
    with pytest.raises(UsageError):
        HeLLMConfig(**bad)


def test_config_round_trip_and_defaults():
    cfg = HeLLMConfig()
    assert (cfg.prefix_len, cfg.prefix_mode, cfg.prefix_dropout) == (10, "hidden", 0.3)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (16, 16.0, 0.05)
    assert cfg.lora_targets == ("gate_proj", "up_proj", "down_proj") and cfg.trainable_scope == "lora"
    assert "### Instruction:" in cfg.instruction and "### Input:" in cfg.instruction
    assert "### Response:" in cfg.response
    assert HeLLMConfig.from_dict(cfg.to_dict()) == cfg
    assert HeLLMConfig(lora_targets=["q_proj"]).lora_targets == ("q_proj",)
    assert HeLLMConfig(prefix_mode="off", prefix_len=0).prefix_on is False
    with pytest.raises(UsageError, match="unknown"):
        HeLLMConfig.from_dict({"prefix_length": 3})
    assert HeLLMConfig().torch_dtype("cpu") == torch.float32
    assert HeLLMConfig().torch_dtype("cuda") == torch.bfloat16
    assert HeLLMConfig(dtype="bfloat16").torch_dtype("cpu") == torch.bfloat16


def test_offline_tokenizer_knows_the_prompt():
    tok = build_offline_tokenizer([INSTRUCTION, RESPONSE])
    unk, bos = tok.convert_tokens_to_ids("<unk>"), tok.convert_tokens_to_ids("<s>")
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3] and tok.pad_token_id == 0
    instr = tok(INSTRUCTION)["input_ids"]
    resp = tok(RESPONSE, add_special_tokens=False)["input_ids"]
    assert instr[0] == bos and bos not in instr[1:] and bos not in resp
    assert unk not in instr and unk not in resp
    assert tok.convert_ids_to_tokens(resp) == ["###", "Response", ":"]
    assert tok("completely unseen words", add_special_tokens=False)["input_ids"] == [unk] * 3
    # same texts → same ids
    assert build_offline_tokenizer([INSTRUCTION, RESPONSE]).get_vocab() == tok.get_vocab()


def test_sizes_tiny_and_small_build():
    for name in ("tiny", "small"):
        dec, tok = load_backbone(HeLLMConfig(model=name), torch.float32)
        s = MODEL_SIZES[name]
        H, n_layers, n_kv, hd = attention_geometry(dec)
        assert (H, n_layers, n_kv, hd) == (s.hidden_size, s.num_hidden_layers, s.num_key_value_heads,
                                           s.hidden_size // s.num_attention_heads)
        assert dec.config.vocab_size == len(tok)
        assert type(dec).__name__ == "LlamaModel" and not hasattr(dec, "lm_head")


def test_llama_7b_shape_on_meta():
    with torch.device("meta"):  # shape only: no memory
        dec, _ = load_backbone(HeLLMConfig(model="llama-7b-shape"), torch.bfloat16)
    assert attention_geometry(dec) == (4096, 32, 32, 128)
    assert dec.config.intermediate_size == 11008 and dec.config.vocab_size == 32000
    n = sum(p.numel() for p in dec.parameters())
    assert n == 6_607_343_616  # LLaMA-2-7B without its LM head (6.74 B with it)
    assert {p.dtype for p in dec.parameters()} == {torch.bfloat16}


def test_unknown_model_is_refused_without_a_download():
    with pytest.raises(UsageError, match="neither a size"):
        load_backbone(HeLLMConfig(model="meta-llama/Llama-2-7b-hf"), torch.float32)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_local_checkpoint_directory(tmp_path, family):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    tok = build_offline_tokenizer([INSTRUCTION, RESPONSE])
    config = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family](
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config)
    lm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    graph, seq = tables()
    m = build_hellm(HeLLMConfig(model=str(tmp_path), prefix_len=2, dtype="float32"), graph, seq, seed=0)
    # the prefix wrapper and peft both nest the original module as `base_layer`: strip it to compare
    own = {k.replace(".base_layer", ""): t for k, t in m.backbone.state_dict().items() if ".lora_" not in k}
    ref = lm.base_model.state_dict()
    assert own.keys() == ref.keys()
    for name, t in ref.items():
        assert torch.equal(own[name], t), name
    # the directory's own tokenizer (transformers picks its Qwen2 class for a Qwen2 config) made the prompt
    from transformers import AutoTokenizer

    dir_tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert m.instruction_ids.tolist() == dir_tok(INSTRUCTION)["input_ids"]
    assert m.response_ids.tolist() == dir_tok(RESPONSE, add_special_tokens=False)["input_ids"]
    assert type(m.backbone).__name__ == {"llama": "LlamaModel", "mistral": "MistralModel",
                                         "qwen2": "Qwen2Model"}[family]


def test_layout_check_rejects_other_architectures():
    from transformers import GPT2Config, GPT2Model

    with pytest.raises(UsageError, match="layers"):
        check_layout(GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=10)))
