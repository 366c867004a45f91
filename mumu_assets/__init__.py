"""Dagster software-defined assets of MUMU: thin wrappers over `mumu_model` library steps.

Load with `dagster dev -m mumu_assets.definitions` (the Definitions object is `defs`).
"""
