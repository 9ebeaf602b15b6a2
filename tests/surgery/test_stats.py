"""FLOP counting that says why it failed, and settings checked before any tracing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tdump.surgery as surgery
from tdump.errors import ConfigError
from tdump.surgery._stats import InputChannelsError, clause_line


class _Gray(nn.Module):
    """Makes its own channels before the first conv: grayscale repeated to RGB."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.repeat(1, 3, 1, 1))


def test_wrong_input_channels_name_the_first_conv() -> None:
    model = nn.Sequential(nn.Identity(), nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()))
    with pytest.raises(InputChannelsError) as info:
        surgery.output_positions(model, (3, 8, 8))
    assert (info.value.layer, info.value.expected, info.value.got) == ("1.0", 1, 3)
    assert (
        str(info.value) == "the model's first conv (1.0) expects 1 input channels, the input has 3"
    )
    assert surgery.output_positions(model, (1, 8, 8)) == {"1.0": 36}

    # a conv that does not read the input as it came is not blamed for its channels
    assert surgery.output_positions(_Gray(), (1, 8, 8)) == {"conv": 36}
    with pytest.raises(RuntimeError) as torch_error:
        surgery.output_positions(_Gray(), (2, 8, 8))
    assert not isinstance(torch_error.value, InputChannelsError)


def test_clause_line_cuts_at_a_boundary() -> None:
    short = ValueError("one line\nand more")
    assert clause_line(short) == "one line"
    long = ValueError("first clause is here; " + "x" * 300)
    assert clause_line(long) == "first clause is here"
    assert clause_line(ValueError("y" * 300)) == "y" * 240 + "..."
    assert clause_line(KeyError()) == "KeyError"


def test_unknown_aggregation_is_said_before_tracing() -> None:
    """A model without coupled convs never looks the name up: it is checked anyway."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(ConfigError, match="unknown aggregation 'bogus'; choose one of"):
        surgery.plan(model, {"0": np.arange(4.0)}, ratio=0.5, aggregate="bogus")
