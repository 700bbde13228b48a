"""Shared pieces of the benchmarks: byte models, timing, environment record, JSON and plots.

Byte models (``docs/kvbuffer-math.md`` section 4), per decode step, all sequences of one
GDN layer, minimum DRAM traffic (each byte the algorithm must touch, counted once):

- ``s  = HV * K * V * state_bytes``                 one request's state
- ``row = H * K * 2 + HV * V * 4 + HV * 4``         one buffered token: bf16 raw key per key head,
  fp32 corrected value ``u`` per value head, fp32 cumulative decay ``G`` per value head
- ``io = (2 H K + 2 HV V) * 2 + 2 HV * 4``           q, k, v, o in bf16; g, beta in fp32

recurrent (fla / stock)   : N (2 s + io)
KVBuffer, flush interval C: N (s (1 + 1/C) + row (C-1)/2 + row + io)   (mean over a flush cycle)
ReplaySSM ring of R      : the same formula with C = R (read S0 every step, write it once per R
                            steps, read on average (R-1)/2 ring rows, append one)
short context, L buffered : N (L row + row + io)                       (no state read or written)
verify T = D+1, KVBuffer  : N (s (1 + a/C) + L row + T row + T io)    (one S0 read, T rows appended,
                            a accepted tokens per step on average: a flush every C/a steps)
verify, per-draft states  : N (s + T s + T io)                         (read S0, write T states)

Timing on a GPU: the work is captured in a CUDA graph (as vLLM runs decode) and the graph replay
is timed with CUDA events (``triton.testing.do_bench``, median). ``--smoke`` runs on the CPU with
``TRITON_INTERPRET=1`` at tiny shapes: it proves the script runs and checks every output against
the float64 recurrence; its "times" are wall-clock seconds of the interpreter, not performance.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

QWEN3_NEXT = dict(H=16, HV=32, K=128, V=128)
# Tiny shapes for --smoke (interpreted Triton on the CPU).
SMOKE = dict(H=2, HV=4, K=16, V=16)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROW_BYTES_FORMULA = "H*K*2 + HV*V*4 + HV*4"


def esz(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


def heads(tp: int, preset: dict = QWEN3_NEXT) -> tuple[int, int, int, int]:
    """(H, HV, K, V) of one rank when the heads are split over ``tp`` ranks."""
    return preset["H"] // tp, preset["HV"] // tp, preset["K"], preset["V"]


# ------------------------------------------------------------------------------------------------
# byte models (see the module docstring)
# ------------------------------------------------------------------------------------------------
def state_bytes(HV, K, V, state_dt) -> int:
    return HV * K * V * esz(state_dt)


def row_bytes(H, HV, K, V) -> int:
    return H * K * 2 + HV * V * 4 + HV * 4


def io_bytes(N, H, HV, K, V, T=1, in_dt=torch.bfloat16) -> int:
    return N * T * ((2 * H * K + 2 * HV * V) * esz(in_dt) + 2 * HV * 4)


def bytes_recurrent(N, H, HV, K, V, state_dt) -> float:
    return 2 * N * state_bytes(HV, K, V, state_dt) + io_bytes(N, H, HV, K, V)


def bytes_kvbuffer(N, H, HV, K, V, C, state_dt) -> float:
    s, row = state_bytes(HV, K, V, state_dt), row_bytes(H, HV, K, V)
    return N * (s * (1 + 1 / C) + row * (C - 1) / 2 + row) + io_bytes(N, H, HV, K, V)


def bytes_replayssm(N, H, HV, K, V, R, state_dt) -> float:
    return bytes_kvbuffer(N, H, HV, K, V, R, state_dt)


def bytes_short_context(N, H, HV, K, V, L) -> float:
    return N * (L * row_bytes(H, HV, K, V) + row_bytes(H, HV, K, V)) + io_bytes(N, H, HV, K, V)


def bytes_verify_kvbuffer(N, H, HV, K, V, T, L, state_dt, C=16, accepted=0.0) -> float:
    s, row = state_bytes(HV, K, V, state_dt), row_bytes(H, HV, K, V)
    return N * (s * (1 + accepted / C) + L * row + T * row) + io_bytes(N, H, HV, K, V, T)


def bytes_verify_per_draft(N, H, HV, K, V, T, state_dt) -> float:
    s = state_bytes(HV, K, V, state_dt)
    return N * (s + T * s) + io_bytes(N, H, HV, K, V, T)


# ------------------------------------------------------------------------------------------------
# device, timing
# ------------------------------------------------------------------------------------------------
def smoke_env() -> None:
    """--smoke runs Triton interpreted on the CPU; the flag must be set before kernels load."""
    os.environ.setdefault("TRITON_INTERPRET", "1")


def device_setup(args, script: str) -> tuple[str, dict, torch.dtype]:
    """``(device, preset, input dtype)``: tiny fp32 shapes on the CPU for ``--smoke``, else the
    Qwen3-Next preset in bf16 on CUDA (exits with a message naming ``script`` without CUDA)."""
    if args.smoke:
        smoke_env()
        return "cpu", SMOKE, torch.float32
    if not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA device (or --smoke)")
    return "cuda", QWEN3_NEXT, torch.bfloat16


def finish_smoke(result: dict, keys: tuple[str, ...], tol: float, out: pathlib.Path, *,
                 optional: tuple[str, ...] = ()) -> None:
    """Record whether every row's ``keys`` (max relative errors against float64) are present and
    below ``tol`` as ``result["smoke_check"]``, save, print. ``optional`` keys count where a row
    has them (a baseline that cannot run on the CPU has none)."""
    errs = [r.get(k) for r in result["rows"] for k in keys]
    errs += [r[k] for r in result["rows"] for k in optional if r.get(k) is not None]
    found = [e for e in errs if e is not None]
    result["smoke_check"] = dict(max_rel_err=max(found, default=None), tolerance=tol,
                                 passed=bool(errs) and all(e is not None and e < tol
                                                           for e in errs))
    save(result, out)
    print("smoke check:", result["smoke_check"])


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Bytes read + written per second of a device-to-device copy (the achievable ceiling)."""
    if device == "cuda":
        import triton.testing as tt
        a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
        b = torch.empty_like(a)
        ms = tt.do_bench(lambda: b.copy_(a), warmup=50, rep=200, return_mode="median")
        return 2 * nbytes / (ms * 1e-3)
    a = torch.rand((16 << 20) // 4)
    b = torch.empty_like(a)
    t0 = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    return 2 * 5 * a.numel() * 4 / (time.perf_counter() - t0)


def time_ms(fn, device: str, reps_ms: int = 60) -> float:
    """Median milliseconds of one call of ``fn``.

    CUDA: ``fn`` is captured in a CUDA graph after two eager warm-up calls (which also compile);
    the replay is timed with CUDA events. CPU (smoke): wall time of one call after one warm-up.
    ``fn`` must be safe to call repeatedly (state it mutates is allowed to drift).
    """
    if device != "cuda":
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing as tt
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    ms = tt.do_bench(g.replay, warmup=10, rep=reps_ms, return_mode="median")
    del g
    return ms


def bw_frac(nbytes: float, ms: float, copy_bw: float) -> float | None:
    if not ms or ms != ms or not copy_bw:
        return None
    return nbytes / (ms * 1e-3) / copy_bw


def card_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, Triton interpreter)"


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("triton", "fla"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001  (any import failure: report it, benchmark on)
            out[mod] = f"unavailable: {type(e).__name__}"
    try:
        from benchmarks.replayssm import sglang_version
        out["sglang (ReplaySSM kernel)"] = sglang_version()
    except Exception as e:  # noqa: BLE001  (a missing or odd wheel: report it, benchmark on)
        out["sglang (ReplaySSM kernel)"] = f"unavailable: {type(e).__name__}"
    return out


def header(name: str, device: str, smoke: bool, preset: dict) -> dict:
    return {"benchmark": name, "card": card_name(device), "device": device, "smoke": smoke,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "versions": versions(), "copy_bandwidth_Bps": copy_bandwidth(device),
            "preset": preset, "byte_model": "benchmarks/common.py (docs/kvbuffer-math.md"
            f" section 3; row = {ROW_BYTES_FORMULA})", "rows": []}


def save(result: dict, out: pathlib.Path) -> None:
    """Write ``result`` as JSON; paths inside the checkout are written as ``<repo>/...`` (results
    are committed and name no machine's folders)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str).replace(str(ROOT), "<repo>"))


def default_out(name: str, device: str) -> pathlib.Path:
    card = card_name(device) if device == "cuda" else "cpu-smoke"
    return ROOT / "benchmarks" / "results" / f"{name}-{card.replace(' ', '_')}.json"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def plot(result: dict, out_png: pathlib.Path, *, x: str, series: dict, title: str,
         group: tuple = (), logy: bool = True) -> pathlib.Path | None:
    """Line plot of ``series`` (label -> row key, milliseconds) against row key ``x``, one panel
    per distinct value of the ``group`` row keys. matplotlib is optional: imported here only."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); JSON saved, no PNG drawn",
              file=sys.stderr)
        return None
    rows = result["rows"]
    keys = sorted({tuple(r.get(g) for g in group) for r in rows}, key=str)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        sel = [r for r in rows if tuple(r.get(g) for g in group) == key]
        for label, col in series.items():
            pts = sorted((r[x], r[col] * 1e3) for r in sel
                         if isinstance(r.get(col), (int, float)) and r[col] == r[col])
            pts = list(dict(pts).items())
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel("us")
        ax.set_title(", ".join(f"{g}={v}" for g, v in zip(group, key)), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title} - {result['card']}", fontsize=10)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    print(f"plot {out_png}")
    return out_png


def svg_bar_chart(path: pathlib.Path, title: str, panels: list) -> pathlib.Path:
    """A grouped bar chart as a standalone SVG (no plotting library needed). ``panels``: a list
    of ``(panel title, category labels, {series label: values per category})``; every value is
    printed above its bar."""
    colours = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948")
    pw, ph, top, bottom, left = 460, 300, 50, 60, 50
    width = pw * len(panels)

    def esc(t) -> str:
        return str(t).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{ph + 40}" '
           f'font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">{esc(title)}</text>']
    for i, (ptitle, cats, series) in enumerate(panels):
        x0, h = i * pw + left, ph - top - bottom
        vmax = max([v for vals in series.values() for v in vals if v == v] + [1e-9]) * 1.15
        out.append(f'<text x="{i * pw + pw / 2}" y="{top - 12}" text-anchor="middle" '
                   f'font-size="12">{esc(ptitle)}</text>')
        out.append(f'<line x1="{x0}" y1="{top + h}" x2="{x0 + pw - left - 10}" y2="{top + h}" '
                   f'stroke="black"/>')
        gw = (pw - left - 10) / max(len(cats), 1)
        bw = 0.8 * gw / max(len(series), 1)
        for c, cat in enumerate(cats):
            out.append(f'<text x="{x0 + c * gw + gw / 2}" y="{top + h + 16}" '
                       f'text-anchor="middle">{esc(cat)}</text>')
            for j, vals in enumerate(series.values()):
                v = vals[c]
                if v != v:                       # NaN: a failed configuration, no bar
                    continue
                bh = h * v / vmax
                bx = x0 + c * gw + 0.1 * gw + j * bw
                out.append(f'<rect x="{bx:.1f}" y="{top + h - bh:.1f}" width="{bw:.1f}" '
                           f'height="{bh:.1f}" fill="{colours[j % len(colours)]}"/>')
                out.append(f'<text x="{bx + bw / 2:.1f}" y="{top + h - bh - 3:.1f}" '
                           f'text-anchor="middle" font-size="9">{v:.3g}</text>')
        for j, name in enumerate(series):
            ly = top + h + 30 + 12 * (j // 2)
            lx = x0 + (j % 2) * 190
            out.append(f'<rect x="{lx}" y="{ly - 8}" width="10" height="10" '
                       f'fill="{colours[j % len(colours)]}"/>')
            out.append(f'<text x="{lx + 14}" y="{ly + 1}">{esc(name)}</text>')
    out.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")
    return path


def add_common_args(ap) -> None:
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on the CPU (TRITON_INTERPRET=1), checked against float64")
    ap.add_argument("--out", default=None, help="JSON path")
    ap.add_argument("--plot", action="store_true", help="also draw a PNG next to the JSON")


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


# ------------------------------------------------------------------------------------------------
# decode inputs, float64 reference, timed baselines (decode and short-context benchmarks)
# ------------------------------------------------------------------------------------------------
def make_steps(N, H, HV, K, V, n, dev, in_dt, gen):
    """``n`` decode steps of random inputs ``(q [N, H, K], k [N, H, K], v [N, HV, V],
    g [N, HV], beta [N, HV])``; log-decays ``g`` in ``[-0.1, 0]``, ``beta`` in ``[0, 1)``."""
    out = []
    for _ in range(n):
        q = torch.randn(N, H, K, generator=gen, device=dev).to(in_dt)
        k = torch.randn(N, H, K, generator=gen, device=dev).to(in_dt)
        v = torch.randn(N, HV, V, generator=gen, device=dev).to(in_dt)
        g = -torch.rand(N, HV, generator=gen, device=dev) * 0.1
        b = torch.rand(N, HV, generator=gen, device=dev)
        out.append((q, k, v, g, b))
    return out


def reference_cycle(h0_fla, steps):
    """float64 outputs of the recurrence over the steps, from states ``[N, HV, K, V]``."""
    from vllm_kvbuffer.kernels import recurrent_gated_delta_rule
    S, outs = h0_fla.double(), []
    for (q, k, v, g, b) in steps:
        os_ = []
        for n in range(q.shape[0]):
            o, s = recurrent_gated_delta_rule(q[n:n + 1].double(), k[n:n + 1].double(),
                                              v[n:n + 1].double(), g[n:n + 1].double(),
                                              b[n:n + 1].double(), initial_state=S[n:n + 1])
            S[n] = s[0]
            os_.append(o[0])
        outs.append(torch.stack(os_))
    return outs


def bench_fla(N, H, HV, K, V, dev, in_dt, gen):
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_fr
    (q, k, v, g, b), = make_steps(N, H, HV, K, V, 1, dev, in_dt, gen)
    h0 = torch.randn(N, HV, K, V, generator=gen, device=dev) * 0.01

    def step():
        fla_fr(q[:, None], k[:, None], v[:, None], g=g[:, None], beta=b[:, None],
               initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    return time_ms(step, dev), None


def bench_stock(N, H, HV, K, V, sdt, dev, in_dt, gen, check):
    from benchmarks.baselines import recurrent_pool
    pool = N + 7
    state = (torch.randn(pool, HV, V, K, generator=gen, device=dev) * 0.05).to(sdt)
    slots = torch.randperm(pool, device=dev)[:N].to(torch.int32)
    steps = make_steps(N, H, HV, K, V, 3 if check else 1, dev, in_dt, gen)
    err = None
    if check:
        ref = reference_cycle(state[slots.long()].transpose(-1, -2), steps)
        err = max(rel_err(recurrent_pool(state, slots, slots[:, None], *(
            x[:, None] for x in st))[:, 0], r) for st, r in zip(steps, ref))
    q, k, v, g, b = (x[:, None] for x in steps[0])
    return time_ms(lambda: recurrent_pool(state, slots, slots[:, None], q, k, v, g, b), dev), err


def try_bench(fn, *a):
    """``fn(*a) + (None,)``, or ``(nan, None, error text)`` if it raises: one failing baseline
    (a missing wheel, a kernel the interpreter cannot run) leaves the rest of a sweep running."""
    try:
        return fn(*a) + (None,)
    except Exception as e:  # noqa: BLE001  (recorded in the row; the sweep goes on)
        return float("nan"), None, f"{type(e).__name__}: {e}"[:400]


# ------------------------------------------------------------------------------------------------
# CPU timing (bench_cpu): wall clock, the machine as the kernels see it
# ------------------------------------------------------------------------------------------------
def cpu_time_ms(fn, reps: int, warmup: int = 2, *, stats: dict | None = None) -> float:
    """Median wall-clock milliseconds of ``fn()`` over ``reps`` calls after ``warmup`` calls.
    ``stats`` (optional) receives ``min_ms`` too: on a shared machine whose other processes
    sometimes take every core, the minimum is the better estimate of the undisturbed time."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    if stats is not None:
        stats["min_ms"] = ts[0] * 1e3
    return ts[len(ts) // 2] * 1e3


def cpu_copy_bandwidth(nbytes: int, reps: int = 5) -> float:
    """Bytes read + written per second of ``torch.Tensor.copy_`` of ``nbytes`` (median), at
    torch's thread count. Larger than the last-level cache: memory; smaller: that cache."""
    a = torch.rand(nbytes // 4)
    b = torch.empty_like(a)
    ms = cpu_time_ms(lambda: b.copy_(a), reps, warmup=1)
    return 2 * nbytes / (ms * 1e-3)


def cpu_read_bandwidth(nbytes: int, reps: int = 5) -> float:
    """Bytes read per second of ``torch.Tensor.sum`` over ``nbytes`` (median) at torch's thread
    count: a read-only stream, what KVBuffer's decode mostly is (vLLM's reads and writes)."""
    a = torch.rand(nbytes // 4)
    ms = cpu_time_ms(lambda: a.sum(), reps, warmup=1)
    return nbytes / (ms * 1e-3)


def cpu_inplace_bandwidth(nbytes: int, reps: int = 5) -> float:
    """Bytes per second of updating ``nbytes`` in place (``mul_``: each line read, then written
    back), counting each byte once: what vLLM's decode does to a state. Its ratio to
    :func:`cpu_read_bandwidth` is what the write half costs on this machine (2 where reads and
    write-backs share one limit, near 1 where a core's read stream is the limit)."""
    a = torch.rand(nbytes // 4)
    ms = cpu_time_ms(lambda: a.mul_(1.0), reps, warmup=1)
    return nbytes / (ms * 1e-3)


def cpu_machine() -> dict:
    """CPU model, cores visible to this process, threads torch uses, last-level cache, load."""
    model = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    llc = None
    try:
        idx = sorted(pathlib.Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"))
        llc = (idx[-1] / "size").read_text().strip() if idx else None
    except OSError:
        pass
    return {"cpu": model, "cores_visible": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "last_level_cache": llc,
            "load_average_at_start": os.getloadavg()}
