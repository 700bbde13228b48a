"""Render a decode benchmark JSON (benchmarks/bench_decode.py) as a markdown table.

Usage: python -m benchmarks.report benchmarks/results/h100-run2/decode.json [--tp 1] [--chunk 16]
"""

from __future__ import annotations

import argparse
import json

from benchmarks.common import ints


def table(res: dict, tp: int, chunks: list[int]) -> str:
    lines = [f"Card: {res['card']}; measured {res['date'][:10]}; copy bandwidth "
             f"{res['copy_bandwidth_Bps'] / 1e12:.2f} TB/s (read + write); "
             + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + f"; TP {tp} heads "
             f"(H={res['preset']['H'] // tp}, HV={res['preset']['HV'] // tp}, K=V=128).", "",
             "| state | batch | C | fla recurrent (us) | KVBuffer (us) | KVBuffer / fla | "
             "fla % of copy BW | KVBuffer % of copy BW |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if r["tp"] != tp or r["chunk_size"] not in chunks or "kvbuffer_ms" not in r:
            continue
        lines.append(f"| {r['state_dtype']} | {r['batch']} | {r['chunk_size']} | "
                     f"{r['fla_ms'] * 1e3:.1f} | {r['kvbuffer_ms'] * 1e3:.1f} | "
                     f"{r['ratio_vs_fla']:.2f} | {r['fla_bw_frac'] * 100:.0f} | "
                     f"{r['kvbuffer_bw_frac'] * 100:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--chunk", default="8,16")
    args = ap.parse_args()
    with open(args.json) as f:
        res = json.load(f)
    print(table(res, args.tp, ints(args.chunk)))


if __name__ == "__main__":
    main()
