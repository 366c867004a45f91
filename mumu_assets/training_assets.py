"""Stage-1 and stage-2 training as assets: the same `mumu train` a user runs by hand, launched
with torchrun on the configured cluster through Dagster Pipes, so the trainer's metrics,
checkpoint paths and final pipeline folder come back as materialization metadata."""

# No `from __future__ import annotations`: Dagster reads config and resource types from the
# live annotations.
import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from mumu_model.training.identity import PREEMPTED_FILE, data_version

from .datasets import CAPTIONS
from .data_assets import multimodal_captions_stage1, multimodal_captions_stage2
from .launchers import (
    KubernetesJob,
    SharedFileMessageReader,
    SlurmJob,
    free_port,
    kubernetes_manifests,
    log_tail,
    rendezvous_failed,
    run_kubernetes,
    run_local,
    slurm_script,
    submit_slurm,
    to_yaml,
    torchrun_flags,
)
from .params import params
from .resources import DatasetStorage

T = params(group="training")
# The sampling settings chosen for the profile's models: its evaluation's (the toy world's were
# chosen on the validation suites; the paper's are the paper's), saved with each exported pipeline.
E = params(group="evaluation") or {}


LAUNCHERS = ("local", "slurm", "kubernetes")


@dataclass
class Launched:
    """How a launch ended: what was run, its exit status, its logs, the rendezvous it used."""

    command: list[str]
    returncode: int
    logs: list[Path]
    rdzv_endpoint: str


class TrainingCluster(dg.ConfigurableResource):
    """Where training runs: torchrun with `nproc_per_node` processes on each of `nnodes` nodes
    (paper: 1 node x 8 H100), started by `launcher`:

    - "local": agents are subprocesses here. One node: `--standalone`; several: `nnodes` agents
      on this machine with a c10d rendezvous at `rdzv_endpoint` (empty: 127.0.0.1, a free port).
    - "slurm": an sbatch script with one torchrun agent per node, rendezvous on the first node
      (port of `rdzv_endpoint`, else 29500), submitted with `sbatch --wait`.
    - "kubernetes": an Indexed Job (one pod per node, `nproc_per_node` GPUs each) and a headless
      Service, applied and watched with kubectl; shared storage from `k8s_volume_claim`.

    Dagster Pipes reads the reporting rank's messages from `pipes_dir` (empty: `pipes/` beside
    the stage's output), which every node must see at the same path. A rendezvous that nobody
    answers fails after `rdzv_timeout_s`. `hsdp` shards the model within each node and
    replicates it across nodes (the trainer's `hsdp_replicas` = `nnodes`).
    """

    launcher: str = "local"
    nnodes: int = 1
    nproc_per_node: int = 8
    rdzv_endpoint: str = ""
    rdzv_id: str = "mumu"
    rdzv_timeout_s: int = 900
    # Preemption (SIGTERM: every rank checkpoints its step and stops): torchrun restarts a failed
    # worker group in place up to `max_restarts` times; a preempted launch is made again, resuming,
    # up to `max_requeues` times.
    max_restarts: int = 0
    max_requeues: int = 3
    # From torchrun's SIGTERM to its workers to SIGKILL (0: torchrun's 30 s): every rank's
    # checkpoint must be written in it (about 10 GB at paper scale).
    shutdown_timeout_s: int = 0
    # Whether the local agents may host the rendezvous store: None lets torchrun decide from the
    # endpoint's address; False only connects (a store that runs elsewhere).
    rdzv_host: bool | None = None
    hsdp: bool = False
    pipes_dir: str = ""
    python: str = ""  # the interpreter on the nodes; empty: this one (local, slurm) or "python" (kubernetes)
    # slurm
    slurm_partition: str = ""
    slurm_account: str = ""
    slurm_time: str = "24:00:00"
    gpus_per_node: int = -1  # -1: nproc_per_node; 0: ask for none (CPU nodes)
    slurm_directives: list[str] = []  # more `#SBATCH` options, e.g. "--exclusive"
    # kubernetes
    k8s_image: str = ""
    k8s_namespace: str = "default"
    k8s_volume_claim: str = ""
    k8s_mount_path: str = ""  # where the claim is mounted; empty: the working directory

    def _rdzv_port(self) -> int:
        return int(self.rdzv_endpoint.rpartition(":")[2]) if self.rdzv_endpoint else 29500

    def command(self, config_file: str, overrides: list[str], rdzv_endpoint: str | None = None) -> list[str]:
        """The torchrun command one node runs (every local agent runs the same one)."""
        flags = torchrun_flags(nnodes=self.nnodes, nproc_per_node=self.nproc_per_node,
                               rdzv_endpoint=rdzv_endpoint or self.rdzv_endpoint, rdzv_id=self.rdzv_id,
                               rdzv_timeout_s=self.rdzv_timeout_s, rdzv_host=self.rdzv_host,
                               max_restarts=self.max_restarts, shutdown_timeout_s=self.shutdown_timeout_s)
        return [self.python or sys.executable, "-m", "torch.distributed.run", *flags,
                *self.program(config_file, overrides)]

    def program(self, config_file: str, overrides: list[str]) -> list[str]:
        """What follows torchrun's flags: the trainer with its config and `--set` overrides."""
        if self.hsdp and self.nnodes > 1:
            overrides = [*overrides, f"hsdp_replicas={self.nnodes}"]
        sets = [arg for override in overrides for arg in ("--set", override)]
        return ["-m", "mumu_model.training", config_file, *sets]

    def launch(self, config_file: str, overrides: list[str], *, env: dict[str, str], cwd: str | None,
               work_dir: Path, job_name: str) -> Launched:
        """Start the run on every node and wait for its end. `env` (the Pipes variables) reaches
        every rank; scripts, manifests and logs are written under `work_dir`."""
        if self.launcher not in LAUNCHERS:
            raise dg.Failure(f"TrainingCluster.launcher: {self.launcher!r} is not one of {', '.join(LAUNCHERS)}")
        work_dir.mkdir(parents=True, exist_ok=True)
        cwd = str(Path(cwd or Path.cwd()).resolve())
        program = self.program(config_file, overrides)
        if self.launcher == "local":
            endpoint = self.rdzv_endpoint or f"127.0.0.1:{free_port()}"
            command = self.command(config_file, overrides, rdzv_endpoint=endpoint)
            codes = run_local([command] * self.nnodes, env={**os.environ, **env}, cwd=cwd, log_dir=work_dir)
            logs = [work_dir / f"node{i}.log" for i in range(self.nnodes)]
            return Launched(command, max(codes, key=abs), logs, endpoint)
        if self.launcher == "slurm":
            job = SlurmJob(nnodes=self.nnodes, nproc_per_node=self.nproc_per_node,
                           gpus_per_node=self.nproc_per_node if self.gpus_per_node < 0 else self.gpus_per_node,
                           rdzv_port=self._rdzv_port(), rdzv_id=self.rdzv_id, rdzv_timeout_s=self.rdzv_timeout_s,
                           job_name=job_name, time=self.slurm_time, partition=self.slurm_partition,
                           account=self.slurm_account, extra_directives=list(self.slurm_directives),
                           max_restarts=self.max_restarts, shutdown_timeout_s=self.shutdown_timeout_s)
            script = work_dir / "train.sbatch"
            script.write_text(slurm_script(job, python=self.python or sys.executable, program=program,
                                           env=env, cwd=cwd, log_dir=work_dir))
            if shutil.which("sbatch") is None:
                raise dg.Failure(f"TrainingCluster.launcher='slurm': sbatch is not on PATH here; the script is {script}")
            code = submit_slurm(script, env={**os.environ}, log_dir=work_dir)
            return Launched(["sbatch", "--wait", str(script)], code, sorted(work_dir.glob("slurm-*.out")),
                            f"<first node>:{self._rdzv_port()}")
        if not self.k8s_image:
            raise dg.Failure("TrainingCluster.k8s_image: the kubernetes launcher needs the trainer's container image")
        job = KubernetesJob(name=job_name, nnodes=self.nnodes, nproc_per_node=self.nproc_per_node,
                            rdzv_port=self._rdzv_port(), rdzv_id=self.rdzv_id, rdzv_timeout_s=self.rdzv_timeout_s,
                            image=self.k8s_image, namespace=self.k8s_namespace,
                            volume_claim=self.k8s_volume_claim, mount_path=self.k8s_mount_path,
                            max_restarts=self.max_restarts, shutdown_timeout_s=self.shutdown_timeout_s)
        manifest = work_dir / "train.k8s.yaml"
        manifest.write_text(to_yaml(kubernetes_manifests(job, python=self.python or "python", program=program,
                                                         env=env, cwd=cwd)))
        if shutil.which("kubectl") is None:
            raise dg.Failure(f"TrainingCluster.launcher='kubernetes': kubectl is not on PATH here; the manifests are {manifest}")
        code = run_kubernetes(manifest, name=job.name, namespace=job.namespace)
        return Launched(["kubectl", "apply", "-f", str(manifest)], code, [],
                        f"{job.name}-0.{job.name}:{job.rdzv_port}")


class StageConfig(dg.Config):
    config_file: str
    # The caption datasets (by stage) the stage trains on, in the order of the training config's
    # `shard_weights`: a stage may mix in another stage's records.
    captions: list[int]
    overrides: list[str] = []  # extra `field=value` settings of the training config
    output_root: str = T.get("output_root", "runs")
    # Saved with the exported pipeline as its sampling defaults (`MUMUPipeline.sampling_defaults`),
    # which calls, `mumu generate` and `mumu demo` start from; resolution None: the UNet's native size.
    sampling_steps: int = E.get("steps", 50)
    sampling_guidance: float = E.get("guidance", 6.0)
    sampling_resolution: int | None = E.get("resolution", None)


class Stage1Config(StageConfig):
    config_file: str = T.get("stage1_config", "configs/train_stage1_paper.yaml")
    captions: list[int] = T.get("stage1_captions", [1])


class Stage2Config(StageConfig):
    config_file: str = T.get("stage2_config", "configs/train_stage2_paper.yaml")
    captions: list[int] = T.get("stage2_captions", [2])


def data_version_of(shards: list[Path], output_root: Path) -> tuple[str, float]:
    """The shard folders' DVC hashes ('+'-joined) and the seconds they took. Through DVC's state
    database (the DVC repository's own, else one under `output_root`), so a shard is read only
    when its inode, size or mtime changed since it was last hashed: at paper size, reading every
    shard again at each materialization would take hours."""
    started = time.monotonic()
    version = data_version(tuple(map(str, shards)), [], state_dir=output_root / ".dvc-state")
    return version, time.monotonic() - started


def caption_shards(stage: int, config: StageConfig, storage: DatasetStorage) -> list[Path]:
    """The caption folders stage `stage` trains on; fails naming one that is unknown or not yet made."""
    unknown = [c for c in config.captions if c not in CAPTIONS]
    if not config.captions or unknown:
        raise dg.Failure(f"stage {stage}: captions={config.captions}: name caption datasets among {sorted(CAPTIONS)}")
    shards = [CAPTIONS[c].path(storage) for c in config.captions]
    for c, folder in zip(config.captions, shards):
        if not any(folder.glob("*.tar")):
            raise dg.Failure(f"stage {stage}: no training shards in {folder}: materialize multimodal_captions_stage{c} first")
    return shards


# How `mumu train` ends a refusal (bad data, another run's checkpoint, an incomplete init_from, a
# config that does not fit): this, the message, on one line of stderr, and exit status 2.
REFUSAL = "mumu: error: "


def trainer_refusal(logs: list[Path], window: int = 1 << 16) -> str | None:
    """The trainer's last one-line refusal in the end of the launch's logs, without its prefix;
    None when it ended otherwise. Only the last `window` bytes of each log are read: after the
    refusal come at most torchrun's own report of the failed worker."""
    found = None
    for path in logs:
        with contextlib.suppress(OSError):
            with open(path, "rb") as handle:
                handle.seek(max(0, handle.seek(0, os.SEEK_END) - window))
                text = handle.read().decode(errors="replace")
            for line in text.splitlines():
                if REFUSAL in line:
                    found = line.split(REFUSAL, 1)[1].strip()
    return found


def _train(context, stage: int, config: StageConfig, storage: DatasetStorage, cluster: TrainingCluster,
           pipes: dg.PipesSubprocessClient, extra: list[str]) -> dg.MaterializeResult:
    shards = caption_shards(stage, config, storage)
    output_dir = Path(config.output_root) / f"stage{stage}"
    version, hash_seconds = data_version_of(shards, Path(config.output_root))
    context.log.info(f"data version {version} of {', '.join(map(str, shards))} in {hash_seconds:.1f} s")
    overrides = [
        f"shards={','.join(map(str, shards))}",
        f"output_dir={output_dir}",
        # A re-materialization after a crash continues the same run; new data (another DVC hash)
        # or another recipe is another run, started in its own folder beside the old one.
        "resume=latest",
        f"data_version={version}",
        f"tags.dagster_run_id={context.run_id}",
        f"tags.data_dvc_hash={version}",
        *extra,
        *config.overrides,
    ]
    # A preempted run (SIGTERM: every rank checkpointed its step and stopped) is launched again
    # and resumes; the trainer's marker file tells a preemption from a failure on every launcher.
    marker = Path(getattr(pipes, "cwd", None) or ".") / output_dir / PREEMPTED_FILE
    preemptions = []
    while True:
        marker.unlink(missing_ok=True)
        launched, results, pipes_dir = _launch(context, stage, config, cluster, pipes, overrides, len(preemptions))
        if launched.returncode == 0 or not marker.is_file() or len(preemptions) >= cluster.max_requeues:
            break
        preemptions.append(json.loads(marker.read_text()))
        context.log.warning(f"stage {stage}: preempted after step {preemptions[-1]['step']} (checkpoint "
                            f"{preemptions[-1]['checkpoint']}); launching again to resume "
                            f"({len(preemptions)} of TrainingCluster.max_requeues={cluster.max_requeues})")
    command = " ".join(launched.command)
    logs = ", ".join(map(str, launched.logs)) or str(pipes_dir / "logs")
    if launched.returncode != 0:
        tail = log_tail(launched.logs)
        refused = trainer_refusal(launched.logs)
        if refused is not None:
            raise dg.Failure(f"stage {stage}: training refused: {refused} (logs: {logs})",
                             metadata={"command": command, "log_tail": dg.MetadataValue.md(f"```\n{tail}\n```")})
        if rendezvous_failed(tail):
            raise dg.Failure(
                f"stage {stage}: the torchrun rendezvous at rdzv_endpoint={launched.rdzv_endpoint} did not "
                f"complete within rdzv_timeout_s={cluster.rdzv_timeout_s} (TrainingCluster.rdzv_endpoint: is "
                f"every node started and can it reach that host and port?); logs: {logs}",
                metadata={"command": command, "log_tail": dg.MetadataValue.md(f"```\n{tail}\n```")})
        if marker.is_file():
            raise dg.Failure(f"stage {stage}: preempted again after {len(preemptions)} relaunch(es), "
                             f"TrainingCluster.max_requeues={cluster.max_requeues}; materialize again to resume "
                             f"from {json.loads(marker.read_text())['checkpoint']} (logs: {logs})",
                             metadata={"command": command, "log_tail": dg.MetadataValue.md(f"```\n{tail}\n```")})
        raise dg.Failure(f"stage {stage}: training exited with status {launched.returncode}: {command}; logs: {logs}",
                         metadata={"command": command, "log_tail": dg.MetadataValue.md(f"```\n{tail}\n```")})
    if not results:
        raise dg.Failure(
            f"stage {stage}: training ended without reporting a materialization through Dagster Pipes "
            f"(messages: {pipes_dir / 'messages.jsonl'}): {command}; logs: {logs}",
            metadata={"command": command})
    from mumu_model.loading import PipelineFolderError, write_sampling_defaults

    try:
        sampling = write_sampling_defaults(output_dir / "pipeline", config.sampling_steps, config.sampling_guidance,
                                           config.sampling_resolution)
    except PipelineFolderError as err:
        raise dg.Failure(f"stage {stage}: sampling defaults (sampling_* config): {err}") from None
    context.log.info(f"saved with {output_dir / 'pipeline'}: sampling defaults {sampling['sampling_steps']} steps, "
                     f"guidance {sampling['sampling_guidance']}, {sampling['sampling_resolution']} px")
    result = results[-1]
    return result._replace(metadata={**(result.metadata or {}), "sampling_defaults": dg.MetadataValue.json(sampling),
                                     "data_version_s": dg.MetadataValue.float(hash_seconds),
                                     "preemptions": dg.MetadataValue.json(preemptions)})


def _launch(context, stage: int, config: StageConfig, cluster: TrainingCluster, pipes: dg.PipesSubprocessClient,
            overrides: list[str], attempt: int) -> tuple[Launched, list[dg.MaterializeResult], Path]:
    """One launch of the trainer through a Pipes session of its own: how it ended, what it
    reported, and its Pipes folder (logs under it)."""
    output_dir = Path(config.output_root) / f"stage{stage}"
    # Messages from the reporting rank come through a folder every node sees, not a temp file
    # on this host: global rank 0 may run on any node.
    pipes_dir = (Path(cluster.pipes_dir) if cluster.pipes_dir else output_dir.parent / "pipes") / context.run_id
    pipes_dir = pipes_dir.resolve() / (f"stage{stage}" + (f".relaunch{attempt}" if attempt else ""))
    pipes_dir.mkdir(parents=True, exist_ok=True)
    job_name = f"mumu-stage{stage}-{context.run_id[:8]}" + (f"-{attempt}" if attempt else "")
    with dg.open_pipes_session(
        context=context,
        context_injector=dg.PipesFileContextInjector(str(pipes_dir / "context.json")),
        message_reader=SharedFileMessageReader(str(pipes_dir / "messages.jsonl")),
    ) as session:
        env = {**getattr(pipes, "env", {}), **session.get_bootstrap_env_vars()}
        context.log.info(f"launching ({cluster.launcher}, {cluster.nnodes} x {cluster.nproc_per_node}): "
                         + " ".join(cluster.command(config.config_file, overrides)))
        launched = cluster.launch(config.config_file, overrides, env=env, cwd=getattr(pipes, "cwd", None),
                                  work_dir=pipes_dir / "logs", job_name=job_name)
    # Only what the trainer reported: Dagster's implicit (empty) materialization would hide a silent run.
    reported = session.get_results(implicit_materializations=False)
    return launched, [r for r in reported if isinstance(r, dg.MaterializeResult)], pipes_dir


# The VAE is an asset of the "pretrained" group: SDXL's in the paper profile, trained by the
# graph in the toy profile (its training config names the folder).
# Each stage depends on the caption datasets its params train on (`training.stage<N>_captions`).
CAPTION_ASSETS = {1: multimodal_captions_stage1, 2: multimodal_captions_stage2}


@dg.asset(group_name="training", kinds={"pytorch", "mlflow"},
          deps=[*(CAPTION_ASSETS[c] for c in Stage1Config().captions), dg.AssetKey("vae_model")])
def stage1_model(
    context: dg.AssetExecutionContext, config: Stage1Config, storage: DatasetStorage,
    training_cluster: TrainingCluster, pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    """Stage 1: up to 4 images per prompt at 324 tokens each (Table-1 LoRA recipe)."""
    return _train(context, 1, config, storage, training_cluster, pipes_subprocess_client, [])


@dg.asset(group_name="training", kinds={"pytorch", "mlflow"},
          deps=[stage1_model, *(CAPTION_ASSETS[c] for c in Stage2Config().captions)])
def stage2_model(
    context: dg.AssetExecutionContext, config: Stage2Config, storage: DatasetStorage,
    training_cluster: TrainingCluster, pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    """Stage 2: from stage 1's weights, one face or person crop per prompt at 1,296 tokens."""
    stage1 = Path(config.output_root) / "stage1" / "pipeline"
    return _train(context, 2, config, storage, training_cluster, pipes_subprocess_client, [f"init_from={stage1}"])


TRAINING_ASSETS = [stage1_model, stage2_model]
