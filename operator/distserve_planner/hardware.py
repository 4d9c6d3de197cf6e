"""Accelerators: a built-in table and the spec's custom figures.

Peak numbers are the vendor's dense fp16/bf16 figures; the latency model applies achievable
efficiencies on top (see latency.py), so the table stays comparable with data sheets.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from distserve_operator import api
from distserve_operator.api.spec import Interconnect

GIB = 1024**3


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    memory_bytes: int
    flops: float  # dense fp16/bf16 FLOP/s (fp32 for CPU)
    hbm_bytes_per_s: float
    # Fixed cost of one forward pass (kernel launches, scheduling), seconds: it dominates tiny models.
    step_overhead_s: float = 0.004
    # Latency of one all-reduce hop (NCCL ring step), seconds.
    allreduce_latency_s: float = 10e-6
    # Share of memory the engine may use (weights + KV + activations), like vLLM's gpu_memory_utilization.
    memory_utilization: float = 0.92
    # Sequences per decode step unless spec.engine.decodeMaxBatch says otherwise (api.limits: why).
    decode_max_batch: int = api.GPU_DECODE_MAX_BATCH
    # Fixed cost of one pipeline-stage boundary in our runtime, seconds: the gRPC hand-off of the
    # hidden states (device to host and back) and the next stage's own per-forward fixed cost. CPU:
    # measured (BENCHMARKS.md "Pipeline stages": (PP2 - PP1) / 2 at batch 1 on loopback). GPUs: not
    # measured yet (no GPU run); the gRPC hop's share of the CPU figure.
    stage_hop_s: float = 0.001


BUILTIN: dict[api.GpuType, DeviceSpec] = {
    api.GpuType.A100_40GB: DeviceSpec("A100-40GB", 40 * GIB, 312e12, 1.555e12),
    api.GpuType.A100_80GB: DeviceSpec("A100-80GB", 80 * GIB, 312e12, 2.039e12),
    api.GpuType.H100_SXM: DeviceSpec("H100-SXM", 80 * GIB, 989e12, 3.35e12),
    api.GpuType.H100_PCIE: DeviceSpec("H100-PCIe", 80 * GIB, 756e12, 2.0e12),
    api.GpuType.H200: DeviceSpec("H200", 141 * GIB, 989e12, 4.8e12),
    api.GpuType.L40S: DeviceSpec("L40S", 48 * GIB, 362e12, 0.864e12),
    # One CPU "device" is one worker process on a few cores (tens of GFLOP/s fp32 each) with
    # ~15 GB/s of memory bandwidth. A later issue replaces this with a measured CPU profile.
    api.GpuType.CPU: DeviceSpec(
        "CPU",
        8 * GIB,
        100e9,
        15e9,
        step_overhead_s=0.002,
        allreduce_latency_s=50e-6,
        memory_utilization=0.8,
        decode_max_batch=api.DEFAULT_DECODE_MAX_BATCH,
        stage_hop_s=0.007,
    ),
}


def from_gpu_spec(gpu: api.GpuSpec) -> DeviceSpec:
    """The built-in entry with the spec's overrides, or the Custom figures (validated by the API)."""
    if gpu.type is api.GpuType.CUSTOM:
        assert gpu.memory_gi_b and gpu.tflops and gpu.hbm_g_bps  # the API validator guarantees them
        return DeviceSpec("Custom", gpu.memory_gi_b * GIB, gpu.tflops * 1e12, gpu.hbm_g_bps * 1e9)
    device = BUILTIN[gpu.type]
    if gpu.memory_gi_b is not None:
        device = replace(device, memory_bytes=gpu.memory_gi_b * GIB)
    if gpu.tflops is not None:
        device = replace(device, flops=gpu.tflops * 1e12)
    if gpu.hbm_g_bps is not None:
        device = replace(device, hbm_bytes_per_s=gpu.hbm_g_bps * 1e9)
    return device


@dataclass(frozen=True)
class Links:
    """Per-GPU link bandwidths, bytes/s."""

    intra_node: float
    inter_node: float

    @staticmethod
    def from_spec(interconnect: Interconnect) -> Links:
        return Links(interconnect.intra_node_g_bps * 1e9, interconnect.inter_node_g_bps * 1e9)
