"""Ahead-of-time compile of every KVBuffer Triton kernel for an NVIDIA target, without a GPU.

``python -m vllm_kvbuffer.kernels.compile_check [--arch 90]`` prints one line per kernel variant
with its register / stack use (from the cuobjdump bundled with Triton) and exits non-zero if a
kernel fails to compile or the decode kernel spills. Must run in a process where
``TRITON_INTERPRET`` is unset (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

PTR_TYPES = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16",
             "slots_ptr": "*i32", "meta_ptr": "*i32", "bk_ptr": "*bf16", "cu_ptr": "*i32",
             "acc_ptr": "*i32", "add_ptr": "*i32"}


SHARED_LIMIT = 232448   # bytes of shared memory one program may use on sm_90


def _signature(fn, ptrs: dict, const: dict) -> dict:
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in const:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptrs.get(name, "*fp32")
        else:
            sig[name] = "fp32" if name == "scale" else "i32"
    return sig


def variants(H=16, HV=32, K=128, V=128, C=16, D=4):  # noqa: C901
    """(name, kernel, pointer types, constexprs, num_warps) for the default launch configs."""
    from . import triton_impl as ti
    from .cache import allocate_cache

    out = []
    for sdt, tname in (("fp32", "*fp32"), ("bf16", "*bf16")):
        import torch
        cache = allocate_cache(1, num_k_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V,
                               chunk_size=C, max_draft_tokens=D, dtype=torch.bfloat16,
                               state_dtype=getattr(torch, {"fp32": "float32",
                                                           "bf16": "bfloat16"}[sdt]),
                               device="meta")
        ptrs = dict(PTR_TYPES, state_ptr=tname)
        for batch in (1, 256):
            d = ti.launch_config(cache, "decode", batch=batch)
            nv = -(-V // d["BV"])
            tiles = -(-nv // min(d["splits"], nv))
            for flush_dot in (False, True):
                out.append((f"decode[{sdt},tiles={tiles},flush_dot={flush_dot}]",
                            ti._decode_kernel, ptrs,
                            dict(K=K, V=V, GROUP=HV // H, C=C, BK=d["BK"], BV=d["BV"],
                                 BL=ti._pow2(C + D), TILES=tiles, USE_L2=True,
                                 FLUSH_DOT=flush_dot), d["num_warps"], d["num_stages"]))
        b = ti.launch_config(cache, "block")
        for prefill, CC, BT in ((True, C, ti._pow2(C)), (True, 64, 64),
                                (False, C, ti._pow2(D + 1))):
            out.append((f"{'prefill' if prefill else 'verify'}[{sdt},C={CC}]", ti._block_kernel,
                        ptrs,
                        dict(K=K, V=V, HV=HV, GROUP=HV // H, C=CC, BT=BT, BK=b["BK"],
                             BV=b["BV"], BLH=ti._HIST_BLOCK, USE_L2=True, PREFILL=prefill),
                        b["num_warps"], 3))
        f = ti.launch_config(cache, "flush")
        out.append((f"accept_flush[{sdt}]", ti._accept_flush_kernel, ptrs,
                    dict(K=K, V=V, GROUP=HV // H, C=C, BK=f["BK"], BV=f["BV"],
                         BLH=ti._HIST_BLOCK, USE_L2=True), f["num_warps"], 3))
    for mode in (0, 1, 2):
        out.append((f"commit[mode={mode}]", ti._commit_kernel, PTR_TYPES, dict(C=C, MODE=mode),
                    1, 3))
    out.append(("prefill_commit", ti._prefill_commit_kernel, PTR_TYPES,
                dict(H=H, K=K, HV=HV, C=C, BH=H, BK=K, BHV=HV), 4, 3))
    return out


def compile_all(arch: int = 90) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    target = GPUTarget("cuda", arch, 32)
    rows = []
    for name, fn, ptrs, const, nw, ns in variants():
        row = {"kernel": name, "num_warps": nw, "num_stages": ns}
        try:
            k = triton.compile(ASTSource(fn=fn, signature=_signature(fn, ptrs, const),
                                         constexprs=const),
                               target=target, options={"num_warps": nw, "num_stages": ns})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"])
                f.flush()
                usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name],
                                       capture_output=True, text=True, check=True).stdout
            m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
            row.update(ok=True, regs=int(m.group(1)), stack=int(m.group(2)),
                       shared=int(k.metadata.shared))
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[-2000:]}")
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = compile_all(args.arch)
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['kernel']:22s} warps={r['num_warps']} " +
                  (f"regs={r['regs']} stack={r['stack']} shared={r['shared']}" if r["ok"] else r["error"][:500]))
    bad = [r for r in rows if not r["ok"] or (r["kernel"].startswith("decode") and r["stack"])
           or r["shared"] > SHARED_LIMIT]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
