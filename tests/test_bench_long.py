"""The benchmark scripts: bench_long.py's products-alone measure and attention FLOPs; bench_train.py runs."""

import json

import pytest
import torch
from conftest import load_script
from torch import nn

from soragen.linear import Linear, native_bf16_products


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


def test_cpu_attention_is_counted():
    """torch counts no FLOPs for its CPU attention kernel; the script registers them (4 N^2 d per head and row)."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    load_script("bench_long")
    q, k, v = (torch.randn(2, 4, 10, 16) for _ in range(3))
    mask = torch.ones(2, 1, 10, 10, dtype=torch.bool)
    for kwargs in ({}, {"attn_mask": mask}):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, **kwargs)
        assert counter.get_total_flops() == 4 * 2 * 4 * 10 * 10 * 16


@pytest.mark.parametrize("precision", ["no", pytest.param("bf16", marks=pytest.mark.skipif(
    native_bf16_products() is None, reason="bf16 products are emulated on this CPU: the recipe's steps would take minutes"))])
def test_bench_train_times_each_step_of_the_recipe(tmp_path, capsys, precision):
    """scripts/bench_train.py runs the recipe's steps at its settings and reports each (one timed repetition)."""
    out = tmp_path / "bench.json"
    results = load_script("bench_train").main(["--steps", "1", "--mixed-precision", precision, "--json", str(out)])
    assert set(results) == {"vae_step_s", "cache_clips_per_s", "dit_step_s", "dit_first_estimate_s",
                            "decoder_phase_encode_s", "decoder_phase_denoise_s", "decoder_phase_decoder_s"}
    assert all(v > 0 for v in results.values())
    assert json.loads(out.read_text()) == results
    printed = capsys.readouterr().out
    assert "DiT stage step (16 windows x 17 latent frames)" in printed and "min per 1,000 steps" in printed
    assert f"mixed precision {precision};" in printed
