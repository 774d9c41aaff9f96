"""Tiled MLP: a token-wise module run over sequence tiles, recomputed tile by tile in backward.

A plain SwiGLU keeps ``[tokens, ffn_hidden]`` intermediates (gate, up, their product) for its
backward, several times the size of its input. Tiled, the forward keeps only the input, and
forward and backward each hold one tile's intermediates at a time. Exact: the module acts on
every token independently, so tiles change only the order of the weight-gradient sums.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from distseq.memory.config import resolve_mlp_tiles


class _TiledApply(torch.autograd.Function):
    @staticmethod
    def forward(fctx, fn: Callable, x: torch.Tensor, tiles: int, *params: torch.Tensor):
        # The parameters themselves (not saved copies): the recomputation uses them.
        fctx.fn, fctx.tiles, fctx.params = fn, tiles, params
        device = x.device.type
        fctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        fctx.save_for_backward(x)
        flat = x.reshape(-1, x.shape[-1])
        return torch.cat([fn(part) for part in flat.tensor_split(tiles)]).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(fctx, grad_out):
        (x,) = fctx.saved_tensors
        params = fctx.needs_input_grad[3:]
        flat = x.reshape(-1, x.shape[-1]).detach()
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(flat)
        inputs = [t for t, need in zip(fctx.params, params) if need]
        grad_params: list[torch.Tensor | None] = [None] * len(inputs)
        enabled, dtype = fctx.autocast
        start = 0
        tiles = zip(flat.tensor_split(fctx.tiles), grad_flat.tensor_split(fctx.tiles))
        for part, grad_part in tiles:
            part = part.requires_grad_()
            with torch.enable_grad(), torch.autocast(x.device.type, dtype, enabled=enabled):
                out = fctx.fn(part)
            grads = torch.autograd.grad(out, (part, *inputs), grad_part, allow_unused=True)
            grad_x[start : start + len(part)] = grads[0]
            start += len(part)
            for i, grad in enumerate(grads[1:]):
                if grad is not None:
                    grad_params[i] = grad if grad_params[i] is None else grad_params[i] + grad
        found = iter(grad_params)
        per_param = [next(found) if need else None for need in params]
        return (None, grad_x.view_as(x), None, *per_param)


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tiles: int,
    params: list[torch.Tensor],
) -> torch.Tensor:
    """``fn(x)`` for a token-wise ``fn`` (``[tokens, d_in] -> [tokens, d_out]``) on ``x``
    ``[..., d_in]``, run over ``tiles`` tiles of the flattened tokens; ``params`` are every
    tensor ``fn`` uses that needs a gradient (its module's parameters). ``tiles <= 1`` or no
    gradient needed: the plain call."""
    if tiles <= 1 or not torch.is_grad_enabled():
        return fn(x)
    return _TiledApply.apply(fn, x, tiles, *params)


def mlp_tiles_for(x: torch.Tensor, tiles: int | str) -> int:
    """Tiles for the MLP input ``x`` ``[..., d_model]`` (see :func:`resolve_mlp_tiles`)."""
    return resolve_mlp_tiles(tiles, x.numel() // x.shape[-1], x.shape[-1])


def tiled_module_call(module: nn.Module, x: torch.Tensor, tiles: int | str) -> torch.Tensor:
    """``module(x)`` for a token-wise ``module`` over ``tiles`` (an integer or ``"auto"``)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return tiled_apply(module, x, mlp_tiles_for(x, tiles), params)


def tile_module(module: nn.Module, tiles: int | str) -> None:
    """Make ``module``'s forward (one tensor in, token-wise) run over ``tiles`` tiles (an
    integer or ``"auto"``), for a model whose code calls it (a Hugging Face MLP); parameters
    and state-dict keys stay as they are. ``tiles = 1`` restores the plain forward."""
    module.__dict__.pop("forward", None)
    if tiles != 1:
        original = module.forward
        params = lambda: [p for p in module.parameters() if p.requires_grad]  # noqa: E731
        module.forward = lambda x: tiled_apply(original, x, mlp_tiles_for(x, tiles), params())
