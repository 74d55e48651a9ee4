"""nn.Linear whose products run through oneDNN where this torch build has it.

torch multiplies fp32 matrices on x86 with MKL, and MKL takes its AVX2 code on AMD CPUs; oneDNN
(also in every x86 torch build, the library behind torch's CPU convolutions) compiles AVX-512
kernels for the CPU it finds. On the project's 2-core AMD EPYC machines, a 2048^3 fp32 product
ran at 190-195 GFLOP/s through `torch.matmul` and at 358-435 through oneDNN; one denoising step of
the built-in DiT took 32-36 ms instead of 55-60 (the same outputs to 5e-6), and a training forward
and backward of 16 windows 1.09 s instead of 1.58 (gradients the same to 1e-6 of their largest entry;
the weight's gradient now goes through torch.mm, see _LinearFunction).
Anywhere else (no oneDNN, a CPU without AVX-512, not x86-64, not fp32 on CPU, under autocast, empty
input) `Linear` is plain `nn.Linear`.
"""

from __future__ import annotations

import contextlib
import contextvars
import platform
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import flop_registry, register_flop_formula


_X86 = platform.machine().lower() in ("x86_64", "amd64")


def on_x86_with_onednn() -> bool:
    """Whether this process runs on x86-64 with oneDNN enabled: where its kernels were measured faster.

    Elsewhere (e.g. ARM, where torch's default GEMM is not MKL) nothing was measured, so nothing changes.
    """
    return _X86 and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def native_bf16_products() -> str | None:
    """The CPU flag by which this x86 CPU multiplies bf16 natively (`amx_bf16`, then `avx512_bf16`), or None.

    Elsewhere torch emulates bf16 products, far slower than fp32. Where it is native, training under
    `train.mixed_precision=bf16` took 0.67 s a DiT step against 1.20 s in fp32 (AMD EPYC with AVX-512 BF16,
    session 39) and 0.85 against 1.32 s (Intel Xeon with AMX, session 38).
    """
    if not _X86:
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return None
    return next((flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags), None)


def onednn_takes(x: torch.Tensor) -> bool:
    """Whether soragen sends work on x to oneDNN's kernels: fp32 on CPU, outside autocast, on x86-64 with oneDNN."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and on_x86_with_onednn())


# torch's oneDNN linear (y = x W^T + b with an optional fused activation), or None. Only on CPUs with AVX-512:
# on an AMD EPYC without it (session 30) oneDNN's GEMM was the slower one, 120 against torch.matmul's 157
# GFLOP/s at 2048^3, and a denoising step took 158 ms through it against 92 ms through F.linear.
_AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if on_x86_with_onednn() and _AVX512 else None
_plain = contextvars.ContextVar("soragen_plain_linear", default=False)


def onednn_active() -> bool:
    """Whether `Linear` layers run through oneDNN (fp32 on CPU) here and now."""
    return _LINEAR is not None and not _plain.get()


@contextlib.contextmanager
def plain_linear() -> Iterator[None]:
    """Run `Linear` layers through F.linear (torch's default GEMM) inside the block (this thread or task only)."""
    token = _plain.set(True)
    try:
        yield
    finally:
        _plain.reset(token)


def _matmul_t(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [..., k] @ b [n, k]^T (+ bias [n]) through oneDNN; either operand may be a transposed view."""
    return _LINEAR(a, b, bias, "none", [], "")


class _LinearFunction(torch.autograd.Function):
    """y = x W^T + b: the forward product and the input's gradient through oneDNN, the weight's gradient through
    torch.mm. oneDNN takes that product's transposed gradient [out, rows] only after copying it whole (up to a
    third of a second per training step of the built-in DiT in torch's profiler); MKL reads it transposed in place.
    A training step of 16 windows, medians of three A/B runs of 10 steps (session 37, AVX-512): 1.97-2.67 s with
    oneDNN's, 1.88-1.98 s with torch.mm's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _matmul_t(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the oneDNN op has no gradient of its own
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1])  # (rows, out)
        grad_x = _matmul_t(grad, weight.t()) if ctx.needs_input_grad[0] else None  # grad @ W
        grad_w = torch.mm(grad_rows.t(), x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None  # grad^T @ x
        grad_b = grad_rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys); fp32 on CPU, through oneDNN."""

    def takes_onednn(self, x: torch.Tensor) -> bool:
        """Whether this layer's product on x runs through oneDNN (else F.linear)."""
        return onednn_active() and bool(x.numel()) and self.weight.dtype == torch.float32 and onednn_takes(x)

    def fuses_gelu(self, x: torch.Tensor) -> bool:
        """Whether forward(x, gelu_tanh=True) is taken here: oneDNN's product without gradients."""
        return not torch.is_grad_enabled() and self.takes_onednn(x)

    def forward(self, x: torch.Tensor, gelu_tanh: bool = False) -> torch.Tensor:
        """x W^T + b; with gelu_tanh (only where `fuses_gelu`), its tanh-approximation GELU computed inside
        oneDNN's product, on each block of it while it is in cache: in the built-in DiT's MLP a denoising step
        took 75.6 ms against 82.4, and 92.4 against 98.9 in a slower hour (medians of 128 interleaved steps
        each, session 37), the same outputs to 3e-6."""
        if gelu_tanh:
            if not self.fuses_gelu(x):
                raise ValueError("gelu_tanh is computed inside oneDNN's product without gradients only (see fuses_gelu)")
            return _LINEAR(x, self.weight, self.bias, "gelu", [], "tanh")
        if not self.takes_onednn(x):
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled():
            return _LinearFunction.apply(x, self.weight, self.bias)
        return _matmul_t(x, self.weight, self.bias)


def _linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the oneDNN linear, for torch's FlopCounterMode: 2 per multiply-add, as for aten.addmm."""
    rows = 1
    for n in x_shape[:-1]:
        rows *= n
    return 2 * rows * w_shape[0] * w_shape[1]


if _LINEAR is not None and _LINEAR not in flop_registry:  # not twice (a reload), nor over torch's own
    register_flop_formula(_LINEAR)(_linear_flops)
