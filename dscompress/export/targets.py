"""Deployment targets: the facts pre-flight checks and the roofline use, with their sources.

Sources (docs/DESIGN.md, "TensorRT and Jetson Orin", unless noted):
- Jetson Orin: compute capability 8.7; no FP8 or FP4, only FP16 / INT8 / INT4; INT4 at group 128 only (NVIDIA
  Edge-LLM's INT4 path); engines are built on the device per JetPack.
- Memory: AGX 32/64 GB, NX 8/16 GB, Nano 8 GB. Bandwidth: AGX Orin 204.8 GB/s, Orin Nano 68 GB/s (102 GB/s
  'Super'); Orin NX 102.4 GB/s (NVIDIA Jetson Orin NX module data sheet).
- JetPack 6.1/6.2: TensorRT 10.3, CUDA 12.6. JetPack 7.2: TensorRT 10.16.
Assumptions (stated in `plan` output): usable memory is the module's memory minus 2 GiB for the OS, CUDA context
and TensorRT workspace (Jetson memory is shared with the CPU); the highest opset each TensorRT parses is 21 for
10.3 (INT4 block DequantizeLinear needs 21 and TensorRT 10 reads it) and 23 for 10.16.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
OS_RESERVE_BYTES = 2 * GIB


@dataclass(frozen=True)
class Device:
    name: str
    compute_capability: str
    memory_bytes: int
    bandwidth_gbs: float
    precisions: frozenset[str]  # weight precisions TensorRT runs on it
    int4_group_sizes: tuple[int, ...]
    jetson: bool = True

    @property
    def usable_bytes(self) -> int:
        return self.memory_bytes - OS_RESERVE_BYTES


ORIN_PRECISIONS = frozenset({"fp32", "fp16", "int8", "int4"})
DEVICES: dict[str, Device] = {
    "orin-agx-64gb": Device("orin-agx-64gb", "8.7", 64 * GIB, 204.8, ORIN_PRECISIONS, (128,)),
    "orin-agx-32gb": Device("orin-agx-32gb", "8.7", 32 * GIB, 204.8, ORIN_PRECISIONS, (128,)),
    "orin-nx-16gb": Device("orin-nx-16gb", "8.7", 16 * GIB, 102.4, ORIN_PRECISIONS, (128,)),
    "orin-nx-8gb": Device("orin-nx-8gb", "8.7", 8 * GIB, 102.4, ORIN_PRECISIONS, (128,)),
    "orin-nano-8gb": Device("orin-nano-8gb", "8.7", 8 * GIB, 68.0, ORIN_PRECISIONS, (128,)),
    # A discrete data-centre GPU (H100 80 GB figures); TensorRT 10 builds INT4 weight-only at any block size.
    "x86-gpu": Device(
        "x86-gpu",
        "9.0",
        80 * GIB,
        3350.0,
        frozenset({"fp32", "fp16", "bf16", "int8", "int4", "fp8"}),
        (32, 64, 128),
        jetson=False,
    ),  # fmt: skip
}


@dataclass(frozen=True)
class JetPack:
    version: str
    tensorrt: str
    cuda: str
    max_opset: int


JETPACKS: dict[str, JetPack] = {
    "6.2": JetPack("6.2", "10.3", "12.6", 21),
    "7.2": JetPack("7.2", "10.16", "not recorded in our reference", 23),
}
