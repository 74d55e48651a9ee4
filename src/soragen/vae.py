"""Stage 4: the causal video VAE (video compression network).

Frames [B, 3, 1+f*k, H, W] in [-1, 1] <-> KL latents [B, C, 1+k, H/s, W/s].

The first frame has a latent frame of its own; every next group of f frames shares
one. Spatial work is per frame (2D convolutions, frames folded into the batch), so it
never mixes time; temporal work runs at the latent frame rate through convolutions
padded on the left only. Hence a frame never influences an earlier latent, and the
decoder can run window by window with a cache of the last frames each causal
convolution saw, giving the same frames as one pass in memory bounded by the window.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from soragen.config import VAEConfig
from soragen.linear import onednn_takes


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def latent_frames_for(num_frames: int, f: int) -> int:
    """Latent frames 1+k that hold 1+f*k frames; raises if num_frames is not of that form."""
    if num_frames < 1 or (num_frames - 1) % f:
        raise ValueError(f"the VAE takes 1 + {f}*k frames (1, {1 + f}, {1 + 2 * f}, ...), got {num_frames}")
    return 1 + (num_frames - 1) // f


def frames_for(latent_frames: int, f: int) -> int:
    """Frames 1+f*k decoded from 1+k latent frames."""
    return 1 + f * (latent_frames - 1)


def _groups(channels: int) -> int:
    return 8 if channels % 8 == 0 else 1


def per_frame(fn, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """Apply a 2D module to every frame of x [B, C, T, H, W].

    channels_last: hand fn the frames stored channels-last on CPU, the layout oneDNN's convolutions work in
    (in the NCHW layout torch converts each convolution's input, output and gradients). For the decoder's
    2D stack on 8 clips of 17 frames (session 37, AVX-512): forward and backward 1.82-2.08 -> 1.23-1.28 s,
    forward alone 0.41-0.50 -> 0.32-0.34 s, the same loss and gradients.
    """
    b = x.shape[0]
    frames = rearrange(x, "b c t h w -> (b t) c h w")  # (B*T, C, H, W)
    if channels_last and frames.device.type == "cpu":
        frames = frames.contiguous(memory_format=torch.channels_last)
    y = fn(frames)  # (B*T, C', H', W')
    return rearrange(y, "(b t) c h w -> b c t h w", b=b)  # (B, C', T, H', W')


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


class CausalConv3d(nn.Module):
    """Conv over (T, H, W) padded in time on the left only: output frame i sees input frames <= i.

    With a `cache` dict, the last (kt - 1) input frames are kept between calls, so a
    sequence cut into windows gives the same output as the whole sequence at once.
    The very first window is padded by repeating its first frame.
    """

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int, int] = (3, 3, 3)):
        super().__init__()
        kt, kh, kw = kernel
        self.pad_t = kt - 1
        self.conv = nn.Conv3d(c_in, c_out, kernel, padding=(0, kh // 2, kw // 2))

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        if self.pad_t:
            prev = cache.get(self) if cache is not None else None
            if prev is None:
                prev = x[:, :, :1].expand(-1, -1, self.pad_t, -1, -1)  # (B, C, kt-1, H, W)
            x = torch.cat([prev, x], dim=2)  # (B, C, kt-1+T, H, W)
            if cache is not None:
                cache[self] = x[:, :, -self.pad_t :].detach().clone()  # a copy: a view would keep all of x alive
        conv = self.conv
        if onednn_takes(x):
            # torch sends a 3D convolution to its native kernel when batch x channels x frames x rows is
            # small, as for one window of one video: 34 ms against oneDNN's 5 ms for 64 channels on
            # 19 x 16 x 16 (measured); the same result, gradients included.
            return torch.mkldnn_convolution(x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation,
                                            conv.groups)  # (B, C', T, H, W)
        return conv(x)  # (B, C', T, H, W)


class ResBlock2D(nn.Module):
    """Per-image residual block: (GroupNorm, SiLU, conv3x3) x 2 plus a skip."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class CausalResBlock(nn.Module):
    """Residual block over time at the latent rate: per-frame GroupNorm, causal 3x3x3 convs."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(channels), channels)
        self.conv1 = CausalConv3d(channels, channels)
        self.norm2 = nn.GroupNorm(_groups(channels), channels)
        self.conv2 = CausalConv3d(channels, channels)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(per_frame(self.norm1, x)), cache)  # norms per frame: no statistics over time
        h = self.conv2(F.silu(per_frame(self.norm2, h)), cache)
        return x + h


# ---------------------------------------------------------------------------
# Encoder and decoder
# ---------------------------------------------------------------------------


class Encoder(nn.Module):
    """Frames [B, 3, 1+f*k, H, W] -> posterior parameters [B, 2C, 1+k, H/s, W/s]."""

    def __init__(self, channels: tuple[int, ...], f: int, temporal_channels: int, temporal_blocks: int, latent: int):
        super().__init__()
        self.f = f
        self.conv_in = nn.Conv2d(3, channels[0], 3, padding=1)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [ResBlock2D(c_in, c_in), nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)]
        layers.append(ResBlock2D(channels[-1], channels[-1]))
        self.spatial = nn.Sequential(*layers)
        self.time_in = nn.Conv3d(channels[-1] * f, temporal_channels, 1)
        self.time_blocks = nn.ModuleList(CausalResBlock(temporal_channels) for _ in range(temporal_blocks))
        self.norm_out = nn.GroupNorm(_groups(temporal_channels), temporal_channels)
        self.conv_out = nn.Conv3d(temporal_channels, 2 * latent, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.f
        h = per_frame(lambda im: self.spatial(self.conv_in(im)), x, channels_last=True)  # (B, C, T, h, w)
        h = torch.cat([h[:, :, :1].repeat(1, 1, f - 1, 1, 1), h], dim=2)  # (B, C, f*(1+k), h, w): frame 0 fills a group
        h = rearrange(h, "b c (k f) h w -> b (c f) k h w", f=f)  # (B, C*f, 1+k, h, w)
        h = self.time_in(h)  # (B, Ct, 1+k, h, w)
        for block in self.time_blocks:
            h = block(h)
        return self.conv_out(F.silu(per_frame(self.norm_out, h)))  # (B, 2C, 1+k, h, w)


class Decoder(nn.Module):
    """Latents [B, C, 1+k, h, w] -> frames [B, 3, 1+f*k, h*s, w*s], optionally window by window."""

    def __init__(self, channels: tuple[int, ...], f: int, temporal_channels: int, temporal_blocks: int, latent: int):
        super().__init__()
        self.f = f
        self.time_in = CausalConv3d(latent, temporal_channels, (1, 3, 3))
        self.time_blocks = nn.ModuleList(CausalResBlock(temporal_channels) for _ in range(temporal_blocks))
        self.norm_time = nn.GroupNorm(_groups(temporal_channels), temporal_channels)
        self.time_out = nn.Conv3d(temporal_channels, channels[-1] * f, 1)
        layers: list[nn.Module] = [ResBlock2D(channels[-1], channels[-1])]
        for c_in, c_out in zip(reversed(channels[1:]), reversed(channels[:-1])):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1), ResBlock2D(c_out, c_out)]
        self.spatial = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(_groups(channels[0]), channels[0])
        self.conv_out = nn.Conv2d(channels[0], 3, 3, padding=1)

    def forward(self, z: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        f = self.f
        first = cache is None or not cache.get("started", False)
        h = self.time_in(z, cache)  # (B, Ct, K, h, w)
        for block in self.time_blocks:
            h = block(h, cache)
        h = self.time_out(F.silu(per_frame(self.norm_time, h)))  # (B, C*f, K, h, w)
        h = rearrange(h, "b (c f) k h w -> b c (k f) h w", f=f)  # (B, C, K*f, h, w)
        if first:
            h = h[:, :, f - 1 :]  # (B, C, 1+f*(K-1), h, w): latent frame 0 holds one frame only
        if cache is not None:
            cache["started"] = True
        return per_frame(lambda im: self.conv_out(F.silu(self.norm_out(self.spatial(im)))), h,
                         channels_last=True)  # (B, 3, T, H, W)


# ---------------------------------------------------------------------------
# The VAE
# ---------------------------------------------------------------------------


class VideoVAE(nn.Module):
    """Causal spacetime VAE with a diagonal-Gaussian (KL) latent."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        args = (cfg.channels, cfg.temporal_compression, cfg.temporal_channels, cfg.temporal_blocks, cfg.latent_channels)
        self.encoder = Encoder(*args)
        self.decoder = Decoder(*args)
        c = cfg.latent_channels
        mean = torch.tensor(cfg.latent_mean) if cfg.latent_mean is not None else torch.zeros(c)
        std = torch.tensor(cfg.latent_std) if cfg.latent_std is not None else torch.ones(c)
        self.register_buffer("latent_mean", mean.view(1, c, 1, 1, 1).float(), persistent=False)
        self.register_buffer("latent_std", std.view(1, c, 1, 1, 1).float(), persistent=False)

    @property
    def temporal_compression(self) -> int:
        return self.cfg.temporal_compression

    @property
    def spatial_compression(self) -> int:
        return self.cfg.spatial_compression

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames [B, 3, 1+f*k, H, W] in [-1, 1] -> posterior mean and log-variance [B, C, 1+k, h, w]."""
        latent_frames_for(x.shape[2], self.cfg.temporal_compression)
        s = self.cfg.spatial_compression
        if x.shape[-1] % s or x.shape[-2] % s:
            raise ValueError(f"frame size must be a multiple of {s}, got {x.shape[-2]}x{x.shape[-1]}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)  # (B, C, 1+k, h, w) each
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, 1+k, h, w] -> frames [B, 3, 1+f*k, H, W], all at once."""
        return self.decoder(z)

    def decode_windows(self, windows: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Decode consecutive latent windows [B, C, K_i, h, w], yielding their frames as soon as each is done.

        Equal to `decode` on the concatenated latents; memory is bounded by one window.
        """
        cache: dict = {}
        for z in windows:
            yield self.decoder(z, cache)

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct frames; returns (reconstruction, mean, logvar) for the training losses."""
        mean, logvar = self.encode(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean
        return self.decode(z), mean, logvar

    # -- latent normalisation (per channel, fitted on the training data) --

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> the latents the DiT works on: zero mean, standard deviation vae.latent_scale."""
        return (z - self.latent_mean) / self.latent_std * self.cfg.latent_scale

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize`."""
        return z / self.cfg.latent_scale * self.latent_std + self.latent_mean
