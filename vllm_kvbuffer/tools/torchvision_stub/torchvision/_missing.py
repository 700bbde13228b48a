"""Names the stand-in does not implement: importable (modules import many names they never
call), and failing loudly, with the name, when called."""


def missing(module: str, name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def fn(*args, **kwargs):
        raise NotImplementedError(
            f"{module}.{name}: not available in the development stand-in for torchvision "
            f"(vllm_kvbuffer.tools.torchvision_stub); install torchvision's CPU build")
    fn.__name__ = fn.__qualname__ = name
    return fn
