#!/usr/bin/env python3
"""Two-node fault drill: ZeRO-3 fine-tuning on two "nodes" with separate network stacks, one node's worker
killed mid-run, both resumed with ``--resume``, compared with an uninterrupted two-node run.

Needs root (network namespaces) and iproute2 + util-linux (``ip``, ``unshare``). Run from the checkout::

    sudo .venv/bin/python launch/two_node_drill.py --workdir /tmp/drill            # both modes, compared
    sudo .venv/bin/python launch/two_node_drill.py --mode uninterrupted --workdir /tmp/drill
    sudo .venv/bin/python launch/two_node_drill.py --mode kill --workdir /tmp/drill \
        [--reference /tmp/drill/reference]

What it builds (everything named ``hellm-drill-<id>-…``, ``<id>`` = this process's pid unless ``--tag``):

- two network namespaces, ``hellm-drill-<id>-a`` (node 0) and ``-b`` (node 1), each with ``lo`` up and one end
  of a veth pair (``hd<id>a`` / ``hd<id>b``) carrying 10.213.X.1/30 and 10.213.X.2/30 (X picked so that the
  /30 overlaps none of the host's addresses or routes). There is no other interface and no route out:
  the drill's traffic can only go between those two addresses.
- a hostname per node: each node process runs in its own UTS namespace named like its network namespace,
  and ``/etc/netns/<ns>/hosts`` (which ``ip netns exec`` mounts over ``/etc/hosts``) resolves both node
  names to their veth addresses — as on a real cluster, where torchrun's c10d rendezvous decides which node
  hosts the store by matching the endpoint against the node's own hostname/addresses, and node 0 announces
  itself to the workers by its hostname.
- per node, the SLURM ``per-node`` mode's command line (``launch/slurm/task.sh --torchrun``)::

      torchrun --nnodes 2 --node_rank R --nproc_per_node 1 --rdzv_backend c10d \
          --rdzv_endpoint <node-0 hostname>:29400 --rdzv_id <job id> launch/finetune.py ... --out SHARED

  with ``GLOO_SOCKET_IFNAME=<the node's veth>``, ``DS_ACCELERATOR=cpu``, ``OMP_NUM_THREADS=1``, ZeRO-3
  (``ds_configs/zero3.json``), a tiny model on tiny synthetic data (made in ``WORKDIR/inputs`` unless
  ``--data/--graph-emb/--seq-emb`` are given) and ``--out`` in WORKDIR, which both nodes see.

Modes: ``uninterrupted`` runs the job to completion (``WORKDIR/reference``); ``kill`` starts the job
(``WORKDIR/drill``), waits for checkpoint ``step<K>`` (``--kill-after``) plus one more training step, SIGKILLs
node 1's *worker* (the python child of torchrun, not torchrun; ``--victim-node 0`` kills node 0's instead),
measures how long the other node's worker and both torchruns take to exit, then relaunches both nodes with
``--resume`` and runs to completion; ``both`` (default) does both and compares: the drilled run's per-step
losses (before the kill and after the resume), its metrics and exported adapter against the uninterrupted
run's — reported bit for bit and against the tolerances of tests/train/test_fault_drill.py (losses rel 1e-5,
adapter abs 1e-6, metrics rel 1e-6).

Prints a JSON summary (also written to ``WORKDIR/summary.json``); exit status 0 when every check passed,
1 when one failed, 2 on a usage error, 3 when the environment cannot run it (not root, no namespaces),
4 on a timeout (``--timeout``, the whole drill). Whatever happens, the namespaces, links and hosts files it
made are deleted and every process it started is killed before it exits (SIGINT/SIGTERM included);
``--cleanup TAG`` removes what a SIGKILLed drill left behind.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "finetune.py"
ZERO3 = ROOT / "ds_configs" / "zero3.json"
PREFIX = "hellm-drill"
LINK_PREFIX = "hd"
RDZV_PORT = 29400  # inside the drill's own namespaces: nothing else listens there
# the tiny run: 1 epoch of 6 steps, checkpoints every 2 (step2, step4, step6), validation + test at the end
RUN_ARGS = ["--model", "tiny", "--prefix-len", "3", "--lora-r", "4", "--micro-batch-size", "8", "--max-len",
            "10", "--no-progress", "--eval-batch-size", "200", "--epochs", "1", "--steps-per-epoch", "6",
            "--save-every", "2", "--lr", "1e-3", "--trainable-scope", "lora", "--item-head", "linear"]
LOSS_RTOL, ADAPTER_ATOL, METRIC_RTOL = 1e-5, 1e-6, 1e-6  # tests/train/test_fault_drill.py's
POLL = 0.02
PEER_GRACE_S = 30.0  # a node may outlive its failed peer by this much (it fails at its next collective)
DROP_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
            "MASTER_PORT", "LOCAL_SIZE", "TORCHELASTIC_RUN_ID", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


class DrillError(RuntimeError):
    """A step of the drill failed (the message says which); the summary records it."""


class DrillTimeout(BaseException):
    """The whole drill ran past --timeout (raised from SIGALRM; a BaseException so no handler swallows it)."""


class Interrupted(BaseException):
    """SIGTERM/SIGINT: clean up and leave."""


def log(msg: str) -> None:
    print(f"[drill {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise DrillError(f"`{' '.join(cmd)}` failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


# ---- environment ------------------------------------------------------------------------------------------
def preflight() -> str | None:
    """Why this machine cannot run the drill (None: it can): root, ``ip``, ``unshare``, and an actual
    ``ip netns add`` (a container without CAP_SYS_ADMIN / unshare permission refuses it)."""
    if os.geteuid() != 0:
        return f"not root (euid {os.geteuid()}): creating network namespaces needs root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (iproute2 / util-linux)"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    try:
        p = sh("ip", "netns", "add", probe, check=False)
        if p.returncode != 0:
            return f"`ip netns add` failed: {p.stderr.strip()}"
        p = sh("ip", "netns", "exec", probe, "unshare", "--uts", "true", check=False)
        if p.returncode != 0:
            return f"`unshare --uts` inside a network namespace failed: {p.stderr.strip()}"
    finally:
        sh("ip", "netns", "del", probe, check=False)
    return None


def _host_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the host's routes (all tables) and addresses cover."""
    nets = []
    for cmd in (("ip", "-4", "-o", "route", "show", "table", "all"), ("ip", "-4", "-o", "addr", "show")):
        for line in sh(*cmd, check=False).stdout.splitlines():
            for word in line.split():
                if word[:1].isdigit() and any(c in word for c in "./"):
                    try:
                        nets.append(ipaddress.ip_network(word, strict=False))
                    except ValueError:
                        pass
    return [n for n in nets if n.version == 4 and n.prefixlen > 0]  # a default route overlaps everything


def pick_subnet(seed: int) -> ipaddress.IPv4Network:
    """A /30 in 10.213.0.0/16 that overlaps none of the host's routes or addresses."""
    used = _host_networks()
    for i in range(16384):
        net = ipaddress.ip_network(f"10.213.{(seed + i) % 256}.{((seed + i) // 256 % 64) * 4}/30")
        if not any(net.overlaps(u) for u in used):
            return net
    raise DrillError("no free /30 in 10.213.0.0/16")


# ---- processes via /proc ----------------------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Running (a zombie counts as gone)."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st is not None:
                kids.setdefault(int(st[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ---- the two nodes ----------------------------------------------------------------------------------------
class TwoNodes:
    """The namespaces, the veth pair, the hosts files; ``close()`` removes what ``open()`` made (idempotent,
    also after a partial ``open()``)."""

    def __init__(self, tag: str):
        self.tag = tag
        self.ns = [f"{PREFIX}-{tag}-a", f"{PREFIX}-{tag}-b"]
        self.hosts = list(self.ns)  # hostnames = namespace names
        self.links = [f"{LINK_PREFIX}{tag}a", f"{LINK_PREFIX}{tag}b"]
        if any(len(n) > 15 for n in self.links):
            raise DrillError(f"tag {tag!r} too long for an interface name")
        self.addrs: list[str] = []
        self.routes: dict[str, list[str]] = {}
        self.made_etc_netns = False
        self.subnet = None

    def open(self, seed: int) -> None:
        self.subnet = pick_subnet(seed)
        a, b = list(self.subnet.hosts())
        self.addrs = [str(a), str(b)]
        plen = self.subnet.prefixlen
        hosts = "127.0.0.1 localhost\n" + "".join(f"{ip} {h}\n" for ip, h in zip(self.addrs, self.hosts))
        for ns in self.ns:
            d = Path("/etc/netns") / ns
            if not d.parent.is_dir():
                d.parent.mkdir()
                self.made_etc_netns = True
            d.mkdir(exist_ok=True)
            (d / "hosts").write_text(hosts)
            sh("ip", "netns", "add", ns)
        # created straight inside the namespaces: the pair never exists in the host's stack
        sh("ip", "link", "add", self.links[0], "netns", self.ns[0], "type", "veth", "peer", "name",
           self.links[1], "netns", self.ns[1])
        for ns, link, ip in zip(self.ns, self.links, self.addrs):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "addr", "add", f"{ip}/{plen}", "dev", link)
            sh("ip", "-n", ns, "link", "set", link, "up")
        for ns in self.ns:  # IPv4 only: no link-local IPv6 address either (best effort)
            sh("ip", "netns", "exec", ns, "sh", "-c", "for f in /proc/sys/net/ipv6/conf/*/disable_ipv6; do "
               'echo 1 > "$f"; done', check=False)
        self.routes = {ns: [r.strip() for r in sh("ip", "-n", ns, "route", "show", "table", "all").stdout
                            .splitlines() if r.strip()] for ns in self.ns}
        for ns, routes in self.routes.items():  # the /30 and its own local addresses, nothing else
            for r in routes:
                typed = r.startswith(("local", "broadcast", "multicast", "anycast"))
                dest = ipaddress.ip_network(r.split()[1] if typed else r.split()[0], strict=False)
                if not (dest.version == 4 and (dest.subnet_of(self.subnet) or dest.is_loopback)):
                    raise DrillError(f"{ns} routes somewhere else: {r!r}")
        log(f"nodes: {self.hosts[0]} {self.addrs[0]} ({self.links[0]}) <-> {self.hosts[1]} {self.addrs[1]} "
            f"({self.links[1]})")

    def close(self) -> list[str]:
        """Kill whatever still runs in the namespaces, delete them (and the veth pair with them), any link of
        ours left in the host's namespace, and the hosts files. The problems met (an empty list: none)."""
        return cleanup(self.tag, rmdir_etc_netns=self.made_etc_netns)


def resources(tag: str | None = None) -> dict[str, list[str]]:
    """The drill's namespaces / host-side links / /etc/netns dirs now present (of one tag, or of any)."""
    stem = f"{PREFIX}-{tag}-" if tag else f"{PREFIX}-"
    lstem = f"{LINK_PREFIX}{tag}" if tag else None
    listed = sh("ip", "netns", "list", check=False).stdout.splitlines()
    ns = [line.split()[0] for line in listed if line.split()]
    links = []
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if lstem and name.startswith(lstem) and name[len(lstem):] in ("a", "b"):
            links.append(name)
    etc = Path("/etc/netns")
    dirs = [d.name for d in etc.iterdir()] if etc.is_dir() else []
    return {"netns": [n for n in ns if n.startswith(stem)], "links": links,
            "etc_netns": [d for d in dirs if d.startswith(stem)]}


def cleanup(tag: str, rmdir_etc_netns: bool = False) -> list[str]:
    problems = []
    found = resources(tag)
    for ns in found["netns"]:
        for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
            kill(int(pid))
    for ns in found["netns"]:
        for _ in range(50):  # a process being killed may still hold it for a moment
            p = sh("ip", "netns", "del", ns, check=False)
            if p.returncode == 0 or ns not in resources(tag)["netns"]:
                break
            time.sleep(0.1)
        else:
            problems.append(f"ip netns del {ns}: {p.stderr.strip()}")
    for link in resources(tag)["links"]:
        p = sh("ip", "link", "del", link, check=False)
        if p.returncode != 0 and link in resources(tag)["links"]:
            problems.append(f"ip link del {link}: {p.stderr.strip()}")
    for d in found["etc_netns"]:
        shutil.rmtree(Path("/etc/netns") / d, ignore_errors=True)
    if rmdir_etc_netns:  # this drill made /etc/netns: remove it when nothing else is in it
        try:
            Path("/etc/netns").rmdir()
        except OSError:
            pass
    left = resources(tag)
    if any(left.values()):
        problems.append(f"left behind: {left}")
    return problems


def torchrun() -> list[str]:
    """The venv's ``torchrun`` (what task.sh runs), else the same entry point via ``python -m``."""
    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]


class Node:
    """One node's torchrun, started in its namespace (own UTS namespace with the node's hostname)."""

    def __init__(self, nodes: TwoNodes, rank: int, job: str, out: Path, run_args: list[str], console: Path):
        self.rank = rank
        env = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=nodes.links[rank],
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels")]), PYTHONUNBUFFERED="1")
        self.torchrun = [*torchrun(), "--nnodes", "2",
                         "--node_rank", str(rank), "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                         "--rdzv_endpoint", f"{nodes.hosts[0]}:{RDZV_PORT}", "--rdzv_id", job,
                         str(LAUNCH), *run_args, "--out", str(out)]
        cmd = ["ip", "netns", "exec", nodes.ns[rank], "unshare", "--uts", "--", "sh", "-c",
               'hostname "$0" && exec "$@"', nodes.hosts[rank], *self.torchrun]
        self.console = console
        self._f = console.open("w")
        self.t0 = time.monotonic()
        # ip netns exec, unshare and sh all exec: this pid becomes torchrun's
        self.p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._f, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        self.known: set[int] = set()
        self.t_exit: float | None = None

    def poll(self) -> int | None:
        rc = self.p.poll()
        if rc is not None and self.t_exit is None:
            self.t_exit = time.monotonic()
        return rc

    def workers(self) -> list[int]:
        """torchrun's worker processes (they run launch/finetune.py; torchrun starts each in its own
        session, so the node's process group does not hold them)."""
        d = descendants(self.p.pid)
        self.known.update(d)
        return [p for p in d if str(LAUNCH) in cmdline(p)[:3]]  # python [-u] launch/finetune.py ...

    def tail(self, n: int = 4000) -> str:
        self._f.flush()
        return self.console.read_text(errors="replace")[-n:]

    def close(self) -> None:
        stray = self.known | set(descendants(self.p.pid))
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in stray:  # the workers' own sessions; only processes that are still ours (no recycled pid)
            if any(str(LAUNCH) in a or "torch" in a for a in cmdline(pid)):
                kill(pid)
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.poll()
        self._f.close()


def _exit_abort(job) -> str:
    """A note when a worker aborted after the run had finished (its result logged)."""
    done = any(r.get("event") == "result" for r in events(job.out))
    aborted = [n.rank for n in job.nodes if "terminate called" in n.tail(200000)]
    if done and aborted:
        return (f" (the run had finished — result logged — when node {aborted}'s worker aborted in C++ "
                f"'terminate called ...': a crash at process exit)")
    return ""


class Job:
    """Both nodes of one launch."""

    def __init__(self, nodes: TwoNodes, name: str, out: Path, run_args: list[str], workdir: Path):
        job = f"{name}-{os.getpid()}-{int(time.time())}"
        self.name, self.out = name, out
        self.nodes = [Node(nodes, r, job, out, run_args, workdir / f"{name}.node{r}.console.txt")
                      for r in range(2)]
        log(f"{name}: started ({' '.join(self.nodes[0].torchrun[:14])} ...)")

    def wait(self, deadline: float, grace: float = PEER_GRACE_S) -> list[int]:
        """Both exit codes. Once one node has failed, the other gets ``grace`` seconds: torchrun's exit
        barrier would keep a node whose worker succeeded waiting 300 s for a peer whose worker failed."""
        failed_at = None
        while any(n.poll() is None for n in self.nodes):
            for n in self.nodes:
                n.workers()
            now = time.monotonic()
            if failed_at is None and any(n.poll() not in (None, 0) for n in self.nodes):
                failed_at = now
            if failed_at is not None and now - failed_at > grace:
                rcs = [n.poll() for n in self.nodes]
                raise DrillError(f"{self.name}: exit codes {rcs}: a node failed and the other still runs "
                                 f"{grace:.0f} s later{_exit_abort(self)}\n{self.tails()}")
            if now > deadline:
                raise DrillError(f"{self.name}: still running at the deadline\n{self.tails()}")
            time.sleep(0.2)
        rcs = [n.p.returncode for n in self.nodes]
        if rcs != [0, 0]:
            raise DrillError(f"{self.name}: exit codes {rcs}{_exit_abort(self)}\n{self.tails()}")
        return rcs

    def tails(self, n: int = 3000) -> str:
        return "\n".join(f"--- node {x.rank} ({x.console}) ---\n{x.tail(n)}" for x in self.nodes)

    def close(self) -> None:
        for n in self.nodes:
            n.close()


# ---- run outputs ------------------------------------------------------------------------------------------
def events(out: Path) -> list[dict]:
    try:
        lines = (out / "log.jsonl").read_text().splitlines()
    except OSError:
        return []
    ev = []
    for line in lines:
        try:
            ev.append(json.loads(line))
        except json.JSONDecodeError:  # the line being appended
            break
    return ev


def run_summary(out: Path) -> dict:
    res = out / "results.json"
    ev = events(out)
    train = [r for r in ev if r.get("event") == "train"]
    return {"out": str(out), "steps": [r["step"] for r in train],
            "final_loss": train[-1]["loss"] if train else None,
            "results": json.loads(res.read_text()) if res.is_file() else None}


def compare(ref: Path, drill: Path) -> dict:
    """The drilled run against the uninterrupted one: every logged step's loss (the drilled run logs the
    steps before the kill, then from the resumed checkpoint on — the re-done steps are compared too),
    results.json's metrics, and the exported adapter tensor by tensor."""
    import torch
    from safetensors.torch import load_file

    cmp: dict = {}
    ref_loss = {r["step"]: r["loss"] for r in events(ref) if r.get("event") == "train"}
    ev = events(drill)
    resumes = [i for i, r in enumerate(ev) if r.get("event") == "resume"]
    cmp["resume_events"] = [ev[i] for i in resumes]
    train = [r for r in ev if r.get("event") == "train"]
    after = [r for r in ev[resumes[0]:] if r.get("event") == "train"] if resumes else []
    cmp["steps_after_resume"] = [r["step"] for r in after]
    missing = sorted(set(ref_loss) - {r["step"] for r in train})
    worst, exact = 0.0, True
    for r in train:
        a = ref_loss.get(r["step"])
        if a is None:
            missing.append(f"extra step {r['step']}")
            continue
        exact &= r["loss"] == a
        worst = max(worst, abs(r["loss"] - a) / max(abs(a), 1e-30))
    cmp["loss"] = {"compared": len(train), "bit_identical": exact and not missing, "max_rel_diff": worst,
                   "mismatched_steps": missing, "ok": not missing and worst <= LOSS_RTOL and bool(after)}
    # metrics
    ra, rb = ref / "results.json", drill / "results.json"
    if ra.is_file() and rb.is_file():
        a, b = json.loads(ra.read_text()), json.loads(rb.read_text())
        worst, exact, keys_ok = 0.0, True, True
        for split in ("valid", "test"):
            for proto in (a.get(split) or {}):
                ma, mb = a[split][proto], (b.get(split) or {}).get(proto, {})
                keys_ok &= ma.keys() == mb.keys()
                for k in ma.keys() & mb.keys():
                    exact &= ma[k] == mb[k]
                    worst = max(worst, abs(mb[k] - ma[k]) / max(abs(ma[k]), 1e-9))
        steps = [a.get("global_step"), b.get("global_step")]
        cmp["metrics"] = {"bit_identical": exact and keys_ok, "max_rel_diff": worst, "global_step": steps,
                          "ok": keys_ok and worst <= METRIC_RTOL and steps[0] == steps[1]}
    else:
        cmp["metrics"] = {"ok": False, "missing": [str(p) for p in (ra, rb) if not p.is_file()]}
    # adapter
    fa, fb = ref / "hellm_adapter.safetensors", drill / "hellm_adapter.safetensors"
    if fa.is_file() and fb.is_file():
        ta, tb = load_file(str(fa)), load_file(str(fb))
        worst, exact = 0.0, ta.keys() == tb.keys()
        for k in ta.keys() & tb.keys():
            if ta[k].shape != tb[k].shape or ta[k].dtype != tb[k].dtype:
                exact, worst = False, math.inf
                continue
            exact &= torch.equal(ta[k], tb[k])
            if ta[k].numel():
                worst = max(worst, float((ta[k].double() - tb[k].double()).abs().max()))
        cmp["adapter"] = {"tensors": len(ta), "bit_identical": exact, "max_abs_diff": worst,
                          "ok": ta.keys() == tb.keys() and bool(ta) and worst <= ADAPTER_ATOL}
    else:
        cmp["adapter"] = {"ok": False, "missing": [str(p) for p in (fa, fb) if not p.is_file()]}
    cmp["ok"] = all(cmp[k]["ok"] for k in ("loss", "metrics", "adapter"))
    return cmp


def make_inputs(d: Path) -> tuple[Path, Path, Path]:
    """A small synthetic dataset and random stage-1 tables (as tests/conftest.py's ``tables`` fixture)."""
    from hellm_ds.data.dataset import load_dataset
    from hellm_ds.data.synth import SynthConfig, write_random_item_tables, write_synthetic

    data = d / "data"
    if not (data / "sequences.txt").is_file():
        write_synthetic(data, SynthConfig(users=600, items=150, seed=7))
    return (data, *write_random_item_tables(load_dataset(data), d))


# ---- the drill --------------------------------------------------------------------------------------------
def run_uninterrupted(nodes: TwoNodes, out: Path, run_args: list[str], workdir: Path, deadline: float,
                      jobs: list) -> dict:
    t0 = time.monotonic()
    job = Job(nodes, out.name, out, run_args, workdir)
    jobs.append(job)
    rcs = job.wait(deadline)
    s = {"returncodes": rcs, "seconds": round(time.monotonic() - t0, 1), **run_summary(out)}
    log(f"{out.name}: exit codes {rcs} after {s['seconds']} s")
    return s


def run_kill(nodes: TwoNodes, out: Path, run_args: list[str], workdir: Path, deadline: float, jobs: list,
             kill_after: int, survivor_timeout: float, victim_node: int = 1, rep: dict | None = None) -> dict:
    """The kill mode; ``rep`` (filled as it goes, so a failure keeps what was measured) is returned."""
    rep = {} if rep is None else rep
    rep["victim_node"] = victim_node
    t0 = time.monotonic()
    job = Job(nodes, out.name, out, run_args, workdir)
    jobs.append(job)
    vn, sn = job.nodes[victim_node], job.nodes[1 - victim_node]
    tag = f"step{kill_after}"
    # -- wait for checkpoint step<K> and one further training step --
    while True:
        if any(n.poll() is not None for n in job.nodes):
            raise DrillError(f"{out.name}: a node exited ({[n.p.returncode for n in job.nodes]}) before the "
                             f"kill point (checkpoint {tag} + one step)\n{job.tails()}")
        if time.monotonic() > deadline:
            raise DrillError(f"{out.name}: no checkpoint {tag} + one step before the deadline\n{job.tails()}")
        ev = events(out)
        ck = [r for r in ev if r.get("event") == "checkpoint" and r.get("tag") == tag]
        if ck and any(r.get("event") == "train" and r["step"] > ck[0]["step"] for r in ev):
            victims, survivors = vn.workers(), sn.workers()
            if len(victims) != 1 or len(survivors) != 1:
                raise DrillError(f"workers: node {vn.rank} {victims}, node {sn.rank} {survivors}")
            victim, survivor = victims[0], survivors[0]
            kill(victim)
            t_kill = time.monotonic()
            break
        time.sleep(POLL)
    rep["killed_worker_pid"], rep["survivor_worker_pid"] = victim, survivor
    rep["kill_at_s"] = round(t_kill - t0, 1)
    rep["last_step_logged_before_kill"] = max(r["step"] for r in events(out) if r.get("event") == "train")
    log(f"{out.name}: SIGKILLed node {vn.rank}'s worker (pid {victim}) at {rep['kill_at_s']} s, after step "
        f"{rep['last_step_logged_before_kill']}")
    # -- how long until the other node's worker and both torchruns are gone --
    want = {f"node{sn.rank}_worker", f"node{sn.rank}_torchrun", f"node{vn.rank}_torchrun"}
    gone: dict[str, float] = {}
    while True:
        now = time.monotonic()
        if not alive(survivor):
            gone.setdefault(f"node{sn.rank}_worker", now)
        for n in job.nodes:
            if n.poll() is not None:
                gone.setdefault(f"node{n.rank}_torchrun", n.t_exit)
        if set(gone) == want:
            break
        if now - t_kill > survivor_timeout:
            job.close()
            raise DrillError(f"HANG: {survivor_timeout} s after the kill, still running: "
                             f"{sorted(want - set(gone))}\n{job.tails()}")
        time.sleep(POLL / 5)
    rep["exit_after_kill_s"] = {k: round(v - t_kill, 3) for k, v in sorted(gone.items())}
    # the surviving node entirely gone (its worker and its torchrun)
    rep["survivor_exit_s"] = round(max(v for k, v in gone.items() if k.startswith(f"node{sn.rank}_"))
                                   - t_kill, 3)
    rep["all_gone_s"] = round(max(gone.values()) - t_kill, 3)
    rep["returncodes"] = [n.p.returncode for n in job.nodes]
    tail = sn.tail(20000)
    seen = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timeout",
            "SIGTERM", "RendezvousConnectionError")
    rep["survivor_saw"] = next((m for m in seen if m in tail), None)
    log(f"{out.name}: gone after the kill (s): {rep['exit_after_kill_s']}; exit codes {rep['returncodes']}")
    if 0 in rep["returncodes"]:
        raise DrillError(f"a node exited 0 after the kill: {rep['returncodes']}\n{job.tails()}")
    latest = out / "checkpoints" / "latest"
    rep["latest_after_kill"] = latest.read_text().strip() if latest.is_file() else None
    rep["interrupted_seconds"] = round(time.monotonic() - t0, 1)
    # -- resume both nodes --
    t1 = time.monotonic()
    job2 = Job(nodes, out.name + "-resume", out, [*run_args, "--resume"], workdir)
    jobs.append(job2)
    rcs = job2.wait(deadline)
    rep["resume"] = {"returncodes": rcs, "seconds": round(time.monotonic() - t1, 1)}
    log(f"{out.name}: resumed run exit codes {rcs} after {rep['resume']['seconds']} s")
    rep.update(run_summary(out))
    return rep


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("both", "uninterrupted", "kill"), default="both")
    p.add_argument("--workdir", type=Path, help="where the runs, consoles and summary.json go (seen by both "
                                                "nodes); required unless --cleanup/--preflight")
    p.add_argument("--data", type=Path)
    p.add_argument("--graph-emb", type=Path)
    p.add_argument("--seq-emb", type=Path)
    p.add_argument("--reference", type=Path, help="--mode kill: compare with this uninterrupted run's --out")
    p.add_argument("--kill-after", type=int, default=2,
                   help="kill once checkpoint step<K> + one more step is logged")
    p.add_argument("--victim-node", type=int, choices=(0, 1), default=1,
                   help="whose worker is killed: 1 (default) or 0, the node that hosts the rendezvous store")
    p.add_argument("--survivor-timeout", type=float, default=120.0,
                   help="seconds the other node may take to exit after the kill before it counts as a hang")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds for the whole drill")
    p.add_argument("--tag", help="name stem of the namespaces/links (default: this pid)")
    p.add_argument("--fail-after-setup", action="store_true",
                   help="raise right after the network is set up (exercises the clean-up path)")
    p.add_argument("--cleanup", metavar="TAG", help="only remove what a drill with this tag left behind")
    p.add_argument("--preflight", action="store_true", help="only say whether this machine can run it")
    p.add_argument("extra", nargs="*", help="more launch/finetune.py flags (after --)")
    a = p.parse_args(argv)
    if not (a.cleanup or a.preflight) and a.workdir is None:
        p.error("--workdir is required")
    given = (a.data, a.graph_emb, a.seq_emb)
    if any(x is not None for x in given) and None in given:
        p.error("--data, --graph-emb and --seq-emb go together")
    return a


def _raise(exc):
    def handler(signum, frame):
        raise exc(f"signal {signum}")
    return handler


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.cleanup:
        problems = cleanup(a.cleanup, rmdir_etc_netns=True)
        print(json.dumps({"cleanup": a.cleanup, "problems": problems}))
        return 1 if problems else 0
    reason = preflight()
    if a.preflight or reason:
        print(json.dumps({"can_run": reason is None, "reason": reason}))
        return 3 if reason else 0
    tag = a.tag or str(os.getpid())
    workdir = a.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"mode": a.mode, "tag": tag, "workdir": str(workdir), "ok": False}
    t0 = time.monotonic()
    deadline = t0 + a.timeout
    nodes = TwoNodes(tag)
    jobs: list[Job] = []
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)}
    signal.signal(signal.SIGTERM, _raise(Interrupted))
    signal.signal(signal.SIGINT, _raise(Interrupted))
    signal.signal(signal.SIGALRM, _raise(DrillTimeout))
    signal.alarm(int(math.ceil(a.timeout)) + 5)  # a backstop: every wait below also checks the deadline
    rc = 1
    try:
        if a.data is None:
            data, graph, seq = make_inputs(workdir / "inputs")
        else:
            data, graph, seq = a.data.resolve(), a.graph_emb.resolve(), a.seq_emb.resolve()
        run_args = [*RUN_ARGS, "--data", str(data), "--graph-emb", str(graph), "--seq-emb", str(seq),
                    "--deepspeed_config", str(ZERO3), *a.extra]
        nodes.open(seed=os.getpid())
        summary["network"] = {"namespaces": nodes.ns, "links": nodes.links, "addresses": nodes.addrs,
                              "subnet": str(nodes.subnet), "routes": nodes.routes,
                              "rdzv_endpoint": f"{nodes.hosts[0]}:{RDZV_PORT}"}
        if a.fail_after_setup:
            raise DrillError("--fail-after-setup: failing on purpose")
        ref, drill = workdir / "reference", workdir / "drill"
        for d in ((ref,) if a.mode == "uninterrupted" else (drill,) if a.mode == "kill" else (ref, drill)):
            if d.exists():
                shutil.rmtree(d)
        if a.mode in ("both", "uninterrupted"):
            summary["uninterrupted"] = run_uninterrupted(nodes, ref, run_args, workdir, deadline, jobs)
        if a.mode in ("both", "kill"):
            summary["kill"] = {}
            run_kill(nodes, drill, run_args, workdir, deadline, jobs, a.kill_after, a.survivor_timeout,
                     a.victim_node, rep=summary["kill"])
            against = ref if a.mode == "both" else a.reference
            if against is not None:
                summary["comparison"] = compare(against, drill)
        summary["ok"] = summary.get("comparison", {}).get("ok", True)
        rc = 0 if summary["ok"] else 1
    except DrillTimeout:
        summary["error"] = f"timeout: the drill ran past --timeout {a.timeout} s"
        rc = 4
    except Interrupted as e:
        summary["error"] = f"interrupted ({e})"
        rc = 1
    except DrillError as e:
        summary["error"] = str(e)
        rc = 1
    except Exception as e:  # noqa: BLE001 — recorded in the summary; the clean-up below still runs
        summary["error"] = f"{type(e).__name__}: {e}"
        rc = 1
    finally:
        signal.alarm(0)
        for s in old:  # a second SIGTERM/SIGINT must not cut the clean-up short
            signal.signal(s, signal.SIG_IGN)
        for job in jobs:
            job.close()
        summary["cleanup_problems"] = nodes.close()
        summary["left_behind"] = resources(tag)
        for s, h in old.items():
            signal.signal(s, h)
        summary["seconds"] = round(time.monotonic() - t0, 1)
        if summary["cleanup_problems"]:
            rc = rc or 1
        (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary, indent=1))
    return rc


if __name__ == "__main__":
    # not pip-installed: this script's folder (launch/) is on sys.path, the checkout is not
    for src in (ROOT, ROOT / "kernels"):
        if str(src) not in sys.path:
            sys.path.append(str(src))
    sys.exit(main())
