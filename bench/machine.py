"""The machine's own limits, measured in the same run as the workloads.

Every throughput in the report is also given as a fraction of these numbers,
so a figure means the same thing on a laptop, this 2-core CI box or an H100.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "CpuMeter",
    "bf16_matmul_supported",
    "current_rss_bytes",
    "git_revision",
    "jax_matmul_peak",
    "library_versions",
    "load_average",
    "machine_info",
    "machine_limits",
    "matmul_peak",
    "memory_bandwidth",
    "peak_rss_bytes",
    "set_threads",
]

_REPO = Path(__file__).resolve().parent.parent


def _best_time(fn, *, repeats: int, sync=lambda: None) -> float:
    fn()  # warm-up (compilation, allocator)
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(*, dtype: str = "float32", size: int = 1024, repeats: int = 5,
                device: str = "cpu") -> float:
    """Best observed FLOP/s of an n x n x n torch matmul (2 n^3 FLOPs)."""
    import torch

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    a = torch.randn(size, size, dtype=dt, device=device)
    b = torch.randn(size, size, dtype=dt, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    seconds = _best_time(lambda: a @ b, repeats=repeats, sync=sync)
    return 2 * size**3 / seconds


def jax_matmul_peak(*, dtype: str = "float32", size: int = 1024, repeats: int = 5) -> float:
    """Best observed FLOP/s of a jitted n x n x n JAX matmul on the default device."""
    import jax
    import jax.numpy as jnp

    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), dt)
    b = jax.random.normal(key_b, (size, size), dt)
    matmul = jax.jit(jnp.matmul)
    seconds = _best_time(lambda: matmul(a, b).block_until_ready(), repeats=repeats)
    return 2 * size**3 / seconds


def memory_bandwidth(*, megabytes: int = 256, repeats: int = 5, device: str = "cpu") -> float:
    """Best observed bytes/s of a large tensor copy (read + write counted)."""
    import torch

    n = megabytes * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    seconds = _best_time(lambda: dst.copy_(src), repeats=repeats, sync=sync)
    return 2 * src.numel() * 4 / seconds


def bf16_matmul_supported(device: str = "cpu") -> bool:
    """Whether bf16 matmuls run natively: CUDA with bf16 support, or a CPU with AVX-512 BF16
    or AMX (elsewhere torch emulates bf16 and the 'peak' is meaningless)."""
    if device == "cuda":
        import torch

        return bool(torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


def machine_limits(*, device: str = "cpu", quick: bool = False) -> dict[str, Any]:
    """Peak matmul FLOP/s (fp32 torch and JAX, bf16 where native) and copy bandwidth.

    The peak is the best of a few square sizes (2048 is where this class of CPU saturates;
    1024 leaves 30% on the table). ``fp32_peak_flops`` is the larger of the torch and JAX
    figures: the machine's limit, whichever library reaches it.
    """
    sizes = (512, 1024) if quick else (1024, 2048)
    repeats = 3 if quick else 5
    out: dict[str, Any] = {"device": device, "matmul_sizes": list(sizes)}
    out["torch_fp32_flops"] = max(matmul_peak(size=n, repeats=repeats, device=device)
                                  for n in sizes)
    try:
        out["jax_fp32_flops"] = max(jax_matmul_peak(size=n, repeats=repeats) for n in sizes)
    except ImportError:
        out["jax_fp32_flops"] = None
    out["fp32_peak_flops"] = max(v for v in (out["torch_fp32_flops"], out["jax_fp32_flops"])
                                 if v is not None)
    out["bf16_native"] = bf16_matmul_supported(device)
    out["torch_bf16_flops"] = (
        max(matmul_peak(dtype="bfloat16", size=n, repeats=repeats, device=device)
            for n in sizes) if out["bf16_native"] else None)
    megabytes = 64 if quick else 256
    out["memory_bandwidth_bytes"] = memory_bandwidth(megabytes=megabytes, repeats=repeats,
                                                     device=device)
    return out


def set_threads(threads: int, *, pin: bool = True) -> None:
    """Give torch and XLA the same compute: ``threads`` intra-op threads for torch and, with
    fewer threads than cores, this process pinned to the first ``threads`` CPUs (``pin``).

    XLA's CPU client sizes its thread pool from the CPUs it may run on and has no flag for
    another count, so pinning is what limits JAX (and it keeps torch's threads off a core
    another process is using). Call before importing jax and before the first torch op.
    """
    cpus = os.cpu_count() or 1
    if pin and threads < cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:threads]))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(threads)


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "deepspeed", "transformers", "jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_total_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _memory_total_bytes(),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_revision() -> dict[str, Any]:
    """The checkout's commit and whether it has uncommitted changes (None outside git)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


class CpuMeter:
    """How much CPU *other* processes took while a measurement ran.

    ``/proc/stat`` counts busy time on every CPU of the machine; ``getrusage`` counts this
    process and its finished children. Their difference over a measurement is what the rest
    of the machine (another user's test suite, say) took from the cores the benchmark uses:
    ``other_cpu_share`` is that time over ``wall x cores`` (0: the run had the machine to
    itself). None where ``/proc/stat`` does not exist.
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except (OSError, IndexError):
            return None
        ticks = [int(x) for x in fields]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        guest = sum(ticks[8:10]) if len(ticks) > 9 else 0  # already counted in user / nice
        return (sum(ticks) - idle - guest) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_seconds() -> float:
        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            total += usage.ru_utime + usage.ru_stime
        return total

    def _sample(self) -> tuple[float, float | None, float]:
        return time.perf_counter(), self._busy_seconds(), self._own_seconds()

    def stop(self) -> dict[str, float | None]:
        wall0, busy0, own0 = self.start
        wall1, busy1, own1 = self._sample()
        wall, own = wall1 - wall0, own1 - own0
        if busy0 is None or busy1 is None or wall <= 0:
            return {"own_cpu_s": own, "other_cpu_s": None, "other_cpu_share": None}
        other = max((busy1 - busy0) - own, 0.0)
        return {"own_cpu_s": own, "other_cpu_s": other,
                "other_cpu_share": other / (wall * (os.cpu_count() or 1))}


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (``getrusage`` max RSS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024  # bytes vs KiB


def current_rss_bytes() -> int | None:
    """This process's resident set size now (Linux ``/proc/self/statm``)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")
