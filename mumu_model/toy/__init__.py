"""The toy world: a procedurally rendered world of coloured shapes on low-saturation
backgrounds, small enough that every "pretrained" part of the pipeline can be trained on a laptop
CPU in minutes. `world.py` holds its prompt grammar, the renderer (a drop-in for the SDXL
synthesizer that also knows its boxes) and an analytic colour probe; `suites.py` writes the
held-out validation and test suites (one, two and three objects, and crops drawn outside the
renderer). Captions mostly leave the colour out, so a model can only get it right from the crop.
"""
