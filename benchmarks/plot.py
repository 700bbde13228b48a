"""Draw the PNG of saved benchmark JSON files (when the run had no matplotlib).

Usage: python -m benchmarks.plot results/decode.json results/verify.json ...
"""

from __future__ import annotations

import json
import pathlib
import sys

from benchmarks import common

SPECS = {
    "decode": dict(x="batch", series={"fla": "fla_ms", "ReplaySSM (SGLang)": "replayssm_ms",
                                      "stock (ours)": "stock_ms", "KVBuffer": "kvbuffer_ms"},
                   title="GDN decode per step", group=("tp", "state_dtype", "chunk_size")),
    "short_context": dict(x="batch", series={"fla (state)": "fla_ms", "stock (state)": "stock_ms",
                                             "KVBuffer (no state)": "kvbuffer_ms"},
                          title="Short-context decode step", group=("tp", "buffered_tokens")),
    "verify": dict(x="batch", series={"per-draft states": "per_draft_ms",
                                      "KVBuffer verify+accept": "kvbuffer_ms"},
                   title="Speculative verify step", group=("tp", "state_dtype", "drafts")),
    "layer_stack": dict(x="batch", series={"stock recurrent": "stock_ms",
                                           "KVBuffer": "kvbuffer_ms"},
                        title="GDN layer stack, one decode step", group=("state_dtype",)),
}


def main(paths):
    for p in map(pathlib.Path, paths):
        res = json.loads(p.read_text())
        spec = SPECS.get(res.get("benchmark"))
        if spec is None:
            print(f"{p}: not a benchmark JSON this script knows", file=sys.stderr)
            continue
        common.plot(res, p.with_suffix(".png"), **spec)


if __name__ == "__main__":
    main(sys.argv[1:])
