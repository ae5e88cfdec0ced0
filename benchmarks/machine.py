"""What machine a result came from: CPU model and vector units, cores, torch build and threads, GPU, load.

Example::

    machine_info()["cpu"]   # 'AMD EPYC ... (2 cores; avx2, avx512f, avx512_bf16)'
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from rmserve.model.loading import resolve_dtype

VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_description() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown CPU", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    units = ", ".join(f for f in VECTOR_FLAGS if f in flags) or "no AVX2"
    return f"{model} ({os.cpu_count()} cores; {units})"


def machine_info() -> dict:
    info = {
        "cpu": cpu_description(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_default_dtype": resolve_dtype("auto", torch.device("cpu")),  # what `dtype: auto` loads on this CPU
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "load_avg_1m": os.getloadavg()[0],
    }
    return info
