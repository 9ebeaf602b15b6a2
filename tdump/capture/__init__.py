"""Capture: the hook inside the training process that writes tensors to a Zarr store."""

__all__: list[str] = []
