"""Model architectures (one file each) and the GGUF loader that picks them."""
