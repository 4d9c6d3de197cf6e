"""The model-facing engine: sequences, scheduling, sampling and batched forwards."""
