"""Surgery: checkpoint + ranks -> smaller checkpoint, via a torch.fx dependency graph."""

__all__: list[str] = []
