"""The sharded assets' partitions: one per shard, so shards run in parallel on many workers."""

import dagster as dg

from mumu_model.data.shards import shard_name

from .params import params


def shard_partitions(num_shards: int | None = None) -> dg.StaticPartitionsDefinition:
    num_shards = num_shards or int(params()["num_shards"])
    return dg.StaticPartitionsDefinition([shard_name(i) for i in range(num_shards)])


SHARDS = shard_partitions()
