import pytest
import torch

from soragen.config import DiTConfig
from soragen.dit import DiT, position_embedding_3d


def make(patch=(1, 2, 2), **kw) -> DiT:
    torch.manual_seed(0)
    return DiT(DiTConfig(width=32, depth=2, heads=2, patch_size=patch, **kw), in_channels=4, text_dim=16).eval()


def text(b=1, length=6, real=4):
    mask = torch.zeros(b, length, dtype=torch.bool)
    mask[:, :real] = True
    return torch.randn(b, length, 16) * mask[..., None], mask


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2), (1, 1, 1)])
def test_patchify_round_trip(patch):
    dit = make(patch)
    x = torch.randn(2, 4, 4, 6, 8)
    tokens = dit.patchify(x)
    pt, ph, pw = patch
    assert tokens.shape == (2, (4 // pt) * (6 // ph) * (8 // pw), 4 * pt * ph * pw)
    assert torch.equal(dit.unpatchify(tokens, 4 // pt, 6 // ph, 8 // pw), x)


@pytest.mark.parametrize("t, h, w", [(1, 8, 8), (5, 8, 8), (9, 4, 12), (3, 12, 4), (17, 2, 2)])
def test_any_duration_resolution_aspect(t, h, w):
    dit = make()
    for p in dit.proj_out.parameters():  # leave zero-init so the output depends on the input
        torch.nn.init.normal_(p, std=0.02)
    for block in dit.blocks:
        torch.nn.init.normal_(block.adaLN[-1].weight, std=0.02)
    y, m = text(2)
    x = torch.randn(2, 4, t, h, w)
    out = dit(x, torch.randint(0, 1000, (2, t)), y, m)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_zero_initialised_output():
    dit = make()
    y, m = text()
    out = dit(torch.randn(1, 4, 3, 4, 4), torch.tensor([500]), y, m)
    assert torch.count_nonzero(out) == 0


def test_bad_grid_is_a_clear_error():
    dit = make((2, 2, 2))
    y, m = text()
    with pytest.raises(ValueError, match="must divide by the patch size"):
        dit(torch.randn(1, 4, 3, 4, 4), torch.tensor([1]), y, m)


def _trained_like(dit):
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return dit


@torch.no_grad()
def test_timestep_is_per_frame():
    """Changing only frame 0's timestep changes the prediction; per-frame and scalar timesteps agree."""
    dit = _trained_like(make())
    y, m = text()
    x = torch.randn(1, 4, 3, 4, 4)
    same = dit(x, torch.tensor([[300, 300, 300]]), y, m)
    torch.testing.assert_close(same, dit(x, torch.tensor([300]), y, m))
    ctx = dit(x, torch.tensor([[0, 300, 300]]), y, m)
    assert not torch.allclose(ctx, same)


@torch.no_grad()
def test_padding_tokens_are_ignored():
    dit = _trained_like(make())
    y, m = text(real=3)
    x = torch.randn(1, 4, 2, 4, 4)
    out = dit(x, torch.tensor([100]), y, m)
    y2 = y.clone()
    y2[:, 3:] = torch.randn_like(y2[:, 3:]) * 10  # change only padded positions
    torch.testing.assert_close(dit(x, torch.tensor([100]), y2, m), out)
    keys, values = dit.condition_text(y, m).keys_values[0]
    assert keys.shape[2] == values.shape[2] == 3  # the padding after the last real token is not attended at all


def test_a_short_prompt_beside_a_long_one_is_predicted_as_alone():
    """In a batch the text is cut to the longest prompt: the shorter one's padding is then masked, not cut."""
    dit = _trained_like(make())
    y, m = text(real=3)
    y_long, m_long = torch.randn_like(y), torch.ones_like(m)
    x = torch.randn(1, 4, 2, 4, 4)
    alone = dit(x, torch.tensor([100]), y, m)
    both = dit(torch.cat([x, x]), torch.tensor([100, 100]), torch.cat([y, y_long]), torch.cat([m, m_long]))
    torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=1e-5)


def test_positions_distinguish_every_token():
    pos = position_embedding_3d(3, 4, 5, 32)
    assert pos.shape == (60, 32)
    assert torch.cdist(pos, pos).add(torch.eye(60) * 1e3).min() > 1e-3


def _live(dit: DiT) -> DiT:
    """Move a DiT off its zero initialisation so that its output depends on its input."""
    for p in dit.parameters():
        if p.ndim >= 1 and not p.abs().sum():
            torch.nn.init.normal_(p, std=0.05)
    return dit


@pytest.mark.parametrize("t, h, w", [(1, 8, 8), (9, 4, 12)])
def test_factorized_attention_any_grid(t, h, w):
    dit = _live(make(attention="factorized"))
    y, m = text(2)
    x = torch.randn(2, 4, t, h, w)
    out = dit(x, torch.randint(0, 1000, (2, t)), y, m)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_factorized_attention_starts_as_identity_blocks():
    """adaLN-Zero covers the extra attention too: a fresh factorised DiT predicts exactly 0."""
    dit = make(attention="factorized")
    y, m = text()
    assert torch.count_nonzero(dit(torch.randn(1, 4, 3, 4, 4), torch.tensor([500]), y, m)) == 0


def test_factorized_attention_reaches_across_frames_and_space():
    """A change at one place of one frame reaches other frames and other places (within and across frames)."""
    dit = _live(make(attention="factorized"))
    y, m = text()
    x = torch.randn(1, 4, 3, 4, 4)
    out = dit(x, torch.tensor([500]), y, m)
    x2 = x.clone()
    x2[:, :, 0, :2, :2] += 1.0  # frame 0, top-left token
    diff = (dit(x2, torch.tensor([500]), y, m) - out).abs()  # (1, 4, 3, 4, 4)
    assert diff[:, :, 2, :2, :2].sum() > 0  # same place, another frame
    assert diff[:, :, 2, 2:, 2:].sum() > 0  # another place, another frame (two blocks: space then time)


def test_temporal_conv_starts_as_identity_and_mixes_neighbouring_frames():
    """The temporal convolution adds nothing at initialisation; once trained it reaches the next frame at the same place."""
    dit = make(attention="factorized", temporal_conv=True)
    y, m = text()
    x = torch.randn(1, 4, 5, 4, 4)
    assert torch.count_nonzero(dit(x, torch.tensor([500]), y, m)) == 0
    dit = _live(dit)
    for block in dit.blocks:
        torch.nn.init.normal_(block.tconv.proj.weight, std=0.05)
        for layer in (block.attn, block.attn_t, block.cross):  # only the convolution may carry a frame to another
            torch.nn.init.zeros_(layer.proj.weight)
            torch.nn.init.zeros_(layer.proj.bias)
    out = dit(x, torch.tensor([500]), y, m)
    x2 = x.clone()
    x2[:, :, 2, :2, :2] += 1.0  # frame 2, top-left token
    diff = (dit(x2, torch.tensor([500]), y, m) - out).abs()  # (1, 4, 5, 4, 4)
    assert diff[:, :, 1, :2, :2].sum() > 0 and diff[:, :, 3, :2, :2].sum() > 0  # the frames before and after
    assert diff[:, :, 1:4, 2:, 2:].sum() == 0  # no other place: the convolution mixes time only


def test_self_condition_input():
    """dit.self_condition: the previous estimate is an input (None = zeros); without the flag there is none."""
    from soragen.config import DiTConfig

    torch.manual_seed(0)
    dit = DiT(DiTConfig(width=32, depth=1, heads=2, self_condition=True), 4, 16).eval()
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(1, 4, 2, 4, 4), torch.full((1, 2), 500)
    text, mask = torch.randn(1, 3, 16), torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        none = dit(x, t, text, mask)
        assert torch.equal(none, dit(x, t, text, mask, x_self=torch.zeros_like(x)))
        assert not torch.allclose(none, dit(x, t, text, mask, x_self=torch.randn_like(x)))
    assert DiT(DiTConfig(width=32, depth=1, heads=2), 4, 16).x_embedder.in_features * 2 == dit.x_embedder.in_features


@pytest.mark.parametrize("frames", [1, 2, 7])
def test_temporal_conv_is_a_depthwise_convolution_over_frames(frames):
    """The in-layout shifted multiply-adds give what nn.Conv1d over the frames gives, values and gradients."""
    import torch.nn.functional as F
    from einops import rearrange

    from soragen.dit import TemporalConv

    torch.manual_seed(0)
    tc = TemporalConv(16)
    torch.nn.init.normal_(tc.proj.weight, std=0.1)
    torch.nn.init.normal_(tc.conv.bias, std=0.1)
    x = torch.randn(2, frames, 5, 16, requires_grad=True)  # (B, Tf, S, D)

    def reference(x):
        h = rearrange(tc.norm(x), "b t s d -> (b s) d t")
        h = F.conv1d(h, tc.conv.weight, tc.conv.bias, padding=1, groups=16)
        return tc.proj(rearrange(h, "(b s) d t -> b t s d", b=2))

    out, ref = tc(x), reference(x)
    torch.testing.assert_close(out, ref)
    g_out = torch.autograd.grad(out.square().sum(), [x, tc.conv.weight])
    g_ref = torch.autograd.grad(ref.square().sum(), [x, tc.conv.weight])
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b)


def test_gelu_is_the_tanh_approximation_with_and_without_gradients():
    import torch.nn.functional as F

    from soragen.dit import GELUTanh

    x = torch.linspace(-8, 8, 4001)
    with torch.no_grad():
        torch.testing.assert_close(GELUTanh()(x), F.gelu(x, approximate="tanh"), atol=2e-6, rtol=1e-5)
    x.requires_grad_(True)
    y = GELUTanh()(x)
    assert y.requires_grad and torch.equal(y, F.gelu(x, approximate="tanh"))


def _reference_attention(attn, x, text=None, mask=None):
    """Attention as written in the papers: each of q and k RMS-normalised with its own gain (torch's RMSNorm)."""
    import torch.nn.functional as F

    h = attn.heads
    if text is None:  # self-attention
        q, k, v = attn.qkv(x).chunk(3, dim=-1)
        attn_mask = None
    else:
        q = attn.q(x)
        k, v = attn.kv(text).chunk(2, dim=-1)
        attn_mask = mask[:, None, None, :]
    q, k, v = (t.unflatten(-1, (h, -1)) for t in (q, k, v))  # (B, N, h, d)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
    return attn.proj(out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_attention_folds_the_key_gain_into_the_queries_exactly(kind):
    """q and k normalised in one kernel with the gains g_q * g_k on the queries: the same outputs and
    gradients as normalising each with its own gain (the keys of a cross-attention are cached without one)."""
    from soragen.dit import CrossAttention, SelfAttention

    torch.manual_seed(0)
    attn = SelfAttention(32, 4) if kind == "self" else CrossAttention(32, 4)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, 32, requires_grad=True)
    if kind == "self":
        out, ref = attn(x), _reference_attention(attn, x)
    else:
        text, mask = torch.randn(2, 5, 32), torch.tensor([[True] * 5, [True, True, False, False, False]])
        out, ref = attn(x, attn.keys_values(text), mask[:, None, None, :]), _reference_attention(attn, x, text, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    params = [x, attn.q_norm.weight, attn.k_norm.weight]
    for a, b in zip(torch.autograd.grad(out.square().sum(), params), torch.autograd.grad(ref.square().sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attention, pooled_text", [("factorized", True), ("full", False)])
def test_text_conditioned_once_and_shared_frame_conditioning_give_the_same_prediction(attention, pooled_text):
    """The sampler's fast path (DiT.condition_text once, adaLN on the distinct token-frame conditionings)
    predicts what a plain forward with gradients does, for context frames at their own timestep too."""
    from soragen.config import DiTConfig

    torch.manual_seed(0)
    cfg = DiTConfig(width=32, depth=2, heads=4, patch_size=[1, 2, 2], attention=attention, temporal_conv=True,
                    self_condition=True, pooled_text=pooled_text)
    dit = DiT(cfg, in_channels=4, text_dim=16)
    for p in dit.parameters():  # leave the zero initialisation: every path has to carry signal
        torch.nn.init.normal_(p, std=0.2)
    x, x_self = torch.randn(2, 4, 5, 4, 4), torch.randn(2, 4, 5, 4, 4)
    timesteps = torch.tensor([[0, 0, 700, 700, 700], [0, 0, 300, 300, 300]])
    text, mask = torch.randn(2, 6, 16), torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    plain = dit(x, timesteps, text, mask, x_self=x_self)  # gradients on: every token-frame projected on its own
    with torch.no_grad():
        cond = dit.condition_text(text, mask)
        fast = dit(x, timesteps, cond, x_self=x_self)
        first = dit(x[:1], timesteps[:1], cond.first(1), x_self=x_self[:1])
    torch.testing.assert_close(fast, plain.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first, plain.detach()[:1], atol=1e-5, rtol=1e-5)


def test_conv_head_starts_as_the_model_without_it_and_learns():
    """dit.conv_head: a model that gains the head predicts what it did (its last convolution is zero),
    and the head's weights get gradients, so training can move them."""
    from soragen.config import DiTConfig

    torch.manual_seed(0)
    plain_cfg = DiTConfig(width=32, depth=1, heads=4, patch_size=[1, 2, 2], attention="factorized")
    plain = DiT(plain_cfg, in_channels=4, text_dim=16)
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.2)
    headed = DiT(plain_cfg.model_copy(update={"conv_head": 8}), in_channels=4, text_dim=16)
    headed.load_state_dict(plain.state_dict() | {k: v for k, v in headed.state_dict().items() if k.startswith("conv_head.")})
    x, t = torch.randn(1, 4, 3, 4, 4), torch.tensor([500])
    text, mask = torch.randn(1, 5, 16), torch.ones(1, 5, dtype=torch.bool)
    out = headed(x, t, text, mask)
    torch.testing.assert_close(out, plain(x, t, text, mask))
    out.square().sum().backward()
    assert headed.conv_head.conv2.weight.grad.abs().sum() > 0


def test_runs_in_bfloat16_close_to_float32():
    """A DiT cast to bfloat16 (as on a GPU) takes bfloat16 inputs throughout, timestep features included."""
    torch.manual_seed(0)
    cfg = DiTConfig(width=32, depth=2, heads=2, patch_size=[1, 2, 2], temporal_conv=True, self_condition=True,
                    pooled_text=True)
    dit = DiT(cfg, in_channels=4, text_dim=16).eval()
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, x_self = torch.randn(1, 4, 3, 4, 4), torch.randn(1, 4, 3, 4, 4)
    txt, mask = text()
    with torch.no_grad():
        ref = dit(x, torch.tensor([500]), txt, mask, x_self=x_self)
        out = dit.to(torch.bfloat16)(x.bfloat16(), torch.tensor([500]), txt.bfloat16(), mask, x_self=x_self.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_linear_matches_nn_linear_with_and_without_gradients():
    """soragen.linear.Linear (oneDNN where torch has it) computes what nn.Linear does, gradients included."""
    from soragen.linear import Linear, plain_linear

    torch.manual_seed(0)
    fast = Linear(24, 40)
    plain = torch.nn.Linear(24, 40)
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast(x.transpose(0, 1)), plain(x.transpose(0, 1)), rtol=1e-5, atol=1e-5)
    grads = []
    for layer in (fast, plain):
        xi = x.clone().requires_grad_()
        (layer(xi) * torch.linspace(-1, 1, 40)).square().sum().backward()
        grads.append((xi.grad, layer.weight.grad, layer.bias.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with plain_linear(), torch.no_grad():  # the switch the benchmark uses to compare GEMMs
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
    empty = torch.zeros(0, 24, requires_grad=True)
    fast(empty).sum().backward()  # no rows: as nn.Linear, no error
    assert empty.grad.shape == (0, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the dtype, as for nn.Linear
        assert fast(x).dtype == plain(x).dtype == torch.bfloat16


def test_rms_norm_matches_torch_with_gradients():
    """dit.rms_norm (its own backward in fp32 CPU training) gives F.rms_norm's values and gradients, on a
    strided slice as the attention takes it and with a gain."""
    import torch.nn.functional as F

    from soragen.dit import rms_norm

    torch.manual_seed(0)
    qkv = torch.randn(3, 5, 3, 2, 8) * 4
    gain = torch.rand(8) + 0.5
    grads = []
    for norm in (lambda x, w: rms_norm(x, 1e-6, w), lambda x, w: F.rms_norm(x, (8,), w, eps=1e-6)):
        x, w = qkv.clone().requires_grad_(), gain.clone().requires_grad_()
        out = norm(x[:, :, :2], w)
        (out * torch.linspace(-1, 2, 8)).square().sum().backward()
        grads.append((out.detach(), x.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_attention_under_cpu_autocast_runs_in_fp32_with_gradients():
    """Under CPU autocast (train.mixed_precision=bf16) dit.attention takes bf16 or fp32 inputs to fp32 SDPA: the
    same values and gradients as SDPA outside autocast on the same inputs."""
    import torch.nn.functional as F

    from soragen.dit import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 7, 8).bfloat16().float() for _ in range(3))
    mask = torch.tensor([True] * 5 + [False] * 2).view(1, 1, 1, 7)
    results = []
    for under_autocast in (True, False):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=under_autocast):
            a, b, c = inputs[0], inputs[1].bfloat16(), inputs[2].bfloat16()  # keys and values from bf16 products
            out = attention(a, b, c, mask) if under_autocast else F.scaled_dot_product_attention(
                a, b.float(), c.float(), attn_mask=mask)
        assert out.dtype == torch.float32
        out.square().sum().backward()
        results.append((out.detach(), *(x.grad for x in inputs)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("queries, keys, masked", [(16, 16, 0), (17, 17, 0), (272, 5, 2)])
def test_small_attention_in_inference_matches_sdpa(queries, keys, masked):
    """In fp32 inference on CPU the DiT's small attentions (within a frame, across frames, to the prompt's tokens,
    some of them padding) run as two products and a softmax: the same values as SDPA on strided inputs, as the
    blocks pass them. A row whose keys are all masked, and attentions above EXPLICIT_ATTENTION_MAX, go to SDPA."""
    import torch.nn.functional as F

    import soragen.dit as dit

    torch.manual_seed(0)
    qkv = torch.randn(3, queries, 4, 64)  # (three, N, h, d)
    q = qkv[0].unsqueeze(0).expand(2, -1, -1, -1).transpose(1, 2)  # (2, h, N, d), not contiguous
    k, v = (torch.randn(2, keys, 4, 64).transpose(1, 2) for _ in range(2))
    mask = torch.arange(keys).view(1, 1, 1, keys) < keys - masked
    mask = mask.expand(2, 1, 1, keys).clone() if masked else None
    with torch.no_grad():
        torch.testing.assert_close(dit.attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                   rtol=1e-5, atol=1e-5)
        if masked:
            mask[1] = False  # the second row attends to nothing: SDPA's answer, whatever it is
            torch.testing.assert_close(dit.attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                       equal_nan=True)
        old, dit.EXPLICIT_ATTENTION_MAX = dit.EXPLICIT_ATTENTION_MAX, 0
        try:
            assert torch.equal(dit.attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        finally:
            dit.EXPLICIT_ATTENTION_MAX = old


def test_mlp_with_its_gelu_in_the_product_matches_apart():
    """The block's MLP without gradients (the GELU inside oneDNN's product where it is used) gives what the layers
    give one after another; with gradients it is the layers one after another."""
    from soragen.dit import GELUTanh, run_mlp
    from soragen.linear import Linear

    torch.manual_seed(0)
    layers = torch.nn.Sequential(Linear(16, 64), GELUTanh(), Linear(64, 16))
    x = torch.randn(2, 3, 5, 16)
    apart = layers(x)
    with torch.no_grad():
        torch.testing.assert_close(run_mlp(layers, x), apart.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run_mlp(layers, x), apart)
    if not layers[0].fuses_gelu(x):  # with gradients, or without oneDNN: asking for the fused GELU is an error
        with pytest.raises(ValueError, match="gelu_tanh"):
            layers[0](x, gelu_tanh=True)


def test_linear_flops_are_counted():
    """The benchmark's FlopCounterMode sees the oneDNN products as it sees addmm: 2 FLOPs per multiply-add."""
    from torch.utils.flop_counter import FlopCounterMode

    from soragen.linear import Linear

    layer = Linear(16, 32)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        layer(torch.randn(2, 7, 16))
    assert counter.get_total_flops() == 2 * 14 * 16 * 32
