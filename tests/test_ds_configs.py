"""DeepSpeed configs carry explicit values (plain DeepSpeed does not resolve HF's "auto") and parse."""
import json
from pathlib import Path

import pytest

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "ds_configs").glob("*.json"))


def _values(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _values(v)
    else:
        yield obj


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_explicit_and_valid(path):
    cfg = json.loads(path.read_text())
    assert "auto" not in list(_values(cfg))
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = DeepSpeedConfig(cfg)  # the real parser, as deepspeed.initialize uses it
    assert ds.zero_optimization_stage == cfg["zero_optimization"]["stage"]


def test_expected_configs_exist():
    assert {p.name for p in CONFIGS} >= {"zero2.json", "zero3.json", "zero3_offload.json"}
