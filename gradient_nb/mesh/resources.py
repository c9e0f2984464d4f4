"""What a peer can offer, measured on the spot: devices, free memory and matmul throughput.

The scheduler trusts these figures, never a table of GPU names (a throttled laptop GPU and a shared
datacenter one differ more than their names say).
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def free_memory(device: str = "cpu") -> int:
    """Bytes free now on ``device`` ("cpu" or "cuda[:i]")."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return _meminfo_available()


def matmul_tflops(device: str = "cpu", seconds: float = 0.25, n: int = 512) -> float:
    """Measured dense fp32 matmul throughput in TFLOP/s (bf16 on CUDA, as models run there)."""
    import torch

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up: first calls pay for kernel selection and allocation
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    runs, start = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        runs += 1
        if runs % 4 == 0:
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    return 2 * n**3 * runs / elapsed / 1e12


def devices() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"kind": "cpu", "name": _cpu_name(), "cores": os.cpu_count() or 1,
                                  "memory_bytes": _meminfo_available()}]
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                out.append({"kind": "cuda", "index": i, "name": p.name, "memory_bytes": int(p.total_memory)})
    except ImportError:
        pass
    return out


def measure(device: str | None = None, probe_seconds: float = 0.25) -> dict[str, Any]:
    """The resource part of a registry record."""
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"devices": devices(), "device": device, "free_memory_bytes": free_memory(device),
            "tflops": round(matmul_tflops(device, probe_seconds), 4)}
