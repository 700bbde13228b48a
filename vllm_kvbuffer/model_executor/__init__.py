"""The KVBuffer-aware Qwen3-Next model and GDN layer for vLLM (plan: docs/plugin-design.md)."""
