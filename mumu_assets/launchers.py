"""Engines that start torchrun on every node of a training run, and the shared-folder Pipes reader.

Three backends, one contract: run `torchrun ... -m mumu_model.training ...` once per node with
the Dagster Pipes environment, wait for the end, return the exit status, and stop every rank
when Dagster cancels the run.

- local: agents as subprocesses of this process, each in a process group of its own.
- slurm: an sbatch script (one `srun` step, one torchrun agent per node), `sbatch --wait`.
- kubernetes: an Indexed Job plus a headless Service (one pod per node), `kubectl`.

Pipes messages travel through a file on storage every node mounts at the same path, so the
materialization arrives whichever host global rank 0 lands on.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

# torchrun's errors when no rendezvous partner answers (c10d store or join timeout).
RENDEZVOUS_ERRORS = ("RendezvousTimeoutError", "RendezvousConnectionError", "DistNetworkError",
                     "RendezvousClosedError")
KILL_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _restart_flags(max_restarts: int, shutdown_timeout_s: int) -> list[str]:
    """torchrun's restart and shutdown flags; none where torchrun's defaults hold (0)."""
    return ([f"--max-restarts={max_restarts}"] if max_restarts else []) + (
        [f"--shutdown_timeout={shutdown_timeout_s}"] if shutdown_timeout_s else [])


def torchrun_flags(*, nnodes: int, nproc_per_node: int, rdzv_endpoint: str, rdzv_id: str,
                   rdzv_timeout_s: int, node_rank: str | None = None, rdzv_host: bool | None = None,
                   max_restarts: int = 0, shutdown_timeout_s: int = 0) -> list[str]:
    """torchrun's flags: `--standalone` on one node, else a c10d rendezvous at `rdzv_endpoint`
    that gives up after `rdzv_timeout_s` when the other nodes (or the store) never answer.
    `rdzv_host`: whether these agents may host the rendezvous store (None: torchrun decides from
    the endpoint's address; False: only connect, the store runs elsewhere). `max_restarts`: how
    often torchrun restarts a failed worker group in place (the trainer resumes its checkpoint);
    `shutdown_timeout_s` (0: torchrun's 30 s): from its SIGTERM to its workers to SIGKILL."""
    flags = [f"--nproc_per_node={nproc_per_node}", *_restart_flags(max_restarts, shutdown_timeout_s)]
    if nnodes == 1:
        return [*flags, "--standalone"]
    flags += [f"--nnodes={nnodes}"]
    if node_rank is not None:
        flags.append(f"--node_rank={node_rank}")
    conf = f"join_timeout={rdzv_timeout_s},read_timeout={rdzv_timeout_s}"
    if rdzv_host is not None:
        conf += f",is_host={str(rdzv_host).lower()}"
    return [*flags, "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}", f"--rdzv_id={rdzv_id}",
            f"--rdzv_conf={conf}"]


def rendezvous_failed(log_text: str) -> bool:
    return any(name in log_text for name in RENDEZVOUS_ERRORS)


def log_tail(paths: Sequence[Path], lines: int = 15) -> str:
    """The last lines of each log, for an error message."""
    parts = []
    for path in paths:
        if Path(path).is_file():
            text = Path(path).read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path} (last {len(text)} lines)\n" + "\n".join(text))
    return "\n".join(parts)


# -- Pipes over shared storage ---------------------------------------------------------------------


class SharedFileMessageReader(dg.PipesFileMessageReader):
    """`PipesFileMessageReader` for a file on shared storage (NFS, Lustre, a Kubernetes volume).

    The writer (global rank 0, on any node) appends one JSON line per message and closes the file
    each time. A network file system may show an open reader stale data until it reopens the
    file, so after the session closes the file is reopened once and any lines past what the
    tailing thread saw are handled too. The file is kept for post-mortems unless `cleanup_file`.
    """

    def __init__(self, path: str, cleanup_file: bool = False):
        super().__init__(path, include_stdio_in_messages=False, cleanup_file=cleanup_file)

    def _reader_thread(self, handler, is_resource_complete: threading.Event) -> None:
        offset = 0
        try:
            with open(self._path, encoding="utf-8") as stream:
                while True:
                    line = stream.readline()
                    if line.endswith("\n"):
                        offset = stream.tell()
                        handler.handle_message(json.loads(line))
                    elif is_resource_complete.is_set():
                        break
                    else:
                        stream.seek(offset)  # a partial line: read it again once complete
                        time.sleep(0.05)
            with open(self._path, encoding="utf-8") as stream:  # reopen: close-to-open consistency
                stream.seek(offset)
                for line in stream:
                    if line.strip():
                        handler.handle_message(json.loads(line))
        except Exception:
            handler.report_pipes_framework_exception(f"{type(self).__name__} reader thread", sys.exc_info())
            raise

    def no_messages_debug_text(self) -> str:
        return f"Attempted to read messages from {self._path} (shared storage: every node must mount it at this path)."


# -- local ----------------------------------------------------------------------------------------


def stop_process_groups(processes: Sequence[subprocess.Popen], grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM every process group still alive, then SIGKILL what remains after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in processes if p.poll() is None]
        for process in alive:
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while any(p.poll() is None for p in alive) and time.monotonic() < deadline:
            time.sleep(0.1)
    # Grandchildren may outlive their agent; the group id is the agent's pid.
    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _forward(stream, log_file: Path, prefix: str) -> None:
    """Copy a child's output to its log file and to this process's stdout (Dagster's compute log)."""
    with open(log_file, "a", encoding="utf-8", errors="replace") as log:
        for line in stream:
            log.write(line)
            log.flush()
            sys.stdout.write(prefix + line)
    sys.stdout.flush()


def run_local(commands: Sequence[Sequence[str]], *, env: dict[str, str], cwd: str | None, log_dir: Path,
              poll_s: float = 0.2) -> list[int]:
    """Run each command (one torchrun agent per "node") to the end; their exit statuses.

    Each agent runs in a session of its own; its output goes to `log_dir/node<i>.log` and to
    stdout. When one agent fails the others are stopped (they would wait for it until the
    rendezvous or collective timeout). Any exception while waiting, Dagster's run cancellation
    included, kills every agent's whole process group before it propagates.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    processes: list[subprocess.Popen] = []
    threads: list[threading.Thread] = []
    try:
        for index, command in enumerate(commands):
            log_file = log_dir / f"node{index}.log"
            log_file.write_text("")
            process = subprocess.Popen(list(command), env=env, cwd=cwd, start_new_session=True, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
            processes.append(process)
            prefix = f"[node {index}] " if len(commands) > 1 else ""
            thread = threading.Thread(target=_forward, args=(process.stdout, log_file, prefix), daemon=True)
            thread.start()
            threads.append(thread)
        while any(p.poll() is None for p in processes):
            if any(p.returncode not in (None, 0) for p in processes):
                stop_process_groups(processes)
                break
            time.sleep(poll_s)
    except BaseException:
        stop_process_groups(processes)
        raise
    finally:
        for thread in threads:
            thread.join(timeout=5)
    return [p.returncode for p in processes]


@dataclass
class NodesJob:
    """How many nodes and processes, and where they meet: what every cluster launch needs."""

    nnodes: int
    nproc_per_node: int
    rdzv_port: int
    rdzv_id: str
    rdzv_timeout_s: int
    max_restarts: int = field(default=0, kw_only=True)  # torchrun's --max-restarts
    shutdown_timeout_s: int = field(default=0, kw_only=True)  # torchrun's --shutdown_timeout


# -- Slurm ------------------------------------------------------------------------------------------


@dataclass
class SlurmJob(NodesJob):
    """What the sbatch script needs besides the trainer's command."""

    gpus_per_node: int
    job_name: str = "mumu-train"
    time: str = "24:00:00"
    partition: str = ""
    account: str = ""
    extra_directives: list[str] = field(default_factory=list)  # e.g. "--exclusive", "--mem=0"
    # SIGTERM this long before the time limit: the trainer checkpoints its step and stops as
    # preempted, and the launch is made again instead of the job being killed mid-step.
    signal_before_limit_s: int = 600


def slurm_script(job: SlurmJob, *, python: str, program: Sequence[str], env: dict[str, str], cwd: str,
                 log_dir: Path) -> str:
    """An sbatch script: one `srun` step starting one torchrun agent per node, rendezvous on the
    job's first node. `program` is what follows torchrun's flags (`-m mumu_model.training ...`);
    `env` (the Pipes variables) is exported explicitly so it does not depend on `--export`."""
    directives = [f"--job-name={job.job_name}", f"--nodes={job.nnodes}", "--ntasks-per-node=1",
                  f"--time={job.time}", f"--output={log_dir}/slurm-%j.out"]
    if job.signal_before_limit_s:
        directives.append(f"--signal=TERM@{job.signal_before_limit_s}")
    if job.gpus_per_node:
        directives.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.partition:
        directives.append(f"--partition={job.partition}")
    if job.account:
        directives.append(f"--account={job.account}")
    directives += job.extra_directives
    # Inside the srun step every node expands its own SLURM_NODEID; MUMU_RDZV_HEAD comes from
    # the batch step, which runs on the first node.
    flags = [f"--nproc_per_node={job.nproc_per_node}", *_restart_flags(job.max_restarts, job.shutdown_timeout_s)]
    if job.nnodes == 1:
        flags.append("--standalone")
    else:
        timeout = job.rdzv_timeout_s
        flags += ['--nnodes="$SLURM_NNODES"', '--node_rank="$SLURM_NODEID"', "--rdzv_backend=c10d",
                  f'--rdzv_endpoint="$MUMU_RDZV_HEAD:{job.rdzv_port}"', f"--rdzv_id={shlex.quote(job.rdzv_id)}",
                  f"--rdzv_conf=join_timeout={timeout},read_timeout={timeout}"]
    agent = " ".join([shlex.quote(python), "-m", "torch.distributed.run", *flags,
                      *(shlex.quote(arg) for arg in program)])
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), "", "set -euo pipefail",
             f"cd {shlex.quote(cwd)}", *(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())),
             'export MUMU_RDZV_HEAD="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
             "# One task per node; --kill-on-bad-exit stops every node when one agent fails.",
             f"srun --nodes={job.nnodes} --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c {shlex.quote(agent)}", ""]
    return "\n".join(lines)


def submit_slurm(script: Path, *, env: dict[str, str], log_dir: Path,
                 sbatch: str = "sbatch", scancel: str = "scancel") -> int:
    """`sbatch --wait --parsable script`: the job's exit status once it ends. Cancelling the
    Dagster run (or any exception while waiting) cancels the job with `scancel`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([sbatch, "--wait", "--parsable", str(script)], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    job_id = ""
    try:
        # --parsable prints "jobid[;cluster]" as soon as the job is queued, then waits.
        job_id = process.stdout.readline().strip().split(";")[0]
        print(f"slurm job {job_id}: {script}", flush=True)
        rest = process.stdout.read()
        process.wait()
        if rest:
            sys.stdout.write(rest)
        return process.returncode
    except BaseException:
        if job_id:
            subprocess.run([scancel, job_id], check=False)
        stop_process_groups([process])
        raise


# -- Kubernetes ------------------------------------------------------------------------------------


@dataclass
class KubernetesJob(NodesJob):
    """Where the pods run and what they mount: the image holds this repository and its
    environment; `volume_claim` is the shared storage, mounted at `mount_path` (the same path as
    on the Dagster host, so output and Pipes paths mean the same in every pod)."""

    name: str
    image: str
    namespace: str = "default"
    volume_claim: str = ""
    mount_path: str = ""
    gpu_resource: str = "nvidia.com/gpu"
    cpu: str = ""
    memory: str = ""
    termination_grace_s: int = 900  # time from SIGTERM to SIGKILL: a checkpoint must fit in it


def kubernetes_manifests(job: KubernetesJob, *, python: str, program: Sequence[str], env: dict[str, str],
                         cwd: str) -> list[dict]:
    """A headless Service and an Indexed Job with one pod per node, each with `nproc_per_node`
    GPUs; pod i is node i, and pod 0 (`<name>-0.<name>`) hosts the c10d rendezvous."""
    labels = {"app.kubernetes.io/name": "mumu-train", "mumu/job": job.name}
    head = f"{job.name}-0.{job.name}.{job.namespace}.svc"
    flags = torchrun_flags(nnodes=job.nnodes, nproc_per_node=job.nproc_per_node,
                           rdzv_endpoint=f"{head}:{job.rdzv_port}", rdzv_id=job.rdzv_id,
                           rdzv_timeout_s=job.rdzv_timeout_s, node_rank="$(JOB_COMPLETION_INDEX)",
                           max_restarts=job.max_restarts, shutdown_timeout_s=job.shutdown_timeout_s)
    # Kubernetes expands $(VAR) in a command only for variables the container declares.
    index = {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}
    limits = {job.gpu_resource: str(job.nproc_per_node)}
    if job.cpu:
        limits["cpu"] = job.cpu
    if job.memory:
        limits["memory"] = job.memory
    container = {
        "name": "trainer",
        "image": job.image,
        "workingDir": cwd,
        "command": [python, "-m", "torch.distributed.run", *flags, *program],
        "env": [index, *({"name": k, "value": v} for k, v in sorted(env.items()))],
        "ports": [{"name": "rdzv", "containerPort": job.rdzv_port}],
        "resources": {"limits": limits, "requests": dict(limits)},
        # NCCL needs more shared memory than a container's default 64 MiB.
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    if job.volume_claim:
        container["volumeMounts"].append({"name": "shared", "mountPath": job.mount_path or cwd})
        volumes.append({"name": "shared", "persistentVolumeClaim": {"claimName": job.volume_claim}})
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": job.name, "namespace": job.namespace, "labels": labels},
        "spec": {"clusterIP": "None", "selector": {"mumu/job": job.name},
                 "ports": [{"name": "rdzv", "port": job.rdzv_port}],
                 # pod 0 must resolve before it is ready, or the other nodes cannot find the rendezvous
                 "publishNotReadyAddresses": True},
    }
    batch_job = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": job.name, "namespace": job.namespace, "labels": labels},
        "spec": {
            "completionMode": "Indexed", "completions": job.nnodes, "parallelism": job.nnodes,
            # One failed node fails the run: restarting one pod alone cannot rejoin the rendezvous.
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": labels},
                # An eviction or a preemption sends SIGTERM: every rank finishes its step and
                # writes the checkpoint before the grace period ends, and the launch is made again.
                "spec": {"subdomain": job.name, "restartPolicy": "Never",
                         "terminationGracePeriodSeconds": job.termination_grace_s,
                         "containers": [container], "volumes": volumes},
            },
        },
    }
    return [service, batch_job]


def to_yaml(manifests: Sequence[dict]) -> str:
    import yaml

    return yaml.safe_dump_all(manifests, sort_keys=False)


def run_kubernetes(manifest: Path, *, name: str, namespace: str, kubectl: str = "kubectl",
                   poll_s: float = 10.0) -> int:
    """Apply the manifests and wait for the Job: 0 when it completes, 1 when it fails. Any
    exception while waiting (Dagster's cancellation included) deletes them, stopping every pod."""
    subprocess.run([kubectl, "apply", "-f", str(manifest)], check=True)
    try:
        while True:
            status = subprocess.run([kubectl, "get", "job", name, "-n", namespace, "-o", "json"],
                                    check=True, capture_output=True, text=True).stdout
            conditions = json.loads(status).get("status", {}).get("conditions", [])
            states = {c["type"] for c in conditions if c.get("status") == "True"}
            if "Complete" in states:
                return 0
            if "Failed" in states:
                return 1
            time.sleep(poll_s)
    except BaseException:
        subprocess.run([kubectl, "delete", "-f", str(manifest), "--wait=false"], check=False)
        raise

