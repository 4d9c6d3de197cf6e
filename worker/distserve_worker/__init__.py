"""DistServe serving runtime: prefill and decode workers, KV transfer, the OpenAI-compatible router."""
