"""Fault drill: a two-rank CPU ZeRO-3 run (deepspeed launcher, gloo) loses one rank to SIGKILL mid-epoch,
right after a mid-epoch checkpoint; the launcher must tear the job down and exit non-zero, and a ``--resume``
must finish with exactly the uninterrupted run's losses, metrics and exported weights.

Timeline of the drilled run (2 epochs × 6 steps, ``--save-every 2``, validation on): checkpoints step2, step4,
step6 (epoch end), step8, ... ; rank 1 is killed once ``checkpoint step8`` (mid-epoch 1, after epoch 0's
validation/test and export, so the resumed run must also restore the best-epoch state) is in the log and
training has gone at least one step past it. Throughout, every value ``checkpoints/latest`` is seen to take
must name a complete checkpoint (both ranks' model and optimiser files)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hellm_ds.train.finetune import ADAPTER_NAME, BASE_NAME, CKPT_DIR, RESULTS_NAME, _tag_order, read_latest

from hellm_ds.utils.net import free_port
from tests.train.common import FAST, LAUNCH, ROOT, ZERO3, launcher_env, log

pytestmark = pytest.mark.slow

# scope lora on the config-built backbone (not its default): the drill also checks the frozen random base
# that such a run exports once, from the pre-kill part
ARGS = ("--epochs", "2", "--steps-per-epoch", "6", "--save-every", "2", "--lr", "1e-3", "--trainable-scope",
        "lora", "--item-head", "linear")
KILL_AFTER = "step8"  # the mid-epoch checkpoint after which rank 1 dies
RUN_TIMEOUT = 600  # s, a whole launcher run on the slow shared machine
WATCH_TIMEOUT = 480  # s, from launch until the kill condition
TEARDOWN_TIMEOUT = 180  # s, from the kill until the launcher has exited
POLL = 0.02


# ---- processes via /proc (no psutil needed) ----------------------------------------------------------------
def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _descendants(pid: int) -> list[int]:
    kids, out, todo = _children_map(), [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw if "=" in kv)


def _alive(pid: int) -> bool:
    """Running (a zombie — exited, not yet reaped — counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _worker(launcher_pid: int, rank: int) -> int | None:
    """The training process of ``rank`` among the launcher's descendants (cmdline runs launch/finetune.py with
    ``--local_rank=R``, environment RANK=R)."""
    for pid in _descendants(launcher_pid):
        cmd = _cmdline(pid)
        if str(LAUNCH) in cmd and f"--local_rank={rank}" in cmd and _environ(pid).get("RANK") == str(rank):
            return pid
    return None


class Launch:
    """``python -m deepspeed.launcher.runner --num_gpus 2 ...`` in its own session (process group), output
    to a file; ``close()`` SIGKILLs the whole group and anything still descended from it."""

    def __init__(self, tables, out: Path, *args, ranks: int = 2):
        data, graph, seq = tables
        self.out = out
        self.cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
                    "--master_port", str(free_port()), str(LAUNCH),
                    "--data", str(data), "--graph-emb", str(graph), "--seq-emb", str(seq), "--out", str(out),
                    "--deepspeed_config", str(ZERO3), *FAST, *map(str, args)]
        out.parent.mkdir(parents=True, exist_ok=True)
        self.console = out.parent / f"{out.name}.{int(time.time() * 1000)}.console.txt"
        self._f = self.console.open("w")
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(self.cmd, cwd=ROOT, env=launcher_env(), stdout=self._f,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        self.known: set[int] = set()  # every descendant ever seen (for the clean-up)

    def watch(self) -> list[int]:
        d = _descendants(self.p.pid)
        self.known.update(d)
        return d

    def tail(self, n: int = 6000) -> str:
        self._f.flush()
        return self.console.read_text(errors="replace")[-n:]

    def close(self) -> None:
        stray = self.known | set(_descendants(self.p.pid))
        try:
            os.killpg(self.p.pid, signal.SIGKILL)  # the launcher's session: runner, launch.py, both ranks
        except (ProcessLookupError, PermissionError):
            pass
        for pid in stray:  # anything that left the group (none expected); never a recycled pid
            if not any(str(LAUNCH) in a or "deepspeed.launcher" in a for a in _cmdline(pid)):
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self._f.close()


# ---- checkpoint / log inspection ---------------------------------------------------------------------------
def _ckpt_files(tag_dir: Path, ranks: int = 2) -> list[Path]:
    """The files a complete ZeRO-3 checkpoint of ``ranks`` ranks holds; AssertionError naming the missing."""
    files = []
    for r in range(ranks):
        model = tag_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"
        optim = sorted(tag_dir.glob(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
        assert model.is_file() and model.stat().st_size > 0, f"{model} missing/empty: {os.listdir(tag_dir)}"
        assert len(optim) == 1 and optim[0].stat().st_size > 0, f"rank {r} optimiser file: {os.listdir(tag_dir)}"
        files += [model, optim[0]]
    return files


def _check_latest(out: Path, seen: dict[str, bool]) -> None:
    """Whatever ``latest`` names right now must be a complete checkpoint (both ranks' files)."""
    p = out / CKPT_DIR / "latest"
    try:
        tag = p.read_text().strip()
    except OSError:
        return
    if tag in seen:
        return
    tag_dir = out / CKPT_DIR / tag
    assert tag_dir.is_dir(), f"latest names {tag!r}, which does not exist"
    _ckpt_files(tag_dir)
    seen[tag] = True


def _events(out: Path) -> list[dict]:
    try:
        return log(out)
    except (OSError, json.JSONDecodeError):  # not written yet / a line being appended
        return []


def _wait(launch: Launch, what: str, timeout: float = RUN_TIMEOUT, seen: dict | None = None) -> int:
    """Wait for the launcher to exit (checking ``latest`` meanwhile); its exit code."""
    end = time.monotonic() + timeout
    while launch.p.poll() is None:
        launch.watch()
        if seen is not None:
            _check_latest(launch.out, seen)
        if time.monotonic() > end:
            raise AssertionError(f"{what}: launcher still running after {timeout}s\n{launch.tail()}")
        time.sleep(0.2)
    if seen is not None:
        _check_latest(launch.out, seen)
    return launch.p.returncode


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / ADAPTER_NAME))


def test_kill_one_rank_then_resume_matches_uninterrupted(tables, tmp_path):
    t_test = time.monotonic()
    full, drill = tmp_path / "full", tmp_path / "drill"
    launches: list[Launch] = []
    report: dict = {}
    try:
        # -- 1. the drilled run: wait for checkpoint step8 + one more step, then SIGKILL rank 1 --
        seen: dict[str, bool] = {}
        first = Launch(tables, drill, *ARGS)
        launches.append(first)
        end = time.monotonic() + WATCH_TIMEOUT
        victim = survivor = None
        n = 0
        while True:
            n += 1
            if first.p.poll() is not None:
                pytest.fail(f"the drilled run exited (code {first.p.returncode}) before rank 1 could be killed "
                            f"after checkpoint {KILL_AFTER}: the drill did not happen\n{first.tail()}")
            if time.monotonic() > end:
                pytest.fail(f"no checkpoint {KILL_AFTER} + a further step within {WATCH_TIMEOUT}s\n{first.tail()}")
            if n % 25 == 0:
                first.watch()
            _check_latest(drill, seen)
            ev = _events(drill)
            ck = [r for r in ev if r["event"] == "checkpoint" and r["tag"] == KILL_AFTER]
            if ck and any(r["event"] == "train" and r["step"] > ck[0]["step"] for r in ev):
                victim, survivor = _worker(first.p.pid, 1), _worker(first.p.pid, 0)
                assert victim is not None and survivor is not None, (first.watch(), first.tail())
                os.kill(victim, signal.SIGKILL)
                t_kill = time.monotonic()
                break
            time.sleep(POLL)
        pre_kill = _events(drill)
        last_step_before = max(r["step"] for r in pre_kill if r["event"] == "train")
        report["killed_after_train_step"] = last_step_before
        report["kill_at_s"] = round(t_kill - first.t0, 1)

        # -- 2. the launcher must notice, tear the surviving rank down and exit non-zero --
        t_survivor_gone = None
        while first.p.poll() is None:
            if t_survivor_gone is None and not _alive(survivor):
                t_survivor_gone = time.monotonic()
            _check_latest(drill, seen)
            if time.monotonic() - t_kill > TEARDOWN_TIMEOUT:
                alive = [p for p in first.watch() if _alive(p)]
                first.close()
                pytest.fail(f"HANG: launcher still running {TEARDOWN_TIMEOUT}s after rank 1 was SIGKILLed "
                            f"(alive descendants {alive}, rank 0 alive: {_alive(survivor)}); process group "
                            f"killed\n{first.tail()}")
            time.sleep(POLL)
        t_exit = time.monotonic()
        if t_survivor_gone is None:
            t_survivor_gone = t_exit if not _alive(survivor) else None
        report["launcher_exit_code"] = first.p.returncode
        report["teardown_s"] = round(t_exit - t_kill, 2)
        report["survivor_gone_s"] = None if t_survivor_gone is None else round(t_survivor_gone - t_kill, 2)
        console = first.tail(20000)
        # how rank 0 went: its own gloo error (peer gone) or the launcher's SIGTERM/SIGKILL
        report["rank0_gloo_error"] = next((m for m in ("Connection reset by peer", "Connection closed by peer")
                                           if m in console), None)
        report["launcher_killed_subprocesses"] = "sigkill_handler" in console
        assert first.p.returncode != 0, console
        assert not _alive(survivor), f"rank 0 (pid {survivor}) outlived the launcher: orphan\n{console}"
        assert not [p for p in first.known if _alive(p)], "descendants of the launcher left running"
        _check_latest(drill, seen)

        # the pointer after the kill names a complete, loadable checkpoint at or after step8
        tag = read_latest(drill / CKPT_DIR)
        assert tag is not None and _tag_order(tag) >= _tag_order(KILL_AFTER), tag
        for f in _ckpt_files(drill / CKPT_DIR / tag):
            torch.load(f, map_location="cpu", weights_only=False)
        report["latest_after_kill"] = tag
        assert not (drill / RESULTS_NAME).exists()

        # -- 3. resume and finish --
        second = Launch(tables, drill, *ARGS, "--resume")
        launches.append(second)
        rc = _wait(second, "resumed run", seen=seen)
        assert rc == 0, second.tail()
        report["latest_values_seen"] = sorted(seen, key=_tag_order)

        # -- 4. the uninterrupted reference --
        ref = Launch(tables, full, *ARGS)
        launches.append(ref)
        assert _wait(ref, "uninterrupted run") == 0, ref.tail()
    finally:
        for launch in launches:
            launch.close()

    # (d) the log: a resume event from the pointer's checkpoint, which was written before the kill
    ev = log(drill)
    resumes = [i for i, r in enumerate(ev) if r["event"] == "resume"]
    assert len(resumes) == 1, [r for r in ev if r["event"] == "resume"]
    rs = ev[resumes[0]]
    assert rs["tag"] == tag and rs["step"] == _tag_order(tag)[0], rs
    assert rs["step"] <= last_step_before, (rs, last_step_before)
    assert any(r["event"] == "checkpoint" and r["tag"] == KILL_AFTER for r in ev[: resumes[0]])
    assert any(r["event"] == "epoch" and "valid" in r and r["epoch"] == 1 for r in ev[: resumes[0]])  # pre-kill

    # (c) losses: before the kill and after the resume, every step equals the uninterrupted run's
    ref_losses = {r["step"]: r["loss"] for r in log(full) if r["event"] == "train"}
    assert sorted(ref_losses) == list(range(1, 13))
    before = [r for r in ev[: resumes[0]] if r["event"] == "train"]
    after = [r for r in ev[resumes[0]:] if r["event"] == "train"]
    assert [r["step"] for r in after] == list(range(rs["step"] + 1, 13)), [r["step"] for r in after]
    worst = 0.0
    for r in before + after:
        a = ref_losses[r["step"]]
        assert r["loss"] == pytest.approx(a, rel=1e-5), (r["step"], a, r["loss"])
        worst = max(worst, abs(r["loss"] - a) / abs(a))
    report["loss_max_rel_diff"] = worst

    # (a) results: validation and test metrics (both protocols) of the best epoch
    res_full = json.loads((full / RESULTS_NAME).read_text())
    res_drill = json.loads((drill / RESULTS_NAME).read_text())
    assert res_drill["global_step"] == res_full["global_step"] == 12
    assert res_drill["best_epoch"] == res_full["best_epoch"]
    worst = 0.0
    for split in ("valid", "test"):
        for proto in ("paper", "filtered"):
            a, b = res_full[split][proto], res_drill[split][proto]
            assert a.keys() == b.keys() and a, (split, proto)
            for k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), (split, proto, k, a[k], b[k])
                worst = max(worst, abs(b[k] - a[k]))
    report["metric_max_abs_diff"] = worst

    # (b) the exported adapter, tensor by tensor
    ta, tb = _adapter(full), _adapter(drill)
    assert ta.keys() == tb.keys() and ta
    worst = 0.0
    for k in ta:
        assert ta[k].shape == tb[k].shape and ta[k].dtype == tb[k].dtype, k
        torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=1e-6, msg=k)
        worst = max(worst, float((tb[k] - ta[k]).abs().max()) if ta[k].numel() else 0.0)
    report["adapter_max_abs_diff"] = worst
    # the random frozen base (written once, by the pre-kill part of the drilled run) is the reference's too
    from safetensors.torch import load_file

    ba, bb = load_file(str(full / BASE_NAME)), load_file(str(drill / BASE_NAME))
    assert ba.keys() == bb.keys() and all(torch.equal(ba[k], bb[k]) for k in ba)
    report["adapter_tensors"] = len(ta)
    report["test_seconds"] = round(time.monotonic() - t_test, 1)
    print("FAULT-DRILL " + json.dumps(report, indent=1))
