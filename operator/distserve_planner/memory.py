"""Where the bytes go on one instance: weights split over TP*PP GPUs, the rest of usable memory is KV cache.

A (TP, PP) is rejected with a reason a person can act on: heads or layers that do not split, weights
that do not fit, or KV room smaller than one request.
"""

from __future__ import annotations

from dataclasses import dataclass

from distserve_operator.api import tp_refusal

from .architecture import ModelArchitecture
from .hardware import DeviceSpec


@dataclass(frozen=True)
class Fit:
    tp: int
    pp: int
    weight_bytes_per_gpu: int
    kv_tokens: int  # KV-cache capacity of the whole instance, tokens
    reason: str = ""  # empty when the configuration is feasible

    @property
    def ok(self) -> bool:
        return not self.reason


def split_reason(arch: ModelArchitecture, tp: int, pp: int) -> str:
    """Why (TP, PP) cannot split this model evenly, or ''. The TP rule is the workers' own
    (`api.tp_refusal`): a plan the workers would refuse is never scored."""
    reason = tp_refusal(arch.heads, arch.kv_heads, tp)
    if reason:
        return reason
    if arch.layers % pp:
        return f"PP{pp} does not divide {arch.layers} layers"
    return ""


def kv_tokens_per_instance(arch: ModelArchitecture, device: DeviceSpec, tp: int, pp: int) -> int:
    gpus = tp * pp
    usable = device.memory_bytes * device.memory_utilization - arch.weight_bytes / gpus
    # With TP beyond the KV-head count each GPU holds a replicated head, so KV per token grows.
    kv_per_token = arch.kv_bytes_per_token * max(1.0, tp / arch.kv_heads)
    return max(0, int(usable * gpus // kv_per_token))


def check_fit(arch: ModelArchitecture, device: DeviceSpec, tp: int, pp: int, min_tokens: int = 1) -> Fit:
    """Feasibility of one instance of TP*PP GPUs holding at least one request of `min_tokens`."""
    weights = arch.weight_bytes // (tp * pp)
    kv = kv_tokens_per_instance(arch, device, tp, pp)
    reason = split_reason(arch, tp, pp)
    if not reason and weights > device.memory_bytes * device.memory_utilization:
        reason = (
            f"memory: weights need {weights / 2**30:.1f} GiB per GPU, more than the "
            f"{device.memory_bytes * device.memory_utilization / 2**30:.1f} GiB usable on {device.name}"
        )
    elif not reason and kv < min_tokens:
        reason = f"memory: KV room for {kv} tokens, less than one request of {min_tokens} tokens"
    return Fit(tp, pp, weights, kv, reason)
