import pytest
import torch

from soragen.config import VAEConfig
from soragen.vae import VideoVAE, frames_for, latent_frames_for

CFG = VAEConfig(channels=(8, 8, 16, 16), temporal_channels=32, latent_channels=4, temporal_blocks=2)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return VideoVAE(CFG).eval()


def test_frame_counts():
    assert latent_frames_for(1, 4) == 1 and latent_frames_for(17, 4) == 5
    assert frames_for(5, 4) == 17
    with pytest.raises(ValueError, match="1 \\+ 4\\*k"):
        latent_frames_for(16, 4)


def test_shapes(vae):
    x = torch.rand(2, 3, 9, 32, 48) * 2 - 1
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (2, 4, 3, 4, 6)
    assert vae.decode(mean).shape == (2, 3, 9, 32, 48)


@torch.no_grad()
def test_encoder_is_causal(vae):
    """Changing frame j changes no latent frame before the one that holds j."""
    x = torch.rand(1, 3, 13, 32, 32) * 2 - 1
    base, _ = vae.encode(x)
    for j in (0, 1, 4, 5, 12):
        y = x.clone()
        y[:, :, j] = torch.rand_like(y[:, :, j])
        changed, _ = vae.encode(y)
        window = 0 if j == 0 else 1 + (j - 1) // 4
        assert torch.equal(changed[:, :, :window], base[:, :, :window]), j
        assert not torch.allclose(changed[:, :, window], base[:, :, window])


@torch.no_grad()
def test_decoder_is_causal(vae):
    z = torch.randn(1, 4, 4, 4, 4)
    frames = vae.decode(z)
    z2 = z.clone()
    z2[:, :, 2] += 1.0
    frames2 = vae.decode(z2)
    first_affected = frames_for(3, 4) - 4  # latent 2 holds frames 5..8
    assert torch.equal(frames[:, :, :first_affected], frames2[:, :, :first_affected])
    assert not torch.allclose(frames[:, :, first_affected], frames2[:, :, first_affected])


@torch.no_grad()
@pytest.mark.parametrize("sizes", [(1, 1, 1, 1, 1, 1), (2, 3, 1), (4, 2), (3, 3)])
def test_windowed_decoding_equals_full(vae, sizes):
    z = torch.randn(1, 4, 6, 4, 4)
    full = vae.decode(z)
    bounds = torch.tensor((0, *sizes)).cumsum(0).tolist()
    windows = [z[:, :, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    parts = list(vae.decode_windows(windows))
    assert [p.shape[2] for p in parts] == [1 + 4 * (sizes[0] - 1)] + [4 * s for s in sizes[1:]]
    torch.testing.assert_close(torch.cat(parts, dim=2), full, atol=1e-5, rtol=1e-4)


def test_other_compressions():
    cfg = VAEConfig(temporal_compression=2, spatial_compression=4, channels=(8, 8, 8), temporal_channels=16, latent_channels=3)
    vae = VideoVAE(cfg)
    x = torch.zeros(1, 3, 7, 16, 16)
    mean, _ = vae.encode(x)
    assert mean.shape == (1, 3, 4, 4, 4)
    assert vae.decode(mean).shape == x.shape


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_normalisation_round_trip(scale):
    std = (1.0, 2.0, 3.0, 4.0)
    cfg = CFG.model_copy(update={"latent_mean": (0.1, 0.2, 0.3, 0.4), "latent_std": std, "latent_scale": scale})
    vae = VideoVAE(cfg)
    z = torch.randn(20000, 4, 1, 1, 1) * torch.tensor(std).view(1, 4, 1, 1, 1) + 0.5
    zn = vae.normalize(z)
    torch.testing.assert_close(vae.denormalize(zn), z)
    # Per channel: the given std divided out, then scaled by latent_scale.
    assert torch.allclose(zn.std(dim=0).flatten(), torch.full((4,), scale), rtol=0.05)


def test_causal_conv_matches_conv3d_with_gradients():
    """CausalConv3d's oneDNN call (torch's native 3D kernel is slow on one short window) is nn.Conv3d's arithmetic."""
    from soragen.vae import CausalConv3d

    torch.manual_seed(0)
    layer = CausalConv3d(4, 6)
    x = torch.randn(1, 4, 5, 8, 8, requires_grad=True)
    out = layer(x)
    padded = torch.cat([x[:, :, :1].expand(-1, -1, 2, -1, -1), x], dim=2)
    expected = layer.conv(padded)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad_fast = torch.autograd.grad(out.square().sum(), (x, layer.conv.weight))
    grad_plain = torch.autograd.grad(expected.square().sum(), (x, layer.conv.weight))
    for a, b in zip(grad_fast, grad_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
