"""Analyze: read dumps (xarray, Trial) and rank filters with Dask, without training."""

__all__: list[str] = []
