"""The benchmarks' byte models against numbers worked out by hand.

Shape H=1, HV=2, K=V=4, N=2, fp32 state: s = 2*4*4*4 = 128 B; row = 1*4*2 + 2*4*4 + 2*4 = 48 B;
io per token per sequence = (2*1*4 + 2*2*4) * 2 + 2*2*4 = 64 B, so io = 128 B for N=2, T=1.
"""

import pytest
import torch

from benchmarks import common

SH = dict(N=2, H=1, HV=2, K=4, V=4)


def test_parts():
    assert common.state_bytes(2, 4, 4, torch.float32) == 128
    assert common.state_bytes(2, 4, 4, torch.bfloat16) == 64
    assert common.row_bytes(1, 2, 4, 4) == 48
    assert common.io_bytes(2, 1, 2, 4, 4) == 128
    assert common.io_bytes(2, 1, 2, 4, 4, T=3) == 384


def test_formulas():
    assert common.bytes_recurrent(**SH, state_dt=torch.float32) == 2 * 2 * 128 + 128  # 640
    # 2 (128 * 5/4 + 48 * 3/2 + 48) + 128 = 688
    assert common.bytes_kvbuffer(**SH, C=4, state_dt=torch.float32) == pytest.approx(688)
    assert common.bytes_replayssm(**SH, R=4, state_dt=torch.float32) == pytest.approx(688)
    assert common.bytes_short_context(**SH, L=3) == 2 * (3 * 48 + 48) + 128          # 512
    assert common.bytes_verify_per_draft(**SH, T=3, state_dt=torch.float32) == 1408  # 2*512+384
    # 2 (128 * (1 + 2/4) + 1.5 * 48 + 3 * 48) + 384 = 1200
    assert common.bytes_verify_kvbuffer(**SH, T=3, L=1.5, state_dt=torch.float32, C=4,
                                        accepted=2) == pytest.approx(1200)


def test_qwen3_next_row_and_ratio():
    H, HV, K, V = common.heads(1)
    assert common.row_bytes(H, HV, K, V) == 20608          # the 20.6 KB of benchmarks/NOTES.md
    assert common.heads(4) == (4, 8, 128, 128)
    r = (common.bytes_kvbuffer(128, H, HV, K, V, 16, torch.float32)
         / common.bytes_recurrent(128, H, HV, K, V, torch.float32))
    assert 0.55 < r < 0.59                                  # kvbuffer-math.md: about 0.56-0.58
