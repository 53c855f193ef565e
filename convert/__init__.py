"""Checkpoint converters: Hugging Face / PyTorch / GGUF <-> Flax NNX and Orbax."""
