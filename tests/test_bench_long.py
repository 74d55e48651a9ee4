"""scripts/bench_long.py's products-alone measure: every linear layer's product of one forward, at its shape."""

import torch
from conftest import load_script
from torch import nn

from soragen.linear import Linear


def test_products_alone_counts_each_call_of_each_linear_layer():
    torch.manual_seed(0)
    first, second = Linear(8, 16), nn.Linear(16, 4)
    model = nn.Sequential(first, nn.GELU(), second)
    x = torch.randn(3, 5, 8)

    def forward():  # the second layer runs twice, on inputs of two shapes
        h = model(x)
        return second(torch.randn(7, 16)) + h.sum()

    seconds, flops = load_script("bench_long").products_alone(model, forward, reps=3)
    assert flops == 2 * 15 * 8 * 16 + 2 * 15 * 16 * 4 + 2 * 7 * 16 * 4
    assert 0 < seconds < 1
