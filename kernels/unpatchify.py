"""Unpatchify: patch tokens (B, h*w, p*p*c), each vector in (p, p, c) order -> images (B, c, h*p, w*p).

Equal to the official ``DiT.unpatchify`` (reshape to (N, h, w, p, p, c), einsum 'nhwpqc->nchpwq') for square grids;
``grid=(h, w)`` handles others. Four layers: the kernel (``patchify``'s index-map ``_patch_kernel`` with the (p, p, c)
vector order: this forward is its scatter, this backward its gather); the launchers ``unpatchify_fwd/_bwd`` (no
autograd); the custom ops ``dit_fast::unpatchify`` (+ autograd) and ``dit_fast::unpatchify_bwd``, which
``torch.compile(fullgraph=True)`` traces through; and the public ``unpatchify`` beside its plain-PyTorch oracle
``unpatchify_ref``.
"""

from __future__ import annotations

import math

import torch

from ._common import Launch, capture_launches, check_tensor, register_op, use_triton
from .patchify import LATENT_CHANNELS, LATENT_SIZE, PATCH_SIZES, launch_patch_copy


def _resolve_grid(y: torch.Tensor, p: int, c: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    """Check the shape of ``y`` (B, T, p*p*c) and return the token grid (h, w): ``grid`` or, if None, the square one."""
    if y.dim() != 3:
        raise ValueError(f"y must have 3 dims (B, T, p*p*c), got shape {tuple(y.shape)}")
    if not isinstance(p, int) or p < 1 or not isinstance(c, int) or c < 1:
        raise ValueError(f"patch size p and channels c must be positive ints, got p={p!r}, c={c!r}")
    T, K = y.shape[1], y.shape[2]
    if K != p * p * c:
        raise ValueError(f"token vectors of y have {K} elements, expected p*p*c = {p}*{p}*{c} = {p * p * c}")
    if grid is None:
        side = math.isqrt(T)
        if side * side != T:
            raise ValueError(f"{T} tokens do not form a square grid; pass grid=(h, w)")
        return side, side
    h, w = grid
    if h * w != T:
        raise ValueError(f"grid {tuple(grid)} has {h * w} cells but y has {T} tokens")
    return h, w


def unpatchify_fwd(y: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    """Launch the scatter kernel (no autograd): y (B, h*w, p*p*c), (p, p, c) vectors -> (B, c, h*p, w*p)."""
    check_tensor("y", y, 3)
    _resolve_grid(y, p, c, (h, w))
    img = torch.empty((y.shape[0], c, h * p, w * p), dtype=y.dtype, device=y.device)
    launch_patch_copy(img, y, p, channels_last=True, to_tokens=False)
    return img


def unpatchify_bwd(grad_img: torch.Tensor, p: int) -> torch.Tensor:
    """Launch the gather kernel (no autograd): grad (B, c, h*p, w*p) -> grad of the tokens (B, h*w, p*p*c)."""
    check_tensor("grad_img", grad_img, 4)
    B, c, H, W = grad_img.shape
    if H % p or W % p:
        raise ValueError(f"image size {(H, W)} is not divisible by the patch size {p}")
    tok = torch.empty((B, (H // p) * (W // p), p * p * c), dtype=grad_img.dtype, device=grad_img.device)
    launch_patch_copy(grad_img, tok, p, channels_last=True, to_tokens=True)
    return tok


_fwd_op = register_op("dit_fast::unpatchify", unpatchify_fwd)
_bwd_op = register_op("dit_fast::unpatchify_bwd", unpatchify_bwd)


def _setup_context(ctx, inputs, output) -> None:
    ctx.p = inputs[1]


def _backward(ctx, grad_img):
    return _bwd_op(grad_img, ctx.p), None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def unpatchify_ref(y: torch.Tensor, p: int, c: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Plain-PyTorch oracle, the official ``DiT.unpatchify`` generalised to an (h, w) grid.

    y (B, h*w, p*p*c), vectors in (p, p, c) order -> (B, c, h*p, w*p).
    """
    h, w = _resolve_grid(y, p, c, grid)
    x = y.reshape(y.shape[0], h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(y.shape[0], c, h * p, w * p)


def unpatchify(y: torch.Tensor, p: int, c: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Reassemble images from patch tokens, differentiable; the inverse of the final layer's token layout.

    Args:
        y: (B, T, p*p*c), fp32/fp16/bf16, each token vector in (p, p, c) order (the official final layer's layout);
            any strides.
        p: patch size. c: output channels.
        grid: (h, w) patch grid with h*w = T; None for the square grid h = w = sqrt(T).

    Returns:
        (B, c, h*p, w*p), contiguous. CUDA tensors run the Triton kernels; CPU tensors the reference (or the kernels
        in the Triton interpreter with ``TRITON_INTERPRET=1``).
    """
    check_tensor("y", y, 3)
    h, w = _resolve_grid(y, p, c, grid)
    if not use_triton(y):
        return unpatchify_ref(y, p, c, (h, w))
    return _fwd_op(y, p, c, h, w)


def compile_cases(dtype: torch.dtype) -> list[tuple[str, Launch]]:
    """The launches DiT issues (for ``compile_check``): outputs of 4 or 8 (learned sigma) channels for 32 x 32 latents
    (256 px) in ``dtype``, batch 32, patches of 2, 4 and 8, forward (scatter) and backward (gather)."""
    cases = []
    for p in PATCH_SIZES:
        for channels in (LATENT_CHANNELS, 2 * LATENT_CHANNELS):
            side = LATENT_SIZE // p
            y = torch.empty((32, side * side, p * p * channels), dtype=dtype)
            with capture_launches() as launches:
                img = unpatchify_fwd(y, p, channels, side, side)
                unpatchify_bwd(img, p)
            cases += [(f"unpatchify {label} c={channels} p={p}", launch)
                      for label, launch in zip(("fwd", "bwd"), launches, strict=True)]
    return cases
