"""Patchify: images (B, C, H, W) -> patch tokens (B, (H/p)(W/p), C*p*p), each patch vector in (C, p, p) order.

Equal to ``F.unfold(x, p, stride=p).transpose(1, 2)``, so a linear layer with the patch conv's weight reshaped to
(D, C*p*p) reproduces the official patch embedding. Four layers: the Triton kernel ``_patch_kernel``; the launchers
``patchify_fwd/_bwd`` (no autograd); the custom ops ``dit_fast::patchify`` (+ autograd) and ``dit_fast::patchify_bwd``,
which ``torch.compile(fullgraph=True)`` traces through; and the public ``patchify`` beside its plain-PyTorch oracle
``patchify_ref``.

``_patch_kernel`` is the one index map between an image and its patch tokens, in either direction (``TO_TOKENS``) and
for either order of the token vector (``CHANNELS_LAST``): (C, p, p) here, (p, p, C) for ``unpatchify``, whose forward
is this backward and vice versa.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (
    Launch,
    capture_launches,
    check_tensor,
    next_power_of_2,
    register_op,
    tl,
    triton_kernel,
    use_triton,
)

# DiT's patch sizes and latents (256px images: 4 x 32 x 32), the shapes compile_check builds for.
PATCH_SIZES = (2, 4, 8)
LATENT_SIZE = 32
LATENT_CHANNELS = 4

# Index map, for image b and token t = gh * GW + gw (gh, gw: patch row/column in the (GH, GW) grid) and vector index
# k < K = C * P * P:
#   CHANNELS_LAST == False: k = c * P * P + i * P + j    (patchify's (C, p, p) order)
#   CHANNELS_LAST == True:  k = (i * P + j) * C + c      (unpatchify's (p, p, C) order)
#   token[b, t, k] <-> image[b, c, gh * P + i, gw * P + j]
# Each program moves a (BLOCK_T tokens x BLOCK_K) tile of one image; both sides take any strides. It is a bijection,
# so the scatter direction has no write conflicts. Pure copies: values are moved bit-exactly, never converted.


@triton_kernel
def _patch_kernel(
    img_ptr, tok_ptr,
    C, GW, T, K, n_tblocks,
    stride_ib, stride_ic, stride_ih, stride_iw,
    stride_tb, stride_tt, stride_tk,
    P: tl.constexpr, CHANNELS_LAST: tl.constexpr, TO_TOKENS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """TO_TOKENS: gather tokens <- image (patchify forward, unpatchify backward); else scatter image <- tokens."""
    pid = tl.program_id(0)  # b * n_tblocks + token block
    b = pid // n_tblocks
    t = (pid % n_tblocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    k = tl.arange(0, BLOCK_K)
    gh = t // GW
    gw = t % GW
    if CHANNELS_LAST:
        c = k % C
        q = k // C
    else:
        c = k // (P * P)
        q = k % (P * P)
    h = gh[:, None] * P + (q // P)[None, :]
    w = gw[:, None] * P + (q % P)[None, :]
    mask = (t < T)[:, None] & (k < K)[None, :]
    img = img_ptr + b.to(tl.int64) * stride_ib + c[None, :] * stride_ic + h * stride_ih + w * stride_iw
    tok = tok_ptr + b.to(tl.int64) * stride_tb + t[:, None] * stride_tt + k[None, :] * stride_tk
    if TO_TOKENS:
        tl.store(tok, tl.load(img, mask=mask), mask=mask)
    else:
        tl.store(img, tl.load(tok, mask=mask), mask=mask)


def tile_config(tokens: int, vec: int) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_K, num_warps)`` for moving tokens of ``vec`` elements: whole vectors, ~2048 elements a tile."""
    block_k = next_power_of_2(vec)
    block_t = max(1, min(next_power_of_2(tokens), 2048 // block_k))
    return block_t, block_k, 4


def launch_patch_copy(img: torch.Tensor, tok: torch.Tensor, p: int, channels_last: bool, to_tokens: bool) -> None:
    """Copy between ``img`` (B, C, H, W) and ``tok`` (B, (H/p)(W/p), C*p*p) in place, in the given direction.

    ``channels_last`` picks the token vector order: (p, p, C) if True, else (C, p, p). Any strides on both sides.
    """
    B, C, H, W = img.shape
    T, K = tok.shape[1], tok.shape[2]
    if B * T * K == 0:
        return
    block_t, block_k, num_warps = tile_config(T, K)
    n_tblocks = -(-T // block_t)
    _patch_kernel[(B * n_tblocks,)](
        img, tok,
        C, W // p, T, K, n_tblocks,
        *img.stride(),
        *tok.stride(),
        P=p, CHANNELS_LAST=channels_last, TO_TOKENS=to_tokens, BLOCK_T=block_t, BLOCK_K=block_k, num_warps=num_warps,
    )


def _check_inputs(x: torch.Tensor, p: int) -> None:
    check_tensor("x", x, 4)
    if not isinstance(p, int) or p < 1:
        raise ValueError(f"patch size p must be a positive int, got {p!r}")
    if x.shape[2] % p or x.shape[3] % p:
        raise ValueError(f"image size {tuple(x.shape[2:])} is not divisible by the patch size {p}")


def patchify_fwd(x: torch.Tensor, p: int) -> torch.Tensor:
    """Launch the gather kernel (no autograd): x (B, C, H, W) -> (B, (H/p)(W/p), C*p*p), vectors in (C, p, p) order."""
    _check_inputs(x, p)
    B, C, H, W = x.shape
    tok = torch.empty((B, (H // p) * (W // p), C * p * p), dtype=x.dtype, device=x.device)
    launch_patch_copy(x, tok, p, channels_last=False, to_tokens=True)
    return tok


def patchify_bwd(grad_tokens: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    """Launch the scatter kernel (no autograd): grad (B, (h/p)(w/p), c*p*p) -> grad of the image (B, c, h, w)."""
    check_tensor("grad_tokens", grad_tokens, 3)
    B = grad_tokens.shape[0]
    if grad_tokens.shape[1:] != ((h // p) * (w // p), c * p * p):
        raise ValueError(f"grad_tokens shape {tuple(grad_tokens.shape)} does not match an image of "
                         f"{(c, h, w)} in patches of {p}")
    img = torch.empty((B, c, h, w), dtype=grad_tokens.dtype, device=grad_tokens.device)
    launch_patch_copy(img, grad_tokens, p, channels_last=False, to_tokens=False)
    return img


_fwd_op = register_op("dit_fast::patchify", patchify_fwd)
_bwd_op = register_op("dit_fast::patchify_bwd", patchify_bwd)


def _setup_context(ctx, inputs, output) -> None:
    x, p = inputs
    ctx.p = p
    ctx.image_shape = tuple(x.shape[1:])


def _backward(ctx, grad_tokens):
    return _bwd_op(grad_tokens, ctx.p, *ctx.image_shape), None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def patchify_ref(x: torch.Tensor, p: int) -> torch.Tensor:
    """Plain-PyTorch oracle: ``F.unfold(x, p, stride=p).transpose(1, 2)``: (B, C, H, W) -> (B, T, C*p*p)."""
    return F.unfold(x, p, stride=p).transpose(1, 2)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Cut images into non-overlapping p x p patches, one token per patch, differentiable.

    Args:
        x: (B, C, H, W), fp32/fp16/bf16, H and W divisible by p; any strides.
        p: patch size.

    Returns:
        (B, (H/p)(W/p), C*p*p), contiguous; tokens in row-major patch order, each vector in (C, p, p) order (equal to
        ``F.unfold(x, p, stride=p).transpose(1, 2)``). CUDA tensors run the Triton kernels; CPU tensors the reference
        (or the kernels in the Triton interpreter with ``TRITON_INTERPRET=1``).
    """
    _check_inputs(x, p)
    if not use_triton(x):
        return patchify_ref(x, p)
    return _fwd_op(x, p)


def compile_cases(dtype: torch.dtype) -> list[tuple[str, Launch]]:
    """The launches DiT issues (for ``compile_check``): 4-channel latents of 32 x 32 (256 px) in ``dtype``, batch
    32, patches of 2, 4 and 8, forward (gather) and backward (scatter)."""
    cases = []
    for p in PATCH_SIZES:
        x = torch.empty((32, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE), dtype=dtype)
        with capture_launches() as launches:
            tokens = patchify_fwd(x, p)
            patchify_bwd(tokens, p, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
        cases += [(f"patchify {label} C={LATENT_CHANNELS} p={p}", launch)
                  for label, launch in zip(("fwd", "bwd"), launches, strict=True)]
    return cases
