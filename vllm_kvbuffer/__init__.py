"""vllm-kvbuffer: IO-aware serving of Gated DeltaNet linear attention as a vLLM plugin."""
__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point (placeholder until the plugin issue)."""
