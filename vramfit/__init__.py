"""vramfit: run GGUF language models (llama, qwen2, ...) on CPU and NVIDIA GPUs."""

__version__ = "0.1.0"
