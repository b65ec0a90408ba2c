"""vramfit: run GGUF language models (llama, qwen2, ...) on CPU and NVIDIA GPUs."""

__version__ = "0.1.0"


def load(path_or_name, n_ctx=None, kv_type=None, device=None):
    """Open a GGUF model by path or short name, on `device` ("auto": a CUDA GPU when there is one,
    "cpu", "cuda"); see `vramfit.api.Model`."""
    from vramfit.api import load as _load

    return _load(path_or_name, n_ctx, kv_type, device)
