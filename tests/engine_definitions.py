"""The project's Definitions with a synthesis backend that pauses between images, so a test can
kill a worker while a shard is half written. Loaded by the engine's own processes (the code
location of a workspace.yaml), never imported by the tests themselves."""

import time

from mumu_assets.definitions import build_definitions
from mumu_assets.profiles.toy import ToyRendererSynthesis


class _Pausing:
    def __init__(self, inner, pause_s: float):
        self.inner, self.pause_s = inner, pause_s

    def generate(self, rows, skipped):
        for item in self.inner.generate(rows, skipped=skipped):
            time.sleep(self.pause_s)
            yield item


class PausingSynthesis(ToyRendererSynthesis):
    pause_s: float = 0.15

    def build_synthesizer(self, height: int, width: int, steps: int, guidance: float, batch_size: int):
        return _Pausing(super().build_synthesizer(height, width, steps, guidance, batch_size), self.pause_s)


defs = build_definitions(resources={"synthesis_backend": PausingSynthesis(defect_probability=0.1)})
