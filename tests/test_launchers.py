"""Training launchers: local process groups, the Slurm script and the Kubernetes manifests.

No Slurm controller or Kubernetes cluster runs here: `sbatch`, `srun`, `scontrol`, `scancel`
and `kubectl` are small fakes on PATH that run the generated script's steps on this machine
and record what they were asked."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from dagster._core.errors import DagsterExecutionInterruptedError

from mumu_assets.launchers import (
    KubernetesJob,
    SlurmJob,
    kubernetes_manifests,
    run_local,
    slurm_script,
    to_yaml,
)
from mumu_assets.training_assets import TrainingCluster

PIPES_ENV = {"DAGSTER_PIPES_CONTEXT": "Y29udGV4dA==", "DAGSTER_PIPES_MESSAGES": "bWVzc2FnZXM="}


def fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose.
    return "Z" not in subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout


def interrupt_after(seconds: float) -> None:
    """Raise Dagster's run-cancellation error in the main thread after `seconds`."""
    def handler(signum, frame):
        raise DagsterExecutionInterruptedError()

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def test_cancellation_kills_every_agents_process_group(tmp_path):
    # Each "agent" starts a grandchild (a rank) in its group and waits on it.
    commands = [["bash", "-c", f"sleep 300 & echo $! > {tmp_path}/rank{i}; wait"] for i in range(2)]
    interrupt_after(1.5)
    try:
        with pytest.raises(DagsterExecutionInterruptedError):
            run_local(commands, env=dict(os.environ), cwd=str(tmp_path), log_dir=tmp_path / "logs")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    ranks = [int((tmp_path / f"rank{i}").read_text()) for i in range(2)]
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in ranks)


def test_one_failed_agent_stops_the_others(tmp_path):
    # `sleep` inherits the test process's SIGTERM disposition, and an earlier test of the suite
    # (an in-process Dagster or DVC call) can leave it ignored; torchrun sets its own handler.
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    commands = [["bash", "-c", "echo broken; exit 3"], ["sleep", "300"]]
    try:
        codes = run_local(commands, env=dict(os.environ), cwd=str(tmp_path), log_dir=tmp_path / "logs")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert codes[0] == 3 and codes[1] == -signal.SIGTERM
    assert (tmp_path / "logs" / "node0.log").read_text() == "broken\n"


def slurm_fakes(bin_dir: Path, record: Path) -> None:
    """sbatch runs the script as the batch step of a job on `SLURM_NNODES` nodes; srun starts
    its command once per node with that node's SLURM_NODEID; scancel records the job id."""
    bin_dir.mkdir()
    fake(bin_dir, "sbatch", f"""script="${{@: -1}}"
nodes=$(sed -n 's/^#SBATCH --nodes=//p' "$script")
echo 4242
SLURM_NNODES=$nodes SLURM_JOB_NODELIST=node[1-$nodes] SLURM_JOB_ID=4242 bash "$script" > {record}/batch.out 2>&1
""")
    fake(bin_dir, "scontrol", 'echo node1; echo node2\n')
    fake(bin_dir, "srun", """while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid"; done
""")
    fake(bin_dir, "scancel", f'echo "$@" >> {record}/scancel\n')


def test_slurm_script_runs_one_agent_per_node(tmp_path, monkeypatch):
    record = tmp_path / "record"
    record.mkdir()
    slurm_fakes(tmp_path / "bin", record)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    # The "interpreter" records how torchrun was called on each node.
    fake(tmp_path, "python", f'echo "$SLURM_NODEID $DAGSTER_PIPES_MESSAGES $*" > {record}/node$SLURM_NODEID\n')
    cluster = TrainingCluster(launcher="slurm", nnodes=2, nproc_per_node=8, python=str(tmp_path / "python"),
                              slurm_partition="h100", slurm_time="02:00:00", rdzv_endpoint=":29411",
                              rdzv_timeout_s=120, slurm_directives=["--exclusive"], max_restarts=2,
                              shutdown_timeout_s=300)
    launched = cluster.launch("c.yaml", ["max_steps=3"], env=PIPES_ENV, cwd=str(tmp_path),
                              work_dir=tmp_path / "work", job_name="mumu-stage1-abc")
    assert launched.returncode == 0, (record / "batch.out").read_text()
    script = (tmp_path / "work" / "train.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(tmp_path / "work" / "train.sbatch")]).returncode == 0
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--time=02:00:00",
                      "--partition=h100", "--exclusive", "--job-name=mumu-stage1-abc",
                      "--signal=TERM@600"):  # time to checkpoint before the time limit
        assert f"#SBATCH {directive}\n" in script
    for node in (0, 1):
        line = (record / f"node{node}").read_text().split()
        assert line[:2] == [str(node), PIPES_ENV["DAGSTER_PIPES_MESSAGES"]]
        assert line[2:7] == ["-m", "torch.distributed.run", "--nproc_per_node=8", "--max-restarts=2",
                             "--shutdown_timeout=300"]
        assert "--nnodes=2" in line and f"--node_rank={node}" in line
        assert "--rdzv_endpoint=node1:29411" in line and "--rdzv_conf=join_timeout=120,read_timeout=120" in line
        assert line[-5:] == ["-m", "mumu_model.training", "c.yaml", "--set", "max_steps=3"]


def test_one_node_slurm_script_is_standalone(tmp_path):
    job = SlurmJob(nnodes=1, nproc_per_node=8, gpus_per_node=0, rdzv_port=29500, rdzv_id="x", rdzv_timeout_s=60)
    script = slurm_script(job, python="/opt/py/bin/python", program=["-m", "mumu_model.training", "a b.yaml"],
                          env=PIPES_ENV, cwd="/shared/mumu", log_dir=Path("/shared/logs"))
    path = tmp_path / "s.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert "--standalone" in script and "--gpus-per-node" not in script and "'a b.yaml'" in script
    assert "#SBATCH --output=/shared/logs/slurm-%j.out" in script


def test_cancelling_a_slurm_run_cancels_the_job(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    fake(tmp_path / "bin", "sbatch", "echo 777; sleep 300\n")
    fake(tmp_path / "bin", "scancel", f'echo "$@" > {tmp_path}/scancel\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    cluster = TrainingCluster(launcher="slurm", nnodes=2, nproc_per_node=1)
    interrupt_after(1.5)
    try:
        with pytest.raises(DagsterExecutionInterruptedError):
            cluster.launch("c.yaml", [], env=PIPES_ENV, cwd=str(tmp_path), work_dir=tmp_path / "w", job_name="j")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    assert (tmp_path / "scancel").read_text().strip() == "777"


def manifests(nnodes: int = 2) -> list[dict]:
    job = KubernetesJob(name="mumu-stage1-abc", nnodes=nnodes, nproc_per_node=8, rdzv_port=29500, rdzv_id="mumu",
                        rdzv_timeout_s=300, image="registry.example/mumu:1", namespace="ml",
                        volume_claim="mumu-shared", mount_path="/shared", cpu="64", memory="900Gi")
    return kubernetes_manifests(job, python="python", program=["-m", "mumu_model.training", "c.yaml"],
                                env=PIPES_ENV, cwd="/shared/mumu")


def test_kubernetes_manifests_run_one_pod_per_node():
    service, job = yaml.safe_load_all(to_yaml(manifests()))
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"mumu/job": "mumu-stage1-abc"}
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 2
    assert spec["backoffLimit"] == 0
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] and pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] == 900  # SIGTERM, then time for every rank's checkpoint
    assert spec["template"]["metadata"]["labels"]["mumu/job"] == "mumu-stage1-abc"
    [container] = pod["containers"]
    assert container["image"] == "registry.example/mumu:1" and container["workingDir"] == "/shared/mumu"
    limits = container["resources"]["limits"]
    assert limits == {"nvidia.com/gpu": "8", "cpu": "64", "memory": "900Gi"}
    assert container["resources"]["requests"] == limits
    command = container["command"]
    assert command[:3] == ["python", "-m", "torch.distributed.run"]
    assert "--nnodes=2" in command and "--node_rank=$(JOB_COMPLETION_INDEX)" in command
    assert "--rdzv_endpoint=mumu-stage1-abc-0.mumu-stage1-abc.ml.svc:29500" in command
    env = {e["name"]: e for e in container["env"]}
    assert {name: env[name]["value"] for name in PIPES_ENV} == PIPES_ENV
    assert "job-completion-index" in env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"dshm": "/dev/shm", "shared": "/shared"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == "mumu-shared"
    for manifest in (service, job):
        assert manifest["metadata"]["namespace"] == "ml"


def test_kubernetes_launch_applies_and_waits(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    fake(tmp_path / "bin", "kubectl", f"""echo "$@" >> {tmp_path}/kubectl
if [ "$1" = get ]; then echo '{{"status": {{"conditions": [{{"type": "Complete", "status": "True"}}]}}}}'; fi
""")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    cluster = TrainingCluster(launcher="kubernetes", nnodes=2, nproc_per_node=8, k8s_image="img:1",
                              k8s_namespace="ml")
    launched = cluster.launch("c.yaml", [], env=PIPES_ENV, cwd=str(tmp_path), work_dir=tmp_path / "w",
                              job_name="mumu-stage1-abc")
    assert launched.returncode == 0
    calls = (tmp_path / "kubectl").read_text().splitlines()
    assert calls[0] == f"apply -f {tmp_path / 'w' / 'train.k8s.yaml'}"
    assert calls[1].startswith("get job mumu-stage1-abc -n ml")
    assert [d["kind"] for d in yaml.safe_load_all((tmp_path / "w" / "train.k8s.yaml").read_text())] == ["Service", "Job"]


def test_unknown_launcher_and_missing_image_are_named(tmp_path):
    import dagster as dg

    with pytest.raises(dg.Failure, match="TrainingCluster.launcher: 'ray'"):
        TrainingCluster(launcher="ray").launch("c.yaml", [], env={}, cwd=None, work_dir=tmp_path, job_name="j")
    with pytest.raises(dg.Failure, match="TrainingCluster.k8s_image"):
        TrainingCluster(launcher="kubernetes").launch("c.yaml", [], env={}, cwd=None, work_dir=tmp_path, job_name="j")


def test_hsdp_sets_one_replica_group_per_node():
    from mumu_assets.training_assets import TrainingCluster

    command = TrainingCluster(nnodes=4, nproc_per_node=8, hsdp=True).command("stage1.yaml", ["max_steps=10"])
    assert command[-4:] == ["--set", "max_steps=10", "--set", "hsdp_replicas=4"]
    single = TrainingCluster(nnodes=1, nproc_per_node=8, hsdp=True).command("stage1.yaml", [])
    assert "hsdp_replicas=1" not in " ".join(single) and not any("hsdp" in part for part in single)
