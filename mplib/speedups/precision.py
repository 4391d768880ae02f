"""Reduced bit widths: fp16/bf16 mixed-precision training, int8 dynamic quantization, int8/int4 weight-only Linears.

bf16 keeps fp32's 8 exponent bits (range) with 8 of its 24 mantissa bits: no loss scaling needed.
fp16 has 11 mantissa bits but 5 exponent bits: small gradients underflow, so the loss is scaled
up before backward and the gradients down before the update (`torch.amp.GradScaler`). Int8
dynamic quantization (torch.ao) stores Linear weights in int8 and quantizes each activation on
the fly; weight-only int8 / int4 keep activations in float and dequantize weights in the kernel.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """One training step under autocast in `dtype` ("bf16" or "fp16"; "fp32" runs plain), with loss scaling for fp16.

    Parameters and optimizer stay fp32 (master weights); matmuls run in the 16-bit dtype.

    Example:
        amp = MixedPrecision("fp16", device_type="cpu")
        loss = amp.step(model, optimizer, lambda m: F.cross_entropy(m(x), y))
    """

    def __init__(self, dtype: str = "bf16", device_type: str = "cpu", init_scale: float = 2.0**16) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        self.dtype, self.device_type = dtype, device_type
        self.scaler = torch.amp.GradScaler(device_type, init_scale=init_scale, enabled=dtype == "fp16")

    def autocast(self) -> Any:
        return torch.autocast(self.device_type, dtype=DTYPES[self.dtype], enabled=self.dtype != "fp32")

    def backward(self, loss: Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[[nn.Module], Tensor]) -> Tensor:
        """Forward under autocast, scaled backward, unscaled (and skipped on inf/nan, fp16) update."""
        optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = loss_fn(model)
        self.backward(loss)
        self.scaler.step(optimizer)  # unscales first; skips the step when a gradient overflowed
        self.scaler.update()
        return loss.detach().float()


def int8_engines() -> list[str]:
    """The quantized backends with int8 kernels in this build of torch (`torch.backends.quantized`).

    Example:
        int8_engines()   # e.g. ['qnnpack', 'x86', 'fbgemm', 'onednn'] on an x86 build; [] without int8 kernels
    """
    return [e for e in torch.backends.quantized.supported_engines if e != "none"]


def quantize_dynamic(model: nn.Module, engine: str | None = None) -> nn.Module:
    """An int8 copy of `model` for CPU inference: every Linear's weight in int8, activations quantized per batch.

    torch's own `torch.ao.quantization.quantize_dynamic` (torch warns it will move to torchao; it
    still runs here). `engine`: the quantized backend ("x86", "fbgemm", "qnnpack", "onednn"), default
    the current one. Raises when this build has no int8 kernels.

    Example:
        fast = quantize_dynamic(model.eval())
        logits = fast(ids, mask)      # within about 1% of the fp32 logits' scale
    """
    engines = int8_engines()
    engine = engine or torch.backends.quantized.engine
    if engine not in engines:
        raise RuntimeError(f"no int8 kernels for quantized engine {engine!r} in this build of torch; it has "
                           f"{engines or 'none'}. Pass engine= one of those, or run the model in fp32/bf16")
    if any(p.is_cuda for p in model.parameters()):
        raise ValueError("torch.ao dynamic quantization runs on the CPU; move the model there first (model.cpu())")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization is moving to torchao
            warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)
    finally:
        torch.backends.quantized.engine = previous


class Int8WeightLinear(nn.Module):
    """Weight-only int8: per-output-channel symmetric int8 weights, dequantized inside aten's int8 matmul.

    Example:
        lin = nn.Linear(64, 32)
        q = Int8WeightLinear(lin)
        q(torch.randn(4, 64)).shape   # (4, 32)
        # each weight is rounded to its channel's grid: off by half a step at most
        bool(((q.dequantized() - lin.weight).abs() <= q.scale[:, None] / 2 + 1e-6).all())   # True
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # (out,): one scale per output channel
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def dequantized(self) -> Tensor:
        return self.weight.float() * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).contiguous(), self.weight, self.scale.to(x.dtype))
        y = y.reshape(*shape[:-1], -1)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int4WeightLinear(nn.Module):
    """Weight-only int4: groups of `group_size` weights share a scale and offset (asymmetric, 16 levels).

    Example:
        q = Int4WeightLinear(nn.Linear(64, 32), group_size=32)   # in_features % group_size, out_features % 16
        q(torch.randn(4, 64)).shape   # (4, 32)
        Int4WeightLinear(nn.Linear(64, 10))   # ValueError: int4 packs out_features in multiples of 16
    """

    def __init__(self, linear: nn.Linear, group_size: int = 32) -> None:
        super().__init__()
        out_f, in_f = linear.weight.shape
        if in_f % group_size or out_f % 16:
            raise ValueError(f"int4 packing needs in_features divisible by group_size={group_size} and out_features "
                             f"by 16, got {out_f} x {in_f}; keep this layer in int8 or float")
        w = linear.weight.detach().float().reshape(out_f, in_f // group_size, group_size)
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-12)  # (out, groups, 1)
        q = torch.clamp(torch.round((w - low) / scale), 0, 15)  # 0..15
        zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
        self.group_size, self.in_features = group_size, in_f
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).reshape(out_f, in_f), 1))  # two 4-bit weights per byte
        self.register_buffer("scales_zeros", torch.stack([scale[..., 0], zero[..., 0]], -1).transpose(0, 1).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def dequantized(self) -> Tensor:
        eye = torch.eye(self.in_features)  # the kernel applied to the identity returns W^T, as it computes
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scales_zeros).T

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).contiguous(), self.packed, self.group_size,
                                                       self.scales_zeros.to(x.dtype))
        y = y.reshape(*shape[:-1], -1)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def quantize_weights(model: nn.Module, bits: int = 8, group_size: int = 32, skip: tuple[str, ...] = ()) -> tuple[nn.Module, list[str]]:
    """A copy of `model` with Linear weights in int8 or int4 (activations stay float); CPU kernels.

    Layers that int4 cannot pack (shapes) stay float. Returns (model, names of the layers quantized).

    Example:
        small, names = quantize_weights(model.eval(), bits=4)
    """
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    needed = "_weight_int8pack_mm" if bits == 8 else "_weight_int4pack_mm_for_cpu"
    if not hasattr(torch.ops.aten, needed):
        raise RuntimeError(f"this build of torch has no {needed} kernel for int{bits} weights; use quantize_dynamic")
    if any(p.is_cuda for p in model.parameters()):
        raise ValueError("quantize_weights uses aten's CPU kernels; move the model to the CPU first")
    model = copy.deepcopy(model).eval()
    done = []
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or any(name.startswith(s) for s in skip):
            continue
        if bits == 4 and (mod.in_features % group_size or mod.out_features % 16):
            continue
        model.set_submodule(name, Int8WeightLinear(mod) if bits == 8 else Int4WeightLinear(mod, group_size))
        done.append(name)
    return model, done


def model_bytes(model: nn.Module) -> int:
    """Bytes of everything a model stores (parameters, buffers, packed int8 weights), each storage once.

    Example:
        model_bytes(nn.Linear(64, 32)), model_bytes(Int8WeightLinear(nn.Linear(64, 32)))   # (8320, 2304)
        # 2080 fp32 values, against 2048 int8 weights plus 32 fp32 scales and 32 fp32 biases
    """
    seen, total = set(), 0
    for t in _stored_tensors(model.state_dict()):
        key = (t.untyped_storage()._cdata if not t.is_quantized else id(t))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _stored_tensors(x: Any) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _stored_tensors(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _stored_tensors(v)]
    if hasattr(x, "__getstate__") and type(x).__name__.endswith("PackedParams"):  # torch.ao's packed weights
        return _stored_tensors(x.__getstate__())
    return []
