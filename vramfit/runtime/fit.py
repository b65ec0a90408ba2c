"""Planning a load before it happens: what `run`, `chat` and `serve` do before they load a model.

`fit(path, ...)` reads the GGUF's metadata and tensor table (no weights), takes the memory budget of
the device the engine runs on (the CPU: the available system RAM, or the size asked for), and asks the
planner for the largest context at the best KV cache quality that fits, capped at the model's training
context, or for the context and cache types the user gave. When nothing fits it raises `PlanError`
with the plan's verdict and the nearest settings that do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vramfit.gguf import GGUFFile
from vramfit.model.kvcache import KVSpec
from vramfit.runtime.planner import CPU, CUDA, ModelInfo, Plan, PlanError, parse_size, plan


@dataclass(frozen=True)
class Fit:
    plan: Plan
    kv: KVSpec  # the cache to allocate: the plan's types, with the rotations asked for

    @property
    def ctx(self) -> int:
        return self.plan.ctx


def available_memory() -> int:
    """Bytes of system memory available to a new allocation (Linux: MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resolve_mem(text: str | None, device=None) -> int | None:
    """--mem / --vram for the engine's device: a size, "auto" or None (the available system memory;
    on a CUDA device, its free memory), or "cpu" (no limit, as `plan --vram cpu`)."""
    if text is None or text.lower() == "auto":
        if device is not None and getattr(device, "type", device) == "cuda":
            import torch

            return torch.cuda.mem_get_info(device)[0]
        return available_memory()
    if text.lower() == "cpu":
        return None
    return parse_size(text)


def fit(
    gguf: GGUFFile | str | Path,
    ctx: int | None = None,
    ctk: str | None = None,
    ctv: str | None = None,
    khad: bool = False,
    vhad: bool = False,
    mem: int | None = None,
    parallel: int = 1,
    device=None,
) -> Fit:
    """The plan for loading `gguf` (an open file or a path) on `device` (a torch.device; default the
    CPU) with `mem` bytes (None: no limit). ctx None: the largest that fits, up to the training
    context; ctk None or "auto": the best cache quality that fits (ctv alone keeps K at f32, as the
    engine always did). Raises PlanError when nothing fits."""
    info = ModelInfo.from_gguf(gguf if isinstance(gguf, GGUFFile) else GGUFFile(gguf))
    ctk, ctv = (t.lower() if t and t.lower() != "auto" else None for t in (ctk, ctv))
    kv = "auto" if ctk is None and ctv is None else (ctk or "f32", ctv or ctk or "f32")
    on_gpu = device is not None and getattr(device, "type", device) == "cuda"
    p = plan(info, mem, "max" if ctx is None else ctx, kv, parallel, device=CUDA if on_gpu else CPU)
    if not p.fits:
        raise PlanError(f"{p.verdict}; nearest: {' or '.join(p.nearest)}")
    spec = KVSpec(p.k_type, p.v_type, khad, vhad)
    spec.check(info.head_dim)
    return Fit(p, spec)
