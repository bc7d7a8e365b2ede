"""Launching stage 2 from Python (the pipeline's fine-tuning stage): the DeepSpeed launcher with one rank per
GPU (or ``ranks`` CPU ranks with ``DS_ACCELERATOR=cpu``), or one plain process, its output teed to a log."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from hellm_ds.errors import UsageError
from hellm_ds.utils.net import free_port


def launch_finetune(argv: list[str], ranks: int, log_path: Path, verbose: bool = False,
                    say: Callable[[str], None] = print) -> None:
    """``deepspeed --num_gpus ranks --module hellm_ds.train ARGV`` (CPU: DS_ACCELERATOR=cpu, gloo), or one
    plain process for a single rank. The children's output all goes to ``log_path``; to stderr too, except
    DeepSpeed's launcher chatter unless ``verbose`` (``launcher_line_shown``). ``say`` announces the launch."""
    import torch

    from hellm_ds.utils.verbosity import launcher_line_shown

    env = dict(os.environ)
    cuda = torch.cuda.is_available()
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # a fresh world, whatever launched us
    if ranks == 1:
        cmd = [sys.executable, "-m", "hellm_ds.train", *argv]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
               str(free_port()), "--module", "hellm_ds.train", *argv]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    say("launch: " + " ".join(cmd[1:4] + ["…"]) + f" ({ranks} rank{'s' if ranks > 1 else ''}, "
         f"{'GPU' if cuda else 'CPU'}; log {log_path})")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):  # tee: epoch lines and errors stay visible, all is kept
            log.write(line)
            text = line.decode(errors="replace")
            if launcher_line_shown(text, verbose):
                sys.stderr.write(text)
        rc = proc.wait()
    if rc != 0:
        raise UsageError(f"fine-tuning exited with status {rc}; see {log_path}")
