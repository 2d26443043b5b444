"""Weight-only int8 / int4 linear layers for the frozen LLM on the CPU, on PyTorch's own kernels.

Decoding one token reads every weight once, so on a CPU its time is set by the bytes per
weight: 4 in fp32, 2 in bf16, 1 in int8, ½ in int4. These layers store the weights that way
and multiply bf16 activations by them without materialising a float copy:

* ``int8-wo``: per output channel, symmetric, ``W ≈ q · s`` with ``q ∈ [-127, 127]``
  (``torch._weight_int8pack_mm``);
* ``int4-wo``: per group of 32 inputs, asymmetric, ``W ≈ (q − 8) · s + z`` with
  ``q ∈ [0, 15]`` (``torch._weight_int4pack_mm_for_cpu``, tinygemm's CPU port, the kernel
  torchao's ``Int4OpaqueTensor`` calls).

Measured on this project's 2-core Xeon (README, "Weight-only quantization"): a SmolLM2 step
takes 21 ms in int4, 25 ms in int8 and 50 ms in fp32; torchao's tensor subclasses around the
same kernels took 33–37 ms (int4) and 84–90 ms (int8), the difference being their dispatch.

The layers are frozen. Their backward gives the gradient to the input only (Grad-CAM needs
nothing else): ``∂x = ∂y · W̃`` with ``W̃`` de-quantised for that one product and dropped;
the int4 layer keeps its codes a second time, two to a byte, for that (½ byte per weight:
54 MB for SmolLM2, against 540 MB for an fp32 copy).
"""

from __future__ import annotations

import torch
from torch import nn

from mrg.config import WEIGHT_ONLY

INT4_GROUP = 32  # inputs per int4 scale and zero; SmolLM2's 576 and 1536 are multiples
COMPUTE_DTYPE = torch.bfloat16  # the kernels' fast path; fp32 activations take a slow one


class _WeightOnlyMatmul(torch.autograd.Function):
    """``y = x · W̃ᵀ`` through ``layer``'s kernel; backward to ``x`` only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: WeightOnlyLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer.product(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantized().to(grad.dtype), None


class WeightOnlyLinear(nn.Module):
    """A frozen ``nn.Linear`` (no bias) whose weight is stored quantized."""

    in_features: int
    out_features: int

    def product(self, x2d: torch.Tensor) -> torch.Tensor:
        """``x2d · W̃ᵀ`` for a contiguous 2-D ``x2d`` in the compute dtype."""
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        """``W̃``, ``[out_features, in_features]`` in the compute dtype."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE).contiguous()
        if torch.is_grad_enabled() and x.requires_grad:
            y = _WeightOnlyMatmul.apply(x2d, self)
        else:
            y = self.product(x2d)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8WeightOnlyLinear(WeightOnlyLinear):
    """``W ≈ q · s``: int8 per output channel."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer(
            "qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        )
        self.register_buffer("scale", scale.to(COMPUTE_DTYPE))

    def product(self, x2d: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x2d, self.qweight, self.scale)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.to(COMPUTE_DTYPE) * self.scale[:, None]


class Int4WeightOnlyLinear(WeightOnlyLinear):
    """``W ≈ (q − 8) · s + z``: int4 per group of ``INT4_GROUP`` inputs (min–max)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        groups = weight.detach().float().reshape(self.out_features, -1, INT4_GROUP)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = (high - low).clamp(min=1e-8) / 15
        q = torch.round((groups - low) / scale).clamp(0, 15).to(torch.int32)
        zero = low + 8 * scale
        q = q.reshape(self.out_features, -1)
        self.register_buffer("qweight", torch._convert_weight_to_int4pack_for_cpu(q, 2))
        # the same codes two to a byte, for the backward (the kernel's own layout is opaque)
        self.register_buffer("codes", (q[:, ::2] | q[:, 1::2] << 4).to(torch.uint8))
        # the kernel's layout: [groups, out_features, (scale, zero)]
        scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(COMPUTE_DTYPE))

    def product(self, x2d: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(
            x2d, self.qweight, INT4_GROUP, self.scales_and_zeros
        )

    def dequantized(self) -> torch.Tensor:
        q = torch.stack([self.codes & 15, self.codes >> 4], dim=-1).reshape(self.out_features, -1)
        scale, zero = (
            self.scales_and_zeros[..., i].T.repeat_interleave(INT4_GROUP, dim=1) for i in (0, 1)
        )
        return (q.to(COMPUTE_DTYPE) - 8) * scale + zero


LAYERS = {"int8-wo": Int8WeightOnlyLinear, "int4-wo": Int4WeightOnlyLinear}


def quantize_weight_only(llm: nn.Module, scheme: str) -> nn.Module:
    """Replace every ``nn.Linear`` of ``llm`` (the decoder's projections and the LM head, untied
    from the input embedding, which stays in the float dtype for ``inputs_embeds``) by its
    ``scheme`` layer, in place; the rest goes to the compute dtype. Returns ``llm``."""
    if scheme not in LAYERS:
        raise ValueError(f"weight-only scheme must be one of {WEIGHT_ONLY}, got {scheme!r}")
    llm.to(COMPUTE_DTYPE)
    for parent in list(llm.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                if child.bias is not None:
                    raise ValueError(f"{name}: weight-only layers here take no bias")
                setattr(parent, name, LAYERS[scheme](child.weight))
    llm.config.tie_word_embeddings = False
    llm.weight_only = scheme
    return llm


def weight_only_in_effect(llm: nn.Module) -> str | None:
    """``"int8-wo"``/``"int4-wo"`` where ``quantize_weight_only`` ran on ``llm``, else None."""
    return getattr(llm, "weight_only", None)
