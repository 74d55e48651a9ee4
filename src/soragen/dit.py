"""Stage 3 model: the diffusion transformer over spacetime latent patches.

Latents [B, C, T, H, W] are cut into patches of pt x ph x pw and become tokens
[B, N, D] ordered (t, h, w). Positions are factorised 3D sin-cos computed from the
token grid, so any duration, resolution and aspect ratio works. Each block is
adaLN-Zero self-attention (Peebles & Xie 2023, DiT, sec. 3.2), over all tokens or
factorised into attention within each frame and across frames (optionally with a
depthwise convolution over neighbouring frames), cross-attention to the
text tokens with their padding mask (PixArt-alpha, Chen et al. 2023), and an MLP. The
diffusion timestep is given per latent frame, so context frames can be clean while
the others are denoised.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from soragen.config import DiTConfig
from soragen.linear import Linear


# ---------------------------------------------------------------------------
# Embedding helpers
# ---------------------------------------------------------------------------


def sinusoidal(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sin-cos features of x [...] -> [..., dim] (Vaswani et al. 2017, sec. 3.5); dim must be even."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    angles = x.float()[..., None] * freqs  # (..., dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)  # (..., dim)


@functools.lru_cache(maxsize=16)
def position_embedding_3d(t: int, h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """Factorised 3D sin-cos positions for a t x h x w token grid -> [t*h*w, dim].

    A quarter of the channels encode time, the rest split between rows and columns.
    Computed once per grid (the sampler asks for the same grid at every step); do not modify the result.
    """
    d_t = 2 * (dim // 8)
    d_h = 2 * ((dim - d_t) // 4)
    d_w = dim - d_t - d_h
    d_w -= d_w % 2
    gt, gh, gw = torch.meshgrid(
        torch.arange(t, device=device), torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    emb = torch.cat(
        [sinusoidal(gt.flatten(), d_t), sinusoidal(gh.flatten(), d_h), sinusoidal(gw.flatten(), d_w)], dim=-1
    )  # (N, d_t + d_h + d_w)
    return F.pad(emb, (0, dim - emb.shape[-1]))  # (N, D)


class GELUTanh(nn.Module):
    """GELU, tanh approximation. Without gradients it is computed as x * sigmoid(x * (K + 0.044715 K x^2)),
    K = 2 sqrt(2/pi): the same function (tanh(u) = 2 sigmoid(2u) - 1) in four passes over x, at under
    a third of the cost of torch's kernel on CPU."""

    K = 2.0 * math.sqrt(2.0 / math.pi)

    def __init__(self):
        super().__init__()
        self.register_buffer("k", torch.tensor(self.K), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return F.gelu(x, approximate="tanh")
        return torch.addcmul(self.k, x, x, value=0.044715 * self.K).mul_(x).sigmoid_().mul_(x)


def run_mlp(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The block's MLP (Linear, tanh GELU, Linear). Where oneDNN takes the first product without gradients, the
    GELU runs inside it (so a hook on layers[0] sees its output after the GELU there, and layers[1] is not called);
    elsewhere the layers run one after another."""
    fc1, gelu, fc2 = layers
    return fc2(fc1(x, gelu_tanh=True) if fc1.fuses_gelu(x) else gelu(fc1(x)))


class PlainLayerNorm(nn.Module):
    """LayerNorm without a learned affine (adaLN supplies it), computed through torch's affine kernel with a
    fixed gain of 1 and bias of 0: the same numbers, and on CPU that kernel took 0.024 ms on one window's
    tokens against 0.042 ms for the kernel without an affine."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.register_buffer("ones", torch.ones(width), persistent=False)
        self.register_buffer("zeros", torch.zeros(width), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.ones.shape, self.ones, self.zeros, self.eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, per token-frame, in one pass. x [B, Tf, S, D]; shift, scale [B, Tf, 1, D]."""
    return torch.addcmul(shift, x, 1 + scale)


class TimestepEmbedder(nn.Module):
    """Diffusion timestep(s) [...] -> conditioning vectors [..., D] (sinusoidal features, then an MLP)."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(Linear(freq_dim, width), nn.SiLU(), Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal(t, self.freq_dim).to(self.mlp[0].weight.dtype))


# ---------------------------------------------------------------------------
# Attention and the block
# ---------------------------------------------------------------------------


class _RMSNormFunction(torch.autograd.Function):
    """RMS normalisation over the last axis, no affine, with its backward written out: dx = r (g - y mean(g y)).
    Autograd's decomposition of F.rms_norm on CPU took 14 ms forward and backward on one attention's queries and
    keys in training (256 x 17 x 2 x 4 x 64), this 9 ms (session 37)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        r = torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps))  # (..., 1)
        y = x * r
        ctx.save_for_backward(y, r)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        y, r = ctx.saved_tensors
        return torch.addcmul(grad, y, (grad * y).mean(-1, keepdim=True), value=-1).mul_(r), None


def rms_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """F.rms_norm over the last axis (times `weight`); in fp32 under CPU autocast (train.mixed_precision=bf16: the
    attention that reads it runs in fp32 there), and in fp32 CPU training through _RMSNormFunction."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        x, weight = x.float(), None if weight is None else weight.float()
    if torch.is_grad_enabled() and x.requires_grad and x.dtype == torch.float32 and x.device.type == "cpu":
        y = _RMSNormFunction.apply(x, eps)
        return y if weight is None else y * weight
    return F.rms_norm(x, (x.shape[-1],), weight, eps=eps)


# Score entries (batch x heads x queries x keys) up to which inference on CPU attends explicitly (4M: 16 MB of scores).
EXPLICIT_ATTENTION_MAX = 1 << 22


def cpu_fp32_inference(x: torch.Tensor) -> bool:
    """Whether work on x is fp32 inference on CPU: where `attention` may take its explicit path, whose products
    read contiguous operands in place (so the attentions make theirs contiguous once, up front)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """F.scaled_dot_product_attention on [B, h, N, d]; attn_mask [B, 1, 1, L] (True = attend) or None; scale as
    SDPA's (None = d^-0.5; the DiT folds it into the queries' gain and passes 1).

    - Under CPU autocast (train.mixed_precision=bf16) it runs in fp32: torch's CPU flash attention in bf16 took 1.09 s
      of a recipe training step's forward and backward against 0.11 s in fp32 (session 38, a CPU with AMX).
    - In fp32 inference on CPU, on the DiT's small attentions (16 tokens within a frame, 17 across frames, the
      prompt's few tokens), it is two products and a softmax: torch's flash kernel took 276 / 293 / 172 us on them
      where this takes 94 / 128 / 139 (session 39, AMD EPYC; on session 38's Intel Xeon they were alike). Rows whose
      keys are all masked go to SDPA, as do large attentions (their scores would not fit in cache).
    """
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):  # autocast would cast fp32 inputs down again
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask, scale=scale)
    if (cpu_fp32_inference(q) and q.shape[:-1].numel() * k.shape[-2] <= EXPLICIT_ATTENTION_MAX
            and (attn_mask is None or bool(attn_mask.any(-1).all()))):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        scores = torch.matmul(q, k.transpose(-1, -2))  # (B, h, N, L)
        if scale != 1.0:
            scores.mul_(scale)
        if attn_mask is not None:
            scores.masked_fill_(~attn_mask, float("-inf"))
        return torch.matmul(scores.softmax(-1), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def qk_gain(q_norm: nn.RMSNorm, k_norm: nn.RMSNorm) -> torch.Tensor:
    """The query and key norms' gains as one gain on the queries [d].

    Attention reads queries and keys only through q . k = sum_i q_i k_i, so RMS-normalised
    queries scaled by g_q * g_k against RMS-normalised keys give the same scores as each scaled
    by its own gain: one multiply instead of two, and cached keys need none. The attentions
    below also fold the softmax's d^-0.5 into it.
    """
    return q_norm.weight * k_norm.weight


class SelfAttention(nn.Module):
    """Multi-head self-attention over a sequence of tokens (`attention`) with RMS-normalised queries and keys."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(width, 3 * width)
        self.q_norm = nn.RMSNorm(width // heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(width // heads, eps=1e-6)
        self.proj = Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)  # (3, B, h, N, d)
        if cpu_fp32_inference(qkv):
            # One copy into the heads' layout, then the norm and both products read in place
            # (else each copies its operands): a denoising step of the built-in DiT 1-3 ms faster (session 40).
            qkv = qkv.contiguous()
        qk = rms_norm(qkv[:2], self.q_norm.eps)  # queries and keys normalised together by one kernel (2, B, h, N, d)
        q = qk[0] * (qk_gain(self.q_norm, self.k_norm) * qkv.shape[-1] ** -0.5)  # (B, h, N, d)
        out = attention(q, qk[1], qkv[2], scale=1.0)  # (B, h, N, d)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, D)


class CrossAttention(nn.Module):
    """Tokens attend to the text tokens; padded text positions are masked out."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = Linear(width, width)
        self.kv = Linear(width, 2 * width)
        self.q_norm = nn.RMSNorm(width // heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(width // heads, eps=1e-6)
        self.proj = Linear(width, width)

    def keys_values(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded text [B, L, D] -> normalised keys and values [B, h, L, d]: the same at every denoising step."""
        k, v = rearrange(self.kv(text), "b l (two h d) -> two b h l d", two=2, h=self.heads)  # (B, h, L, d) each
        # Contiguous (also in training: at most 48 text tokens), so each denoising step's products read them in place.
        return rms_norm(k.contiguous(), self.k_norm.eps), v.contiguous()  # the keys' gain acts through the queries

    def forward(self, x: torch.Tensor, keys_values: tuple[torch.Tensor, torch.Tensor], attn_mask: torch.Tensor) -> torch.Tensor:
        """x [B, N, D]; keys_values from `keys_values`; attn_mask [B, 1, 1, L], True = attend."""
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)  # (B, h, N, d)
        if cpu_fp32_inference(q):
            q = q.contiguous()  # as in SelfAttention
        q = rms_norm(q, self.q_norm.eps, qk_gain(self.q_norm, self.k_norm) * q.shape[-1] ** -0.5)
        k, v = keys_values
        out = attention(q, k, v, attn_mask, scale=1.0)  # (B, h, N, d)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, D)


class TemporalConv(nn.Module):
    """Depthwise convolution over token-frames at each spatial position, then a linear map (zero-initialised)."""

    def __init__(self, width: int, kernel: int = 3):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.conv = nn.Conv1d(width, width, kernel, padding=kernel // 2, groups=width)
        self.proj = Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, Tf, S, D] -> the residual update [B, Tf, S, D].

        The convolution is applied in place in this layout, as three shifted multiply-adds
        (the same as self.conv over time, without moving the tokens twice).
        """
        h = self.norm(x)  # (B, Tf, S, D)
        w = self.conv.weight[:, 0]  # (D, kernel)
        half = w.shape[1] // 2
        out = torch.addcmul(self.conv.bias, h, w[:, half])  # the frame itself
        for k in range(w.shape[1]):
            o = k - half  # frame offset read by tap k
            if o < 0:
                out[:, -o:].addcmul_(h[:, :o], w[:, k])
            elif o > 0:
                out[:, :-o].addcmul_(h[:, o:], w[:, k])
        return self.proj(out)


@dataclass
class TextConditioning:
    """What the DiT takes from the text, computed once per prompt (`DiT.condition_text`) and reused at
    every denoising step: the pooled text's conditioning vector and each block's cross-attention keys
    and values."""

    attn_mask: torch.Tensor  # (B, 1, 1, L): True = a real text token
    pooled: torch.Tensor | None  # (B, D), with dit.pooled_text
    keys_values: list[tuple[torch.Tensor, torch.Tensor]]  # per block: keys, values (B, h, L, d)

    def first(self, n: int) -> TextConditioning:
        """The first n rows (e.g. the conditional half of a guided batch)."""
        return TextConditioning(self.attn_mask[:n], None if self.pooled is None else self.pooled[:n],
                                [(k[:n], v[:n]) for k, v in self.keys_values])


@dataclass
class FrameConditioning:
    """The conditioning vector of each token-frame, [B, Tf, D], stored as its distinct rows.

    At sampling time the generated frames of a row mostly share one timestep (context frames have
    their own), so the adaLN projections run on a few distinct vectors instead of B x Tf.
    """

    rows: torch.Tensor  # (U, D)
    index: torch.Tensor | None  # (B * Tf,): the row of each token-frame; None = rows are already (B * Tf, D)
    shape: tuple[int, int]  # (B, Tf)

    @classmethod
    def of(cls, c: torch.Tensor) -> FrameConditioning:
        """c [B, Tf, D]; distinct rows are found only without gradients (torch.unique has none)."""
        flat = c.reshape(-1, c.shape[-1])  # (B * Tf, D)
        if torch.is_grad_enabled():
            return cls(flat, None, c.shape[:2])
        rows, index = torch.unique(flat, dim=0, return_inverse=True)
        return cls(rows, index, c.shape[:2])

    def project(self, layer: nn.Module, chunks: int) -> tuple[torch.Tensor, ...]:
        """layer(c), cut into `chunks` pieces of [B, Tf, 1, D'] each."""
        out = layer(self.rows)  # (U, chunks * D')
        if self.index is not None:
            out = out.index_select(0, self.index)  # (B * Tf, chunks * D')
        return out.view(*self.shape, 1, -1).chunk(chunks, dim=-1)


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention (full, or within frames then across frames), cross-attention to text, adaLN-Zero MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, factorized: bool = False, temporal_conv: bool = False):
        super().__init__()
        self.factorized = factorized
        self.tconv = TemporalConv(width) if temporal_conv else None
        self.norm1 = PlainLayerNorm(width)
        self.attn = SelfAttention(width, heads)  # over all tokens, or within each token-frame when factorized
        if factorized:
            self.norm_t = PlainLayerNorm(width)
            self.attn_t = SelfAttention(width, heads)  # across token-frames, one spatial position at a time
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.cross = CrossAttention(width, heads)
        self.norm3 = PlainLayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(Linear(width, hidden), GELUTanh(), Linear(hidden, width))
        self.adaLN = nn.Sequential(nn.SiLU(), Linear(width, (9 if factorized else 6) * width))

    def forward(self, x: torch.Tensor, c: FrameConditioning, keys_values: tuple[torch.Tensor, torch.Tensor],
                attn_mask: torch.Tensor) -> torch.Tensor:
        """x [B, Tf, S, D] tokens grouped by token-frame; c the conditioning per token-frame; keys_values and
        attn_mask this block's text (TextConditioning)."""
        b, tf, s, d = x.shape
        mod = c.project(self.adaLN, 9 if self.factorized else 6)  # (B, Tf, 1, D) each
        shift1, scale1, gate1, shift2, scale2, gate2 = mod[:6]
        h = modulate(self.norm1(x), shift1, scale1)  # (B, Tf, S, D)
        if self.factorized:
            x = torch.addcmul(x, gate1, self.attn(h.reshape(b * tf, s, d)).view(b, tf, s, d))  # within each token-frame
            shift_t, scale_t, gate_t = mod[6:]
            h = rearrange(modulate(self.norm_t(x), shift_t, scale_t), "b t s d -> (b s) t d")
            x = torch.addcmul(x, gate_t, rearrange(self.attn_t(h), "(b s) t d -> b t s d", b=b))  # across token-frames
        else:
            x = torch.addcmul(x, gate1, self.attn(h.reshape(b, tf * s, d)).view(b, tf, s, d))
        if self.tconv is not None:
            x = x + self.tconv(x)  # the same place one token-frame before and after
        x = x + self.cross(self.norm2(x).reshape(b, tf * s, d), keys_values, attn_mask).view(b, tf, s, d)
        x = torch.addcmul(x, gate2, run_mlp(self.mlp, modulate(self.norm3(x), shift2, scale2)))
        return x  # (B, Tf, S, D)


class ConvHead(nn.Module):
    """dit.conv_head: refine the linear head's prediction at latent resolution, across patch borders.

    Each latent pixel gets `features` channels projected from its token, beside the noisy latents and
    the prediction; two 3x3 convolutions within each frame turn them into a correction of the
    prediction. The last convolution starts at zero.
    """

    def __init__(self, width: int, patch_size: tuple[int, int, int], channels: int, hidden: int, features: int = 16):
        super().__init__()
        self.pixel_features = Linear(width, features * math.prod(patch_size))  # per token: F per latent pixel
        self.conv1 = nn.Conv2d(features + 2 * channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, pixels: torch.Tensor, x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """pixels [B, F, T, H, W] (pixel_features of the tokens, unpatchified), x and pred [B, C, T, H, W] -> pred refined."""
        b = x.shape[0]
        h = rearrange(torch.cat([pixels, x, pred], dim=1), "b c t h w -> (b t) c h w")  # (B*T, F+2C, H, W)
        delta = self.conv2(F.silu(self.conv1(h)))  # (B*T, C, H, W)
        return pred + rearrange(delta, "(b t) c h w -> b c t h w", b=b)


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


class DiT(nn.Module):
    """Denoiser: noisy latents [B, C, T, H, W], per-frame timesteps [B, T], text -> prediction [B, C, T, H, W]."""

    def __init__(self, cfg: DiTConfig, in_channels: int, text_dim: int):
        super().__init__()
        self.cfg = cfg
        self.in_channels = in_channels
        width = cfg.width
        pt, ph, pw = cfg.patch_size
        patch_dim = in_channels * pt * ph * pw
        self.x_embedder = Linear(patch_dim * (2 if cfg.self_condition else 1), width)
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = nn.Sequential(Linear(text_dim, width), nn.GELU(approximate="tanh"), Linear(width, width))
        self.pool_embedder = nn.Sequential(Linear(width, width), nn.SiLU(), Linear(width, width)) if cfg.pooled_text else None
        factorized = cfg.attention == "factorized"
        self.blocks = nn.ModuleList(DiTBlock(width, cfg.heads, cfg.mlp_ratio, factorized, cfg.temporal_conv) for _ in range(cfg.depth))
        self.norm_out = PlainLayerNorm(width)
        self.adaLN_out = nn.Sequential(nn.SiLU(), Linear(width, 2 * width))
        self.proj_out = Linear(width, patch_dim)
        self.conv_head = ConvHead(width, cfg.patch_size, in_channels, cfg.conv_head) if cfg.conv_head else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """All initialisation in one place (DiT, Peebles & Xie 2023)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Timestep MLP: small normal weights, as in DiT.
        for layer in self.t_embedder.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity (shift = scale = gate = 0), the temporal convolution too.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)
            if block.tconv is not None:
                nn.init.zeros_(block.tconv.proj.weight)
        # Output: zero modulation and zero projection, so the initial prediction is 0.
        nn.init.zeros_(self.adaLN_out[-1].weight)
        nn.init.zeros_(self.adaLN_out[-1].bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        if self.conv_head is not None:
            nn.init.zeros_(self.conv_head.conv2.weight)
            nn.init.zeros_(self.conv_head.conv2.bias)

    # -- patching -------------------------------------------------------------

    def check_grid(self, t: int, h: int, w: int) -> None:
        """Raise if a latent grid does not divide into patches."""
        pt, ph, pw = self.cfg.patch_size
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent grid {t}x{h}x{w} (T x H x W) must divide by the patch size {pt}x{ph}x{pw}")

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, T, H, W] -> patches [B, N, C*pt*ph*pw], tokens ordered (t, h, w)."""
        pt, ph, pw = self.cfg.patch_size
        return rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)

    def unpatchify(self, x: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
        """Patches [B, N, C*pt*ph*pw] -> latents [B, C, T, H, W]; t, h, w count tokens per axis."""
        pt, ph, pw = self.cfg.patch_size
        return rearrange(
            x, "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=pt, ph=ph, pw=pw
        )

    # -- forward --------------------------------------------------------------

    def condition_text(self, text: torch.Tensor, text_mask: torch.Tensor) -> TextConditioning:
        """Text [B, L, Dt] with its mask [B, L] -> what every forward takes from it (reusable across steps).

        Padding after the batch's last real token is cut off first: masked keys get no weight, so
        the result is the same, and a short prompt padded to the encoder's 48 tokens costs its length.
        """
        real = text_mask.any(dim=0).nonzero()  # (L', 1): positions some row uses
        length = int(real.max()) + 1 if real.numel() else 1
        text, text_mask = text[:, :length], text_mask[:, :length]  # (B, L', Dt), (B, L')
        y = self.y_embedder(text)  # (B, L', D)
        pooled = None
        if self.pool_embedder is not None:
            m = text_mask[..., None].to(y.dtype)  # (B, L, 1)
            pooled = self.pool_embedder((y * m).sum(1) / m.sum(1).clamp(min=1.0))  # (B, D)
        return TextConditioning(text_mask[:, None, None, :], pooled, [block.cross.keys_values(y) for block in self.blocks])

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor | TextConditioning,
        text_mask: torch.Tensor | None = None, x_self: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict for noisy latents x [B, C, T, H, W] at timesteps [B, T] (or [B]) given text [B, L, Dt] with
        its mask [B, L], or given `condition_text`'s result for them (then text_mask is not needed).

        x_self [B, C, T, H, W]: the previous estimate of the clean latents, for a model with
        dit.self_condition (None = zeros, "no estimate yet"); ignored otherwise.
        """
        b, _, t, h, w = x.shape
        self.check_grid(t, h, w)
        pt, ph, pw = self.cfg.patch_size
        gt, gh, gw = t // pt, h // ph, w // pw  # token grid
        if timesteps.ndim == 1:
            timesteps = timesteps[:, None].expand(b, t)  # (B, T)
        cond = text if isinstance(text, TextConditioning) else self.condition_text(text, text_mask)

        # 1. Tokens with 3D positions (self-conditioning: the estimate's patches beside the noisy ones).
        patches = self.patchify(x)  # (B, N, C*pt*ph*pw)
        if self.cfg.self_condition:
            estimate = self.patchify(x_self) if x_self is not None else torch.zeros_like(patches)
            patches = torch.cat([patches, estimate], dim=-1)  # (B, N, 2*C*pt*ph*pw)
        tokens = self.x_embedder(patches)  # (B, N, D)
        tokens = tokens + position_embedding_3d(gt, gh, gw, self.cfg.width, x.device).to(tokens.dtype)
        tokens = tokens.view(b, gt, gh * gw, -1)  # (B, Tf, S, D)

        # 2. Conditioning per token-frame: its timestep (averaged over the frames of a temporal patch) + pooled text.
        c = self.t_embedder(timesteps)  # (B, T, D)
        c = c.view(b, gt, pt, -1).mean(dim=2)  # (B, Tf, D)
        if cond.pooled is not None:
            c = c + cond.pooled[:, None]  # (B, Tf, D)
        frames = FrameConditioning.of(c)

        # 3. Blocks.
        for block, keys_values in zip(self.blocks, cond.keys_values):
            tokens = block(tokens, frames, keys_values, cond.attn_mask)  # (B, Tf, S, D)

        # 4. Output: adaLN, project to patches, fold back.
        shift, scale = frames.project(self.adaLN_out, 2)  # (B, Tf, 1, D) each
        h = modulate(self.norm_out(tokens), shift, scale).view(b, gt * gh * gw, -1)  # (B, N, D)
        pred = self.unpatchify(self.proj_out(h), gt, gh, gw)  # (B, C, T, H, W)
        if self.conv_head is not None:
            pixels = self.unpatchify(self.conv_head.pixel_features(h), gt, gh, gw)  # (B, F, T, H, W)
            pred = self.conv_head(pixels, x, pred)
        return pred
