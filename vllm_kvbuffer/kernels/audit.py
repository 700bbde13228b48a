"""Static audit of the KVBuffer Triton kernels, compiled exactly as a real launch specialises them.

No GPU is needed: the backend's Python wrappers are called with CPU tensors of real shapes and
strides while ``JITFunction.run`` is replaced by a compile-only step that binds the arguments with
Triton's own launch binder (an int equal to 1 becomes a constant, ints and pointers divisible by 16
are marked so, exactly as at launch) and compiles for ``sm_<arch>``. Each kernel's cubin is then
read with the ``nvdisasm`` / ``cuobjdump`` bundled in Triton's wheel.

``python -m vllm_kvbuffer.kernels.audit [--configs decode,verify] [--out audit.json]`` writes one
JSON row per (config, kernel) with:

- ``registers``, ``stack``, ``local``, ``spill_instructions`` (STL/LDL), ``shared_bytes``,
  ``programs_per_sm`` (sm_90 occupancy: registers, shared memory, warps, blocks) and its limiter;
- ``state_load_kinds``: SASS opcodes of the loads of the recurrent state (``LDG.E.128``,
  ``LDGSTS...128``), found through the line table: a state load is a ``tl.load`` in the kernel
  body whose pointer derives from ``state_ptr``;
- ``main_loop``: the innermost loop holding state loads, with its async copies, spills and the
  global loads consumed in the iteration that issues them (a steady-state iteration is simulated);
- ``round_trips_before_first_state_load``: dependent global round trips before the first state
  load is issued, from the scoreboard wait masks in the control bits (a load issued at epoch e
  completes at e + 1; an instruction that waits on a load's scoreboard moves to its epoch);
- ``state_bytes_in_flight_per_program`` / ``_per_sm``: the most state bytes outstanding at once
  (all lanes active), times programs per SM;
- ``buffer_length_loops``: loops (from the TTIR) whose trip count derives from a value loaded
  from ``meta_ptr`` (the buffer cursor) and that contain a global load; ``data_dependent_loops``
  lists every loop whose bound derives from any loaded value.

The branch structure is ignored (one linear pass, the main loop's body repeated): the numbers
describe the path of a live slot. In a kernel that spills registers the state-load dataflow
follows spill slots only approximately (ptxas reuses them), so its state-load counts may
include other loads (seen in prefill). ``targets(row)`` evaluates the decode targets of issue 12.
The process must not have ``TRITON_INTERPRET=1`` (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

# sm_90 (H100 / H200) resource limits used for programs per SM.
SM90 = dict(regs=65536, reg_unit=256, max_warps=64, max_blocks=32, smem=233472,
            smem_reserved=1024, smem_unit=128)
# Qwen3-Next-80B-A3B GDN layer at tensor parallel 1.
QWEN3_NEXT_TP1 = dict(H=16, HV=32, K=128, V=128)
# Issue 12 static targets for the decode kernel (fp32 state, C = 16, batch 128).
TARGETS = dict(min_state_bytes_in_flight_per_sm=96 * 1024, max_round_trips_before_state=2,
               max_main_loop_spills=0, max_buffer_length_loops=0)


# ------------------------------------------------------------------------------------------------
# Compile as a launch would
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Launch:
    config: str
    fn: object                # the JITFunction
    grid: tuple
    kernel: object            # triton CompiledKernel
    constants: dict           # launch-specialised ints (== 1) and constexprs, by name
    divisible_16: list        # arguments marked tt.divisibility = 16
    signature: dict           # name -> Triton type ("constexpr" for the specialised ones)


def _pack_args_inline(fn, backend, kwargs, bound, specialization):
    """What ``JITFunction.run`` does between binding and compiling in Triton releases without
    ``_pack_args`` (the GPU machine's 3.6)."""
    from triton.runtime import jit as tj
    options = backend.parse_options(kwargs)
    sigkeys = [x.name for x in fn.params]
    sigvals = [x[0] for x in specialization]
    signature = dict(zip(sigkeys, sigvals))
    constexprs = tj.find_paths_if(sigvals, lambda _, val: val == "constexpr")
    constexprs = {path: tj.get_iterable_path(list(bound.values()), path) for path in constexprs}
    attrvals = ["" if x[0] == "constexpr" else x[1] for x in specialization]
    attrs = tj.find_paths_if(attrvals, lambda _, x: isinstance(x, str))
    attrs = {k: backend.parse_attr(tj.get_iterable_path(attrvals, k)) for k in attrs}
    return options, signature, constexprs, attrs


@contextlib.contextmanager
def capture(arch: int = 90):
    """While active, ``kernel[grid](...)`` compiles for ``sm_<arch>`` and launches nothing."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the audit compiles kernels: run it without TRITON_INTERPRET=1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    launches: list = []
    binders: dict = {}
    original = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        binder = binders.get(self)
        if binder is None:
            binder = binders[self] = create_function_from_signature(self.signature, self.params,
                                                                    backend)
        bound, specialization, options = binder(*args, **kwargs)
        if hasattr(self, "_pack_args"):          # Triton >= 3.7
            options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound,
                                                                    specialization, options)
        else:                                    # older: the same steps inline in run()
            options, signature, constexprs, attrs = _pack_args_inline(self, backend, kwargs,
                                                                      bound, specialization)
        kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
        names = [p.name for p in self.params]
        launches.append(Launch(
            config="", fn=self, grid=tuple(grid) if not callable(grid) else grid(bound),
            kernel=kernel, signature=dict(signature),
            constants={names[p[0]]: v for p, v in constexprs.items()},
            divisible_16=[names[p[0]] for p, a in attrs.items()
                          if any(x == ["tt.divisibility", 16] or x == ("tt.divisibility", 16)
                                 for x in a)]))
        return None

    JITFunction.run = compile_only
    try:
        yield launches
    finally:
        JITFunction.run = original


def _pool(N: int, *, C: int, D: int, state_dtype, dtype, H, HV, K, V):
    """A pool of N + 1 slots (uninitialised: nothing runs) with the layout of allocate_cache."""
    import torch

    from .cache import META_COLS, KVBufferCache, accumulator_dtype
    S, B, acc = N + 1, C + D, accumulator_dtype(state_dtype)
    e = torch.empty
    return KVBufferCache(state=e(S, HV, V, K, dtype=state_dtype), buf_k=e(S, B, H, K, dtype=dtype),
                         buf_u=e(S, B, HV, V, dtype=acc), buf_g=e(S, B, HV, dtype=acc),
                         meta=torch.zeros(S, META_COLS, dtype=torch.int32), chunk_size=C,
                         max_draft_tokens=D)


def _inputs(lead, H, HV, K, V, dtype):
    import torch
    e = torch.empty
    return (e(*lead, H, K, dtype=dtype), e(*lead, H, K, dtype=dtype), e(*lead, HV, V, dtype=dtype),
            e(*lead, HV, dtype=torch.float32), e(*lead, HV, dtype=torch.float32))


def _backend():
    from . import triton
    return triton


def run_config(name: str, *, batch: int = 128, C: int = 16, D: int = 4, state: str = "float32",
               dtype: str = "bfloat16", prefill_len: int = 256, shapes: dict | None = None):
    """Call the Triton backend's wrapper for ``name`` (decode, verify, accept, prefill) at real
    shapes; returns the captured launches."""
    import torch

    tb = _backend()
    dims = dict(QWEN3_NEXT_TP1, **(shapes or {}))
    H, HV, K, V = dims["H"], dims["HV"], dims["K"], dims["V"]
    sdt, mdt = getattr(torch, state), getattr(torch, dtype)
    d = 0 if name == "decode" else D
    cache = _pool(batch, C=C, D=d, state_dtype=sdt, dtype=mdt, **dims)
    slots = torch.arange(1, batch + 1, dtype=torch.int32)
    kw = dict(scale=K ** -0.5, use_qk_l2norm=True)
    with capture() as launches:
        if name == "decode":
            tb.decode(cache, slots, *_inputs((batch,), H, HV, K, V, mdt), **kw)
        elif name == "verify":
            tb.verify(cache, slots, *_inputs((batch, D + 1), H, HV, K, V, mdt), **kw)
        elif name == "accept":
            tb.accept(cache, slots, torch.ones(batch, dtype=torch.int32), use_qk_l2norm=True)
        elif name == "prefill":
            cu = torch.arange(0, (batch + 1) * prefill_len, prefill_len, dtype=torch.int32)
            tb.prefill(cache, slots, *_inputs((batch * prefill_len,), H, HV, K, V, mdt), cu, **kw)
        else:
            raise ValueError(f"config: expected one of {DEFAULT_CONFIGS}, got {name!r}")
    for la in launches:
        la.config = name
    return launches


# ------------------------------------------------------------------------------------------------
# Which loads read the state: register dataflow from the state_ptr kernel parameter
# ------------------------------------------------------------------------------------------------
PARAM_BASE = 0x210      # first kernel parameter in constant bank 0 on sm_90
_SIZES = {"i1": 1, "i8": 1, "i16": 2, "i32": 4, "u32": 4, "i64": 8, "u64": 8, "fp16": 2,
          "bf16": 2, "fp32": 4, "f32": 4, "fp64": 8}


def param_offset(signature: dict, name: str) -> int:
    """Byte offset of a parameter in constant bank 0 (specialised constants are not passed)."""
    off = PARAM_BASE
    for pname, ty in signature.items():
        if ty == "constexpr":
            continue
        size = 8 if ty.startswith("*") else _SIZES.get(ty, 4)
        off = -(-off // size) * size
        if pname == name:
            return off
        off += size
    raise KeyError(name)


# ------------------------------------------------------------------------------------------------
# SASS
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Inst:
    addr: int
    text: str
    op: str
    hi: int
    src: tuple              # ((file, line), ...) innermost first, then the inlined-at sites

    @property
    def wait_mask(self) -> int:
        return (self.hi >> 52) & 0x3F

    @property
    def write_sb(self) -> int:
        return (self.hi >> 46) & 0x7


_INST = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s*/\* (0x[0-9a-f]{16}) \*/")
_HEX = re.compile(r"/\* (0x[0-9a-f]{16}) \*/")
_LINE = re.compile(r'File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')


def parse_sass(text: str) -> list:
    """Instructions of an ``nvdisasm -gi -c -hex`` listing; branch labels become addresses."""
    lines = text.splitlines()
    out, src = [], []
    labels, pending_labels = {}, []
    i = 0
    fresh = False
    while i < len(lines):
        ln = lines[i]
        lab = re.match(r"^(\.L_x_\d+):", ln)
        if lab:
            pending_labels.append(lab.group(1))
            i += 1
            continue
        if "//##" in ln:
            m = _LINE.search(ln)
            if m:
                if not fresh:
                    src = []
                    fresh = True
                src.append((m.group(1), int(m.group(2))))
                if m.group(3):
                    src.append((m.group(3), int(m.group(4))))
            i += 1
            continue
        m = _INST.search(ln)
        if m and i + 1 < len(lines):
            fresh = False
            hi = _HEX.search(lines[i + 1])
            text_ = m.group(2)
            parts = text_.split()
            op = parts[1] if parts[0].startswith("@") and len(parts) > 1 else parts[0]
            out.append(Inst(int(m.group(1), 16), text_, op, int(hi.group(1), 16) if hi else 0,
                            tuple(src)))
            for lb in pending_labels:
                labels[lb] = out[-1].addr
            pending_labels = []
            i += 2
        else:
            i += 1
    for x in out:
        m = re.search(r"`\((\.L_x_\d+)\)", x.text)
        if m and m.group(1) in labels:
            x.text = x.text.replace(m.group(0), hex(labels[m.group(1)]))
    return out


def _is_global_load(op: str) -> bool:
    base = op.split(".")[0]
    return base in ("LDG", "LDGSTS", "UTMALDG") or (base == "LD" and ".E" in op)


def _bytes_per_thread(op: str) -> int:
    toks = op.split(".")
    for t, b in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if t in toks:
            return b
    return 4


def loops(insts: list) -> list:
    """(start index, end index) of every backward branch, innermost (shortest) first."""
    index = {x.addr: i for i, x in enumerate(insts)}
    out = []
    for i, x in enumerate(insts):
        m = re.search(r"BRA\b.*?(0x[0-9a-f]+)", x.text)
        if m and x.op.startswith("BRA"):
            tgt = int(m.group(1), 16)
            if tgt < x.addr and tgt in index:
                out.append((index[tgt], i))
    # Innermost loops first (a loop that contains no other), then in program order.
    inner = [lp for lp in out if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in out)]
    return sorted(inner, key=lambda se: se[0]) + sorted(
        (lp for lp in out if lp not in inner), key=lambda se: se[1] - se[0])


_NO_DEST = ("ST", "STG", "STS", "STL", "RED", "BRA", "EXIT", "BAR", "DEPBAR", "LDGDEPBAR", "NOP",
            "WARPSYNC", "LDGSTS", "BSSY", "BSYNC", "CALL", "RET", "MEMBAR", "FENCE", "ERRBAR",
            "CCTL", "YIELD", "ARRIVES", "SYNCS", "UTMALDG", "UTMASTG", "STSM")
_REG = re.compile(r"\b(U?R\d+|U?P\d)(\.64)?\b")
_CBANK = re.compile(r"c\[0x0\]\[(0x[0-9a-f]+)\]")


def _regs(token: str, wide: bool) -> set:
    out = set()
    for m in _REG.finditer(token):
        r = m.group(1)
        out.add(r)
        if (m.group(2) or wide) and r[-1].isdigit() and "P" not in r:
            pre = r.rstrip("0123456789")
            out.add(f"{pre}{int(r[len(pre):]) + 1}")
    return out


def _operands(x: Inst) -> list:
    text = x.text.split(None, 1)[1] if x.text.startswith("@") else x.text
    rest = text.split(None, 1)[1] if " " in text else ""
    return [o.strip() for o in rest.split(",")] if rest else []


def _address(x: Inst) -> str:
    """The global address operand of a load (not its memory descriptor)."""
    groups = re.findall(r"\[([^\]]*)\]", x.text)
    groups = [g for g in groups if not g.startswith("UR") or "+" in g or ".64" in g]
    return groups[-1] if groups else ""


def state_loads(insts: list, trace: list, lo: int, hi: int) -> set:
    """Indices of the global loads whose address derives from the parameter bytes [lo, hi).

    Flow-sensitive over ``trace`` (registers are reused): a write taints its destination iff a
    source is tainted or reads the parameter; a load's result is never an address of the state.
    """
    tainted: set = set()
    # Local-memory slots holding a tainted value (register spills), with the pass that stored
    # it: ptxas reuses slots, so a reload only inherits taint stored in the same pass.
    spilled: dict = {}
    found = set()
    for i, it in trace:
        x = insts[i]
        base = x.op.split(".")[0]
        if base in ("STL", "LDL"):
            ops = _operands(x)
            slot = re.sub(r"\s", "", ops[0] if base == "STL" else ops[-1])
            if base == "STL":
                if _regs(ops[-1], True) & tainted:
                    spilled[slot] = it
                else:
                    spilled.pop(slot, None)
            else:
                dest = _regs(ops[0], ".64" in x.op or ".128" in x.op)
                if spilled.get(slot, object()) == it:
                    tainted |= dest
                else:
                    tainted -= dest
            continue
        if _is_global_load(x.op):
            if _regs(_address(x), False) & tainted:
                found.add(i)
        ops = _operands(x)
        if not ops or base in _NO_DEST:
            continue
        wide = any(t in x.op.split(".") for t in ("64", "WIDE", "128"))
        dest = _regs(ops[0], wide)
        srcs = ops[1:]
        while srcs and re.fullmatch(r"U?P\d|U?PT", srcs[0]) and len(srcs) > 1:
            dest |= _regs(srcs[0], False)         # carry / compare outputs
            srcs = srcs[1:]
        if _is_global_load(x.op) or base in ("LDS", "LDSM", "LD", "LDL", "S2R", "S2UR", "CS2R"):
            hot = False
        else:
            hot = False
            for o in srcs:
                if _regs(o, False) & tainted:
                    hot = True
                for m in _CBANK.finditer(o):
                    if lo <= int(m.group(1), 16) < hi:
                        hot = True
        if hot:
            tainted |= dest
        else:
            tainted -= dest
    return found


@dataclasses.dataclass
class _Load:
    pos: int
    iteration: int
    inst: Inst
    epoch: int
    nbytes: int
    state: bool
    retired_in: int = -1


def make_trace(n: int, main: tuple | None) -> list:
    """(instruction index, iteration) in program order, the main loop's body run three times."""
    if main is None:
        return [(i, -1) for i in range(n)]
    s, e = main
    trace = [(i, -1) for i in range(s)] + [(i, 0) for i in range(s, e + 1)]
    trace += [(i, 1) for i in range(s, e + 1)] + [(i, 2) for i in range(s, e + 1)]
    return trace + [(i, -1) for i in range(e + 1, n)]


def simulate(insts: list, is_state, threads: int, main: tuple | None) -> dict:
    """Linear pass over :func:`make_trace` tracking scoreboards, async-copy groups, dependent
    round-trip epochs and outstanding state bytes."""
    trace = make_trace(len(insts), main)
    pending = collections.defaultdict(list)     # scoreboard -> [_Load]
    groups: list = []                           # committed async-copy groups
    open_group: list = []
    cur = 0
    first_state_epoch = None
    in_flight = 0
    loads = []
    saw_async = False

    def retire(batch, it):
        nonlocal cur
        for ld in batch:
            cur = max(cur, ld.epoch + 1)
            ld.retired_in = it

    for pos, (i, it) in enumerate(trace):
        x = insts[i]
        for sb in range(6):
            if x.wait_mask >> sb & 1 and pending.get(sb):
                retire(pending.pop(sb), it)
        if x.op.startswith("DEPBAR"):
            m = re.search(r"SB(\d),\s*(0x[0-9a-f]+|\d+)", x.text)
            if m:
                sb, keep = int(m.group(1)), int(m.group(2), 0)
                if saw_async and sb == 0:
                    if open_group:
                        groups.append(open_group)
                        open_group = []
                    while len(groups) > keep:
                        retire(groups.pop(0), it)
                else:
                    q = pending.get(sb, [])
                    while len(q) > keep:
                        retire([q.pop(0)], it)
        if x.op.startswith("LDGDEPBAR"):
            if open_group:
                groups.append(open_group)
                open_group = []
        if _is_global_load(x.op):
            ld = _Load(pos, it, x, cur, _bytes_per_thread(x.op) * threads, is_state(x))
            loads.append(ld)
            if ld.state and first_state_epoch is None:
                first_state_epoch = cur
            if x.op.startswith("LDGSTS"):
                saw_async = True
                open_group.append(ld)
            elif x.write_sb != 7:
                pending[x.write_sb].append(ld)
        outstanding = [ld for q in pending.values() for ld in q]
        outstanding += [ld for gr in groups for ld in gr] + open_group
        in_flight = max(in_flight, sum(ld.nbytes for ld in outstanding if ld.state))
    consumed = [ld for ld in loads if ld.iteration == 1 and ld.retired_in == 1]
    return dict(first_state_epoch=first_state_epoch, in_flight=in_flight, loads=loads,
                consumed_same_iteration=consumed)


# ------------------------------------------------------------------------------------------------
# TTIR: loops whose trip count depends on loaded values
# ------------------------------------------------------------------------------------------------
_DEF = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)?\s*=\s*([\w.]+)(.*)$")
_FOR = re.compile(r"scf\.for\s+%[\w.$-]+\s*=\s*(%[\w.$-]+)\s+to\s+(%[\w.$-]+)\s+step\s+(%[\w.$-]+)")
_LOCDEF = re.compile(r'^#(loc\d*) = loc\((.*)\)\s*$')


def _resolve_loc(locs: dict, key: str, depth: int = 0):
    body = locs.get(key)
    if body is None or depth > 20:
        return None
    m = re.match(r'"([^"]+)":(\d+):\d+', body)
    if m:
        return int(m.group(2))
    m = re.search(r"#(loc\d*)", body)
    return _resolve_loc(locs, m.group(1), depth + 1) if m else None


def ttir_loops(ttir: str) -> list:
    """Every scf.for / scf.while of a TTIR listing: Python line, the pointer arguments of the
    loads its trip count derives from, and how many loads its body holds."""
    lines = ttir.splitlines()
    defs: dict = {}
    locs: dict = {}
    open_while: list = []
    for ln in lines:
        m = _LOCDEF.match(ln)
        if m:
            locs[m.group(1)] = m.group(2)
            continue
        # Loop-carried values depend on their initial values (and, for while, on all of them).
        for a, b in re.findall(r"(%[\w.$-]+)\s*=\s*(%[\w.$-]+)", ln.split("->")[0]
                               if ("iter_args" in ln or "scf.while" in ln) else ""):
            if "iter_args" in ln or "scf.while" in ln:
                defs.setdefault(a, ("carried", [b]))
        if "scf.while" in ln:
            open_while.append(re.findall(r"=\s*(%[\w.$-]+)", ln.split("scf.while", 1)[1]
                                         .split(")")[0]))
        bb = re.match(r"^\s*\^bb\d+\((.*)\):", ln)
        if bb and open_while:
            for a in re.findall(r"(%[\w.$-]+):", bb.group(1)):
                defs.setdefault(a, ("carried", list(open_while[-1])))
        m = _DEF.match(ln)
        if m and m.group(1) not in defs:
            rhs = m.group(3).split(" loc(")[0]
            ops = re.findall(r"%[\w.$-]+", rhs.split(" : ")[0] if m.group(2) != "scf.for" else rhs)
            defs[m.group(1)] = (m.group(2), ops)

    def load_roots(name, seen):
        """Pointer arguments of the loads a value derives from."""
        if name in seen:
            return set()
        seen.add(name)
        op, ops = defs.get(name, (None, []))
        if op is None:
            return set()
        if op == "tt.load":
            return {r for o in ops[:1] for r in ptr_args(o, set())} or {"?"}
        return set().union(*(load_roots(o, seen) for o in ops)) if ops else set()

    pointers = set(re.findall(r"%([\w.$-]+): !tt\.ptr", ttir))

    def ptr_args(name, seen):
        if name in seen:
            return set()
        seen.add(name)
        if name not in defs:
            return {name.lstrip("%")} & pointers
        return set().union(*(ptr_args(o, seen) for o in defs[name][1])) if defs[name][1] else set()

    out = []
    for i, ln in enumerate(lines):
        is_for = _FOR.search(ln) if "scf.for" in ln else None
        is_while = re.search(r"\bscf\.while\b", ln)
        if not (is_for or is_while):
            continue
        depth, j, nloads = 0, i, 0
        while j < len(lines):
            depth += lines[j].count("{") - lines[j].count("}")
            if j > i and "tt.load" in lines[j]:
                nloads += 1
            if depth <= 0 and (j > i or "{" in lines[j]):
                break
            j += 1
        operands = is_for.groups() if is_for else re.findall(
            r"=\s*(%[\w.$-]+)", ln.split("scf.while", 1)[1].split(")")[0])
        roots = set()
        for operand in operands:
            roots |= load_roots(operand, set())
        loc = re.search(r"loc\(#(loc\d*)\)\s*$", lines[j] if j < len(lines) else "")
        out.append(dict(kind="for" if is_for else "while",
                        line=_resolve_loc(locs, loc.group(1)) if loc else None,
                        bound_loaded_from=sorted(roots), global_loads_in_body=nloads))
    return out


# ------------------------------------------------------------------------------------------------
# Per kernel
# ------------------------------------------------------------------------------------------------
def _tool(name: str) -> str:
    import triton
    return str(pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def occupancy(regs: int, shared: int, warps: int) -> tuple:
    lim = SM90
    per_warp = -(-regs * 32 // lim["reg_unit"]) * lim["reg_unit"]
    by = dict(registers=(lim["regs"] // per_warp) // warps if per_warp else lim["max_blocks"],
              warps=lim["max_warps"] // warps, blocks=lim["max_blocks"])
    smem = -(-(shared + lim["smem_reserved"]) // lim["smem_unit"]) * lim["smem_unit"]
    by["shared"] = lim["smem"] // smem
    limiter = min(by, key=by.get)
    return by[limiter], limiter


def analyse(la: Launch) -> dict:
    k = la.kernel
    md = k.metadata
    warps = md.num_warps
    with tempfile.TemporaryDirectory() as d:
        cub = pathlib.Path(d) / "k.cubin"
        cub.write_bytes(k.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cub)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-gi", "-c", "-hex", str(cub)],
                              capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    regs, stack, static_shared, local = (int(g) for g in m.groups())
    shared = int(md.shared) + static_shared
    insts = parse_sass(sass)
    src_file = str(pathlib.Path(inspect.getsourcefile(la.fn.fn)).resolve())
    loop_list = loops(insts)
    # Loads of the state: dataflow over the whole code with every loop body run three times.
    idx_state = set()
    if "state_ptr" in la.signature:
        lo = param_offset(la.signature, "state_ptr")
        for lp in [None] + loop_list:
            idx_state |= state_loads(insts, make_trace(len(insts), lp), lo, lo + 8)
    by_addr = {insts[i].addr for i in idx_state}

    def is_state(x: Inst) -> bool:
        return x.addr in by_addr

    programs, limiter = occupancy(regs, shared, warps)
    main = next((lp for lp in loop_list
                 if any(insts[i].addr in by_addr for i in range(lp[0], lp[1] + 1))), None)
    sim = simulate(insts, is_state, 32 * warps, main)
    state_kinds = collections.Counter(x.op for x in insts if _is_global_load(x.op) and is_state(x))
    spills = sum(1 for x in insts if x.op.split(".")[0] in ("STL", "LDL"))
    row = dict(
        config=la.config, kernel=la.fn.__name__, grid=list(la.grid), num_warps=warps,
        num_stages=md.num_stages,
        launch_constants={n: v for n, v in la.constants.items()
                          if isinstance(v, (int, float, bool, str))},
        divisible_16=la.divisible_16,
        registers=regs, stack=stack, local=local, spill_instructions=spills,
        shared_bytes=shared, programs_per_sm=programs, occupancy_limiter=limiter,
        instructions=len(insts),
        state_load_kinds=dict(state_kinds),
        round_trips_before_first_state_load=sim["first_state_epoch"],
        state_bytes_in_flight_per_program=sim["in_flight"],
        state_bytes_in_flight_per_sm=sim["in_flight"] * programs,
        main_loop=None,
    )
    if main is not None:
        body = insts[main[0]:main[1] + 1]
        row["main_loop"] = dict(
            instructions=len(body),
            async_copies=sum(1 for x in body if x.op.startswith(("LDGSTS", "UTMALDG"))),
            global_loads=sum(1 for x in body if _is_global_load(x.op)),
            state_loads=sum(1 for x in body if _is_global_load(x.op) and is_state(x)),
            spill_instructions=sum(1 for x in body if x.op.split(".")[0] in ("STL", "LDL")),
            barriers=sum(1 for x in body if x.op.startswith("BAR")),
            loads_consumed_in_issuing_iteration=[
                dict(op=ld.inst.op, line=next((ln for f, ln in ld.inst.src if f == src_file),
                                              None))
                for ld in sim["consumed_same_iteration"]],
        )
    tl_loops = ttir_loops(k.asm["ttir"])
    row["data_dependent_loops"] = [lp for lp in tl_loops if lp["bound_loaded_from"]]
    row["buffer_length_loops"] = [lp for lp in tl_loops if lp["global_loads_in_body"]
                                  and "meta_ptr" in lp["bound_loaded_from"]]
    return row


def targets(row: dict) -> dict:
    """Issue 12 static targets: name -> {value, target, met}."""
    ml = row.get("main_loop") or {}
    t = TARGETS
    checks = {
        "state_bytes_in_flight_per_sm": (row["state_bytes_in_flight_per_sm"],
                                         f">= {t['min_state_bytes_in_flight_per_sm']}",
                                         row["state_bytes_in_flight_per_sm"]
                                         >= t["min_state_bytes_in_flight_per_sm"]),
        "round_trips_before_first_state_load": (
            row["round_trips_before_first_state_load"], f"<= {t['max_round_trips_before_state']}",
            row["round_trips_before_first_state_load"] is not None
            and row["round_trips_before_first_state_load"] <= t["max_round_trips_before_state"]),
        "main_loop_spills": (ml.get("spill_instructions", row["spill_instructions"]),
                             f"<= {t['max_main_loop_spills']}",
                             ml.get("spill_instructions", row["spill_instructions"])
                             <= t["max_main_loop_spills"]),
        "buffer_length_loops_with_global_loads": (len(row["buffer_length_loops"]),
                                                  f"<= {t['max_buffer_length_loops']}",
                                                  len(row["buffer_length_loops"])
                                                  <= t["max_buffer_length_loops"]),
    }
    return {k: dict(value=v, target=tg, met=bool(ok)) for k, (v, tg, ok) in checks.items()}


DEFAULT_CONFIGS = ("decode", "verify", "accept", "prefill")


def audit(configs=DEFAULT_CONFIGS, **kw) -> dict:
    import triton
    rows = []
    for name in configs:
        for la in run_config(name, **kw):
            row = analyse(la)
            if la.fn.__name__.lstrip("_").startswith(("decode", "verify")):
                row["targets"] = targets(row)
            rows.append(row)
    return dict(triton=triton.__version__, arch="sm_90",
                shapes=dict(QWEN3_NEXT_TP1, dtype=kw.get("dtype", "bfloat16"),
                            state_dtype=kw.get("state", "float32"), C=kw.get("C", 16),
                            D=kw.get("D", 4), batch=kw.get("batch", 128)),
                kernels=rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--C", type=int, default=16)
    ap.add_argument("--D", type=int, default=4)
    ap.add_argument("--state", default="float32")
    ap.add_argument("--out", help="write the JSON report here (default: stdout)")
    args = ap.parse_args(argv)
    rep = audit(tuple(c for c in args.configs.split(",") if c), batch=args.batch, C=args.C,
                D=args.D, state=args.state)
    text = json.dumps(rep, indent=1)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    else:
        print(text)
    for r in rep["kernels"]:
        tg = r.get("targets", {})
        miss = [k for k, v in tg.items() if not v["met"]]
        print(f"{r['config']:8s} {r['kernel']:24s} regs={r['registers']} stack={r['stack']} "
              f"smem={r['shared_bytes']} progs/SM={r['programs_per_sm']} "
              f"state={r['state_load_kinds']} rt={r['round_trips_before_first_state_load']} "
              f"inflight/SM={r['state_bytes_in_flight_per_sm']}"
              + (f" targets missed={miss}" if tg else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
