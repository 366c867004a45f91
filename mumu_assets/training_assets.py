"""Stage-1 and stage-2 training as assets: the same `mumu train` a user runs by hand, launched
with torchrun on the configured cluster through Dagster Pipes, so the trainer's metrics,
checkpoint paths and final pipeline folder come back as materialization metadata."""

# No `from __future__ import annotations`: Dagster reads config and resource types from the
# live annotations.
import sys
from pathlib import Path

import dagster as dg

from mumu_model.data.versioning import dvc_hash

from .data_assets import multimodal_captions_stage1, multimodal_captions_stage2
from .params import params
from .resources import DatasetStorage

T = params(group="training")


class TrainingCluster(dg.ConfigurableResource):
    """Where training runs: torchrun with `nproc_per_node` processes on each of `nnodes` nodes
    (paper: 1 node x 8 H100). With one node the rendezvous is local (`--standalone`); with
    several, every node runs the same command against `rdzv_endpoint`."""

    nnodes: int = 1
    nproc_per_node: int = 8
    rdzv_endpoint: str = "127.0.0.1:29500"
    rdzv_id: str = "mumu"

    def command(self, config_file: str, overrides: list[str]) -> list[str]:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={self.nproc_per_node}"]
        if self.nnodes == 1:
            launcher.append("--standalone")
        else:
            launcher += [f"--nnodes={self.nnodes}", "--rdzv_backend=c10d",
                         f"--rdzv_endpoint={self.rdzv_endpoint}", f"--rdzv_id={self.rdzv_id}"]
        sets = [arg for override in overrides for arg in ("--set", override)]
        return [*launcher, "-m", "mumu_model.training", config_file, *sets]


class StageConfig(dg.Config):
    config_file: str
    overrides: list[str] = []  # extra `field=value` settings of the training config
    output_root: str = T.get("output_root", "runs")


class Stage1Config(StageConfig):
    config_file: str = T.get("stage1_config", "configs/train_stage1_paper.yaml")


class Stage2Config(StageConfig):
    config_file: str = T.get("stage2_config", "configs/train_stage2_paper.yaml")


def _train(context, stage: int, config: StageConfig, shards: Path, cluster: TrainingCluster,
           pipes: dg.PipesSubprocessClient, extra: list[str]) -> dg.MaterializeResult:
    if not any(shards.glob("*.tar")):
        raise dg.Failure(f"no training shards in {shards}: materialize multimodal_captions_stage{stage} first")
    output_dir = Path(config.output_root) / f"stage{stage}"
    version = dvc_hash(shards)
    overrides = [
        f"shards={shards}",
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
    command = cluster.command(config.config_file, overrides)
    context.log.info("launching: " + " ".join(command))
    return pipes.run(command=command, context=context).get_materialize_result()


# The VAE is an asset of the "pretrained" group: SDXL's in the paper profile, trained by the
# graph in the toy profile (its training config names the folder).
@dg.asset(group_name="training", deps=[multimodal_captions_stage1, dg.AssetKey("vae_model")],
          kinds={"pytorch", "mlflow"})
def stage1_model(
    context: dg.AssetExecutionContext, config: Stage1Config, storage: DatasetStorage,
    training_cluster: TrainingCluster, pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    """Stage 1: up to 4 images per prompt at 324 tokens each (Table-1 LoRA recipe)."""
    return _train(context, 1, config, storage.path("captions", "stage1"), training_cluster,
                  pipes_subprocess_client, [])


@dg.asset(group_name="training", deps=[stage1_model, multimodal_captions_stage2], kinds={"pytorch", "mlflow"})
def stage2_model(
    context: dg.AssetExecutionContext, config: Stage2Config, storage: DatasetStorage,
    training_cluster: TrainingCluster, pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    """Stage 2: from stage 1's weights, one face or person crop per prompt at 1,296 tokens."""
    stage1 = Path(config.output_root) / "stage1" / "pipeline"
    return _train(context, 2, config, storage.path("captions", "stage2"), training_cluster,
                  pipes_subprocess_client, [f"init_from={stage1}"])


TRAINING_ASSETS = [stage1_model, stage2_model]
