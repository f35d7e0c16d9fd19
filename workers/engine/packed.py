"""Linear layers for CPU workers on oneDNN with weights laid out once for its kernels.

PyTorch's CPU ``linear`` goes to MKL's ``sgemm``; on CPUs that MKL does not treat as its own (AMD EPYC,
where the bench ran) that takes a generic path at about half the core's fp32 peak, and much less for the
skinny matrices of a decode step (16 rows: ~60 GFLOPS where oneDNN reaches ~165 on the same core, see
docs/performance.md). oneDNN, which PyTorch also ships, picks its kernels by the CPU's instruction set.
``pack`` swaps every ``nn.Linear`` of a loaded float32 / bfloat16 CPU model for a ``PackedLinear``
whose weight is oneDNN's blocked layout of the same numbers (``_reorder_linear_weight``; the original
is dropped, so memory does not grow). Outputs match ``F.linear`` to rounding (a different summation
order), and as with ``F.linear`` a row's result does not depend on which other rows share the call
once there are two or more.

Weights tied to another module (a language-model head sharing the embedding table) stay as they are.
``TUWEN_CPU_LINEAR=aten`` keeps PyTorch's own path.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """``nn.Linear`` (inference only) over a oneDNN-packed weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack(model: nn.Module) -> int:
    """Replace ``model``'s packable linear layers in place; returns how many were replaced."""
    if not available():
        log.warning("oneDNN is not available in this PyTorch build; linear layers stay on PyTorch's path")
        return 0
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and module.weight.device.type == "cpu"
               and module.weight.dtype in _DTYPES and owners[id(module.weight)] == 1]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent: Any = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear(linear))
    return len(targets)
