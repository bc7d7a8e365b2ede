"""`hellm-ds doctor`: dependency versions against a lock file, GPUs and kernels, DeepSpeed ops, the --model
layout check; JSON on stdout, exit status 1 only when something required is broken."""
from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import subprocess
import sys

import pytest
import torch

from hellm_ds import doctor

REQUIRED = ("torch", "deepspeed", "transformers", "peft", "numpy", "safetensors", "tqdm")


def run_doctor(*args) -> tuple[int, dict, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.run([sys.executable, "-m", "hellm_ds", "doctor", *map(str, args)], capture_output=True,
                       text=True, timeout=600, env=env)
    assert p.stdout.strip() or p.returncode == 2, p.stderr[-3000:]
    res = json.loads(p.stdout) if p.stdout.strip() else None  # stdout: the JSON alone
    return p.returncode, res, p.stderr


@pytest.fixture(scope="module")
def locks(tmp_path_factory):
    """A lock that matches what is installed, and one with a wrong numpy and a package that is not there."""
    d = tmp_path_factory.mktemp("locks")
    good = d / "good.txt"
    good.write_text("# a comment line\n" + "".join(f"{n}=={metadata.version(n).split('+')[0]}\n"
                                                   for n in REQUIRED))
    bad = d / "bad.txt"
    bad.write_text(good.read_text().replace(f"numpy=={metadata.version('numpy')}", "numpy==0.0.1")
                   + "surely-not-installed-pkg==1.0\n")
    return good, bad


def test_versions_lock_gpus_kernels_ops(locks):
    rc, res, err = run_doctor("--lock", locks[0], "--model", "tiny")
    assert rc == 0 and res["ok"] and res["problems"] == [], res["problems"]
    deps = res["dependencies"]
    for name in REQUIRED:
        assert deps[name]["required"] and deps[name]["installed"] == metadata.version(name)
        assert deps[name]["lock"] is not None and deps[name]["matches_lock"] and deps[name]["satisfies"]
    for name in ("triton", "torch-sparse", "kernels", "matplotlib"):
        assert name in deps and not deps[name]["required"]
    assert res["lock"]["pins"] == len(REQUIRED) == res["lock"]["matching"] and not res["lock"]["mismatched"]
    assert res["python"]["version"] and res["platform"]["system"]
    cuda = torch.cuda.is_available()
    assert res["gpus"]["cuda_available"] == cuda and bool(res["gpus"]["devices"]) == cuda
    assert res["kernels"]["status"] == ("ok" if cuda else "no GPU"), res["kernels"]
    ds = res["deepspeed"]
    assert "error" not in ds and isinstance(ds["ops"]["cpu_adam"]["compatible"], bool)
    assert set(ds["toolchain"]) >= {"ninja", "c++", "nvcc", "python_headers"}
    assert res["model"] == {"model": "tiny", "kind": "config-built", "ok": True,
                            "auto_trainable_scope": "full", "auto_item_head": "tied"}
    assert "doctor: OK" in err


def test_mismatch_is_flagged_and_a_bad_model_fails(locks, tmp_path):
    empty = tmp_path / "notackpt"
    empty.mkdir()
    rc, res, err = run_doctor("--lock", locks[1], "--model", empty)
    assert rc == 1 and not res["ok"]
    numpy = res["dependencies"]["numpy"]
    assert numpy["lock"] == "0.0.1" and numpy["matches_lock"] is False
    assert res["lock"]["mismatched"] == [{"name": "numpy", "lock": "0.0.1",
                                          "installed": metadata.version("numpy")}]
    assert res["lock"]["not_installed"] == [{"name": "surely-not-installed-pkg", "lock": "1.0"}]
    assert any("numpy" in w and "0.0.1" in w for w in res["warnings"]), res["warnings"]
    m = res["model"]
    assert not m["ok"] and m["kind"] == "checkpoint" and len(m["missing"]) == 3 and str(empty) in m["error"]
    assert res["problems"] == [m["error"]]  # the version difference is a warning without --strict-lock
    rc, res, _ = run_doctor("--lock", locks[1], "--strict-lock")
    assert rc == 1 and any("numpy" in p for p in res["problems"]) and "model" not in res
    rc, _, err = run_doctor("--lock", tmp_path / "absent.txt")
    assert rc == 2 and "--lock" in err and "absent.txt" in err


def test_model_check_of_a_checkpoint(local_llama):
    res = doctor.model_check(str(local_llama))
    assert res["ok"] and res["missing"] == [] and res["config"] and res["weights"]
    assert (res["auto_trainable_scope"], res["auto_item_head"]) == ("lora", "linear")


def test_lock_file_lookup(tmp_path, monkeypatch):
    (tmp_path / "requirements-lock.txt").write_text("Foo_Bar==1.2\n# x\n-e .\nbaz===3 ; python_version>'3'\n")
    assert doctor.read_lock(tmp_path / "requirements-lock.txt") == {"foo-bar": "1.2", "baz": "3"}
    monkeypatch.setattr(doctor, "checkout_root", lambda: tmp_path)
    assert doctor.find_lock(None) == (tmp_path / "requirements-lock.txt", None)
    (tmp_path / "requirements-lock.txt").unlink()
    path, reason = doctor.find_lock(None)  # no checkout around the package: installed from a wheel
    assert path is None and "wheel" in reason and "--lock" in reason
    (tmp_path / "setup.py").write_text("")
    path, reason = doctor.find_lock(None)
    assert path is None and "refresh_lock.sh" in reason
    assert doctor._same_version("2.13.0+cpu", "2.13.0") and not doctor._same_version("2.13.1", "2.13.0")


def test_every_flag_has_help():
    from hellm_ds.cli import build_parser

    parser = build_parser(["doctor"])
    sub = next(a for a in parser._actions if a.dest == "command").choices["doctor"]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings


def test_kernel_launch_check_logic():
    """The GPU launch check's code path, on the CPU under the Triton interpreter (conftest sets it there)."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the subprocess check runs on the GPU in test_versions_lock_gpus_kernels_ops")
    res = doctor.kernel_launch_check(["cpu"])
    assert res["failed"] == 0 and len(res["checks"]) == 4, res
    assert {(c["backend"], c["dtype"]) for c in res["checks"]} == {
        (b, d) for b in ("triton", "triton_tile") for d in ("float32", "bfloat16")}
