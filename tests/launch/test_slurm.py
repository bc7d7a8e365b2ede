"""launch/slurm/*.sbatch run for real on this machine under a fake Slurm: fake ``sbatch`` (runs the script
at once, stdout/stderr into the ``--output`` file of its ``#SBATCH`` header, Slurm's job variables set from
the header and the command line), ``srun`` (starts the step's tasks as local processes with
SLURM_PROCID/LOCALID/NODEID, waits, kills the rest and fails when one fails) and ``scontrol`` (``show
hostnames`` → localhost; ``requeue`` recorded) first on PATH. CPU ranks (the scripts' fallback sets
DS_ACCELERATOR=cpu), one intra-op thread each, the tiny model, a few steps."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hellm_ds.train.finetune import ADAPTER_NAME, RESULTS_NAME
from hellm_ds.utils.net import free_port
from tests.train.common import FAST, log

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "launch" / "slurm"
# one 2-step epoch without evaluation; partitioning reports show each rank's share of the ZeRO-3 world
TINY = [*FAST, "--steps-per-epoch", "2", "--skip-eval", "--report-partitioning"]

FAKE_SRUN = """\
#!{python}
import json, os, subprocess, sys, time
argv = sys.argv[1:]
opts = {{}}
while argv and argv[0].startswith("-"):
    k, _, v = argv.pop(0).partition("=")
    opts[k] = v
n = int(opts.get("--ntasks") or os.environ["SLURM_NTASKS"])
per_node = int(opts.get("--ntasks-per-node") or n)
with open(os.environ["FAKE_SLURM_CALLS"], "a") as f:
    f.write(json.dumps({{"srun": sys.argv[1:]}}) + "\\n")
procs = []
for i in range(n):
    env = dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i % per_node),
               SLURM_NODEID=str(i // per_node), SLURM_NTASKS=str(n), SLURM_STEP_NUM_TASKS=str(n),
               SLURM_STEPID="0")
    procs.append(subprocess.Popen(argv, env=env))
rc = 0
while procs:
    for p in list(procs):
        r = p.poll()
        if r is None:
            continue
        procs.remove(p)
        if r != 0 and rc == 0:
            rc = r
            for q in procs:  # --kill-on-bad-exit
                q.kill()
    time.sleep(0.1)
sys.exit(rc)
"""

FAKE_SCONTROL = """\
#!/usr/bin/env bash
set -euo pipefail
if [[ "$1 $2" == "show hostnames" ]]; then echo localhost; exit 0; fi
if [[ "$1" == requeue ]]; then echo "{\\"requeue\\": \\"$2\\"}" >> "$FAKE_SLURM_CALLS"; exit 0; fi
echo "fake scontrol: unsupported: $*" >&2; exit 1
"""

FAKE_SBATCH = """\
#!{python}
import os, subprocess, sys
argv = sys.argv[1:]
cli = []
while argv and argv[0].startswith("-"):
    cli.append(argv.pop(0))
script, args = argv[0], argv[1:]
opts = {{}}
for line in open(script):
    if line.startswith("#SBATCH"):
        for tok in line.split()[1:]:
            k, _, v = tok.partition("=")
            opts[k] = v
    elif line.strip() and not line.startswith("#"):
        break  # sbatch reads #SBATCH lines up to the first command
for tok in cli:
    k, _, v = tok.partition("=")
    opts[k] = v
counter = os.path.join(os.environ["FAKE_SLURM_DIR"], "next_job_id")
jid = int(open(counter).read()) if os.path.exists(counter) else 1000
open(counter, "w").write(str(jid + 1))
name = opts.get("--job-name", os.path.basename(script))
nodes, per_node = int(opts.get("--nodes", 1)), int(opts.get("--ntasks-per-node", 1))
env = dict(os.environ, SLURM_JOB_ID=str(jid), SLURM_JOB_NAME=name, SLURM_NNODES=str(nodes),
           SLURM_JOB_NUM_NODES=str(nodes), SLURM_NTASKS=str(nodes * per_node),
           SLURM_NTASKS_PER_NODE=str(per_node),
           SLURM_CPUS_PER_TASK=opts.get("--cpus-per-task", "1"), SLURM_JOB_NODELIST="localhost",
           SLURM_SUBMIT_DIR=os.getcwd())
out = opts.get("--output", "slurm-%j.out").replace("%x", name).replace("%j", str(jid))
out = os.path.join(os.getcwd(), out)
if not os.path.isdir(os.path.dirname(out)):
    sys.exit(f"sbatch: output directory {{os.path.dirname(out)}} does not exist (Slurm does not create it)")
with open(out, "a") as f:
    rc = subprocess.run(["bash", script, *args], stdout=f, stderr=subprocess.STDOUT, env=env).returncode
print(jid, out)
sys.exit(rc)
"""


class FakeSlurm:
    def __init__(self, root: Path):
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("sbatch", FAKE_SBATCH)):
            p = self.bin / name
            p.write_text(text.format(python=sys.executable) if name != "scontrol" else text)
            p.chmod(0o755)
        self.calls_file = root / "calls.jsonl"

    def env(self, submit: Path, **variables) -> dict:
        drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES")
        env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
        venv = Path(sys.prefix)
        path = os.pathsep.join([str(self.bin), str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update(PATH=path,
                   OMP_NUM_THREADS="1", FAKE_SLURM_DIR=str(self.root), FAKE_SLURM_CALLS=str(self.calls_file),
                   ROOT=str(ROOT), VENV=str(venv) if (venv / "bin" / "activate").is_file() else "",
                   MASTER_PORT=str(free_port()))
        env.update({k: str(v) for k, v in variables.items()})
        return env

    def submit(self, script: str, submit: Path, *sbatch_opts, check: bool = True, **variables):
        """``sbatch [opts] launch/slurm/SCRIPT`` from ``submit`` (the submit directory, where logs/ lives);
        returns (exit status, job id, the job's log text)."""
        (submit / "logs").mkdir(parents=True, exist_ok=True)
        p = subprocess.run(["sbatch", *sbatch_opts, str(SLURM / script)], cwd=submit, capture_output=True,
                           text=True, env=self.env(submit, **variables), timeout=300, check=False)
        jid, out = p.stdout.split()[:2] if p.stdout.strip() else (None, None)
        text = Path(out).read_text() if out else p.stderr
        if check and p.returncode != 0:
            raise AssertionError(f"sbatch {script}: exit {p.returncode}\n{p.stderr[-2000:]}\n{text[-6000:]}")
        return p.returncode, jid, text

    def calls(self) -> list[dict]:
        if not self.calls_file.is_file():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> FakeSlurm:
    return FakeSlurm(tmp_path_factory.mktemp("fakeslurm"))


def _finetune_vars(tables, out: Path, *extra) -> dict:
    data, graph, seq = tables
    return {"DATA": data, "GRAPH_EMB": graph, "SEQ_EMB": seq, "OUT": out, "MODEL": "tiny", "EPOCHS": 1,
            "EXTRA_ARGS": " ".join(map(str, (*TINY, *extra)))}


@pytest.fixture(scope="module")
def per_gpu_run(slurm, tables, tmp_path_factory):
    """Two submissions of finetune.sbatch in per-gpu mode (2 tasks on 1 node): the first stops after one
    optimiser step (as if preempted after its checkpoint), the second resumes and finishes."""
    submit = tmp_path_factory.mktemp("submit_pergpu")
    out = submit / "runs" / "finetune"
    opts = ("--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1")
    first = slurm.submit("finetune.sbatch", submit, *opts, **_finetune_vars(tables, out, "--max-steps", "1"))
    after_first = {"events": log(out), "latest": (out / "checkpoints" / "latest").read_text().strip(),
                   "results": (out / RESULTS_NAME).exists(),
                   "partial": (out / f"partial_{RESULTS_NAME}").exists()}
    second = slurm.submit("finetune.sbatch", submit, *opts, **_finetune_vars(tables, out))
    return {"submit": submit, "out": out, "first": first, "second": second, "after_first": after_first,
            "calls": slurm.calls()}


def test_per_gpu_ranks_join_one_world_and_requeue_resumes(per_gpu_run):
    r = per_gpu_run
    _, jid1, text1 = r["first"]
    _, _, text2 = r["second"]
    # the resolved config is echoed at the start of the job's own log file (logs/%x-%j.out)
    assert f"== hellm-finetune {jid1}" in text1 and "LAUNCH_MODE=per-gpu" in text1
    # CPU fallback (no GPU visible), ranks per node = tasks per node
    assert "DS_ACCELERATOR=cpu" in text1 and "GPUS_PER_NODE=2" in text1
    assert "RESUME=0" in text1 and "RESUME=1" in text2 and "--resume" in text2
    sruns = [c["srun"] for c in r["calls"] if "srun" in c]
    assert len(sruns) == 2
    assert "--ntasks=2" in sruns[0] and "--ntasks-per-node=2" in sruns[0]
    assert sruns[0][sruns[0].index("bash") + 1].endswith("launch/slurm/task.sh")

    # first job: both tasks joined one world of two, one step, checkpoint, no final results
    first = r["after_first"]
    start = [e for e in first["events"] if e["event"] == "start"]
    assert len(start) == 1 and start[0]["world_size"] == 2 and start[0]["zero_stage"] == 3
    assert first["latest"] == "step1" and first["partial"] and not first["results"]
    for rank in (0, 1):
        rep = json.loads((r["out"] / "partitioning" / f"rank{rank}.json").read_text())
        assert rep["rank"] == rank and rep["world_size"] == 2

    # second job: resumed from step 1, ran step 2 only, finished and exported
    events = log(r["out"])
    resume = [e for e in events if e["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == 1 and resume[0]["tag"] == "step1"
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2]
    assert [e["world_size"] for e in events if e["event"] in ("start", "resume")] == [2, 2]
    res = json.loads((r["out"] / RESULTS_NAME).read_text())
    assert res["world_size"] == 2 and res["global_step"] == 2 and res["stop_reason"] == "epochs"
    assert (r["out"] / ADAPTER_NAME).is_file()
    assert (r["out"] / "checkpoints" / "latest").read_text().strip() == "step2-end"


def test_evaluate_sbatch(slurm, per_gpu_run, tables):
    submit = per_gpu_run["submit"]
    _, jid, text = slurm.submit("evaluate.sbatch", submit, OUT=per_gpu_run["out"], DATA=tables[0],
                                BATCH_SIZE=200)
    result = submit / "logs" / f"hellm-evaluate-{jid}.json"
    assert f"== metrics in {result}" in text
    got = json.loads(result.read_text())
    assert set(got) == {"valid", "test", "ties"} and got["ties"] == "expected"
    for split in (got["valid"], got["test"]):
        assert set(split) == {"paper", "filtered"} and 0.0 <= split["paper"]["NDCG@10"] <= 1.0
    assert not list((submit / "logs").glob("*.tmp"))


def test_per_node_torchrun(slurm, tables, tmp_path):
    """LAUNCH_MODE=per-node: one srun task on the one node runs torchrun with two workers (c10d rendezvous
    at MASTER_ADDR:MASTER_PORT); they form one world of two."""
    out = tmp_path / "run"
    n0 = len(slurm.calls())
    _, _, text = slurm.submit("finetune.sbatch", tmp_path, "--nodes=1", "--ntasks-per-node=2",
                              "--cpus-per-task=1", LAUNCH_MODE="per-node", **_finetune_vars(tables, out))
    assert "LAUNCH_MODE=per-node" in text and "RESUME=0" in text
    (srun,) = [c["srun"] for c in slurm.calls()[n0:] if "srun" in c]
    assert "--ntasks=1" in srun and "--ntasks-per-node=1" in srun and "--torchrun" in srun
    for rank in (0, 1):
        rep = json.loads((out / "partitioning" / f"rank{rank}.json").read_text())
        assert rep["rank"] == rank and rep["world_size"] == 2
    assert [e["world_size"] for e in log(out) if e["event"] == "start"] == [2]
    res = json.loads((out / RESULTS_NAME).read_text())
    assert res["world_size"] == 2 and res["global_step"] == 2
    assert (out / ADAPTER_NAME).is_file()


def test_finetune_failures_propagate(slurm, tables, tmp_path):
    opts = ("--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1")
    rc, _, text = slurm.submit("finetune.sbatch", tmp_path, *opts, check=False, LAUNCH_MODE="per-task",
                               **_finetune_vars(tables, tmp_path / "a"))
    assert rc == 2 and "LAUNCH_MODE must be per-gpu or per-node" in text
    rc, _, text = slurm.submit("finetune.sbatch", tmp_path, *opts, check=False,
                               **{**_finetune_vars(tables, tmp_path / "b"), "SEQ_EMB": tmp_path / "none"})
    assert rc == 2 and f"missing input: {tmp_path / 'none'}" in text
    # a rank that fails (a bad flag: argparse exits 2 in both tasks) fails the step and the job
    rc, _, text = slurm.submit("finetune.sbatch", tmp_path, *opts, check=False,
                               **_finetune_vars(tables, tmp_path / "c", "--no-such-flag"))
    assert rc == 2 and "unrecognized arguments: --no-such-flag" in text


def test_pretrain_graph_sbatch_resumes_and_skips(slurm, synth_dir, tmp_path):
    graph_args = "--epochs 1 --dim 8 --batch-size 1024 --knn-k 3"
    seq_args = "--epochs 1 --dim 8 --max-len 10 --batch-size 256 --eval-every 1"
    vars_ = {"DATA": synth_dir, "RUN": tmp_path / "run", "GRAPH_ARGS": graph_args, "SEQ_ARGS": seq_args}
    _, _, text = slurm.submit("pretrain_graph.sbatch", tmp_path, **vars_)
    stage1 = tmp_path / "run" / "stage1"
    graph = stage1 / "graph" / "graph_embeddings.safetensors"
    seq = stage1 / "seq" / "sequential_item_embeddings.safetensors"
    assert graph.is_file() and seq.is_file() and "== stage 1 done" in text
    assert "--resume" not in text

    # as if the job had been requeued after the graph stage's checkpoint but before its export: the graph
    # stage resumes (one more epoch), the finished SASRec stage is skipped
    graph.unlink()
    _, _, text = slurm.submit("pretrain_graph.sbatch", tmp_path,
                              **{**vars_, "GRAPH_ARGS": graph_args.replace("--epochs 1", "--epochs 2")})
    assert "pretrain-graph" in text and "--resume" in text
    assert "sequential_item_embeddings.safetensors exists, skipped" in text
    events = [json.loads(line) for line in (stage1 / "graph" / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e["event"] in ("resume", "epoch")] == ["epoch", "resume", "epoch"]
    assert graph.is_file()


def test_requeue_on_usr1_only_after_progress(slurm, tmp_path):
    """common.sh's hellm_run: USR1 to the batch shell requeues the job (scontrol requeue) when a watched
    checkpoint changed since the start, does nothing otherwise; the command keeps running either way and its
    exit status is returned."""
    ckpt, ready = tmp_path / "latest", tmp_path / "ready"
    script = textwrap.dedent(f"""\
        set -euo pipefail
        . {SLURM / 'common.sh'}
        HELLM_WATCH=("{ckpt}")
        hellm_run bash -c 'if [[ "$WRITE" == 1 ]]; then echo step5 > {ckpt}; fi
                           touch {ready}; sleep 2; exit 7'
        """)
    for write, requeued in (("0", False), ("1", True)):
        ready.unlink(missing_ok=True)
        n0 = len(slurm.calls())
        env = slurm.env(tmp_path, SLURM_JOB_ID="77", WRITE=write)
        p = subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        t0 = time.time()
        while not ready.exists() and time.time() - t0 < 30:
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(p.pid, signal.SIGUSR1)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 7, err
        got = [c for c in slurm.calls()[n0:] if "requeue" in c]
        if requeued:
            assert got == [{"requeue": "77"}] and "requeueing job 77" in err
        else:
            assert got == [] and "no new checkpoint since the job started; not requeueing" in err
