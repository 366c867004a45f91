"""Dataset bootstrapping: from text-image data to multimodal-caption training records.

Plain library code, importable without Dagster; `mumu_assets` wraps it as assets.
"""
