"""The shipped DeepSpeed configs are found from any working directory, in a checkout and in a wheel install;
a missing or malformed config is one clear error."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hellm_ds.errors import UsageError
from hellm_ds.utils.ds_configs import resolve_ds_config, shipped_configs

ROOT = Path(__file__).resolve().parents[2]
NAMES = {"zero2.json", "zero3.json", "zero3_offload.json"}


def test_shipped_configs_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert set(shipped_configs()) >= NAMES
    for name in NAMES:
        for spelling in (f"ds_configs/{name}", name):
            path = resolve_ds_config(spelling)
            assert path.read_text() == (ROOT / "ds_configs" / name).read_text()


def test_an_existing_path_wins_and_a_missing_one_names_the_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "ds_configs" / "zero3.json"  # a user's own file shadows the shipped one of that name
    own.parent.mkdir()
    own.write_text("{}")
    assert resolve_ds_config("ds_configs/zero3.json") == own.resolve()
    with pytest.raises(UsageError, match=r"--deepspeed-config ds_configs/zero4\.json not found.*zero3_offload"):
        resolve_ds_config("ds_configs/zero4.json", "--deepspeed-config")
    with pytest.raises(UsageError, match="not found"):
        resolve_ds_config(tmp_path / "elsewhere" / "zero3.json")  # absolute paths are never redirected


def test_malformed_config_names_file_and_line(tmp_path):
    from hellm_ds.train.finetune import FinetuneConfig, load_ds_config

    bad = tmp_path / "bad.json"
    cfg = FinetuneConfig(data="d", graph_emb="g", seq_emb="s", out="o", deepspeed_config=str(bad))
    bad.write_text('{\n  "zero_optimization": {"stage": 3,}\n}\n')
    with pytest.raises(UsageError, match=rf"{bad}:2:\d+: not valid JSON"):
        load_ds_config(cfg, None)
    bad.write_text("[1, 2]")
    with pytest.raises(UsageError, match="must be a JSON object"):
        load_ds_config(cfg, None)


def test_wheel_install_ships_the_configs(tmp_path):
    """A non-editable install (wheel → site directory) finds ds_configs/zero3.json outside any checkout."""
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT),
                    "-w", str(wheels)], check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                    *map(str, wheels.glob("*.whl"))], check=True, capture_output=True, timeout=300)
    code = ("import json, hellm_ds; from hellm_ds.utils.ds_configs import resolve_ds_config as r; "
            "print(json.dumps([hellm_ds.__file__, str(r('ds_configs/zero3.json'))]))")
    env = dict(os.environ, PYTHONPATH=str(site))  # ahead of the editable install of this checkout
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True).stdout
    package, config = json.loads(out)
    assert Path(package).is_relative_to(site) and Path(config).is_relative_to(site)
    assert Path(config).read_text() == (ROOT / "ds_configs" / "zero3.json").read_text()
    # the wheel carries the kernel package too, and from the repository root (cwd first on sys.path) neither
    # it nor transformers' `kernels` import comes from the checkout's folders
    code = ("import json, kernels, hellm_kernels, transformers.models.llama.modeling_llama; "
            "print(json.dumps([hellm_kernels.__file__, kernels.__file__]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True,
                         text=True).stdout
    ours, hf = map(Path, json.loads(out))
    assert ours.is_relative_to(site) and not hf.is_relative_to(ROOT / "kernels")
