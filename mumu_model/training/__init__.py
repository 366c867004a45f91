"""Training MUMU: the data stream (`data`), and the trainer with its config and checkpoints.

`data` turns the caption shards of `mumu_model.data` (WebDataset tars) into a deterministic,
resumable, rank-split stream of training samples and collated batches whose conditioning goes
through the same `encoder_inputs` / `encode_inputs` code as sampling. `config` is the run's
`TrainConfig`, `trainer` runs it, `checkpoint` / `ema` / `identity` are what a run saves and how
it is named, and `parallel` / `sharded_init` / `sizing` are FSDP2, the sharded build and the
dry-run memory estimate.
"""
