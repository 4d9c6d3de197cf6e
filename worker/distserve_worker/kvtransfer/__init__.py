"""KV cache transfer: codec (tensors <-> chunk messages), the prefill-side buffer, the gRPC transport."""
