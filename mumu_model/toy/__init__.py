"""The toy world, a plugin: coloured shapes on low-saturation backgrounds, rendered procedurally,
small enough that every "pretrained" part of the pipeline trains on a laptop CPU in minutes.

- `world`: the prompt grammar, the renderer (a drop-in for the SDXL synthesizer that also knows
  its boxes) and its colour counting;
- `pretrained`: the VAE and CLIP the toy profile trains from its renders;
- `shapes`: model-free segmentation, shape classification and object matching;
- `metrics`: the colour and object probes, registered as the evaluation's `toy` world
  (`mumu.worlds` entry points);
- `suites`: the held-out validation and test suites.

Captions mostly leave the colour out, so a model can only get it right from the crop. The data
graph plugs the world in through `mumu_assets.profiles.toy`; no other module imports it.
"""
