"""Analysis of vgbench results: figures (`analysis.figures`) and the report (`python -m analysis.report`).

Reads the parquet tables that `bench.run` writes (through `bench.results.load`); trains nothing.
"""
