"""The development stand-in for torchvision (vllm_kvbuffer.tools.torchvision_stub): found only
when no real torchvision exists, enough for transformers' and vLLM's Qwen3.5 imports, and its
resize close to PIL's. Imports run in fresh interpreters: the test process may hold either."""

import json
import pathlib
import subprocess
import sys

import pytest

from tests.utils import ROOT


def _python(code: str, *, pythonpath: str | None = None) -> dict:
    env = None
    if pythonpath is not None:
        import os
        env = dict(os.environ, PYTHONPATH=pythonpath)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=str(ROOT), env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


PROBE = """
import json, sys
import vllm_kvbuffer.tools.torchvision_stub as stub
stub.install()
if {first}:   # the worst place for it: first on sys.meta_path
    sys.meta_path.remove(next(f for f in sys.meta_path if isinstance(f, stub.StubFinder)))
    sys.meta_path.insert(0, stub.StubFinder())
import torchvision
print(json.dumps({{"file": torchvision.__file__, "stub": stub.is_stub(torchvision),
                  "real": getattr(torchvision, "REAL", False) is True}}))
"""


@pytest.mark.parametrize("first", [False, True])
def test_a_real_torchvision_wins(tmp_path, first):
    """A torchvision on the path (here a fake one, marked REAL) is always the one imported, even
    with the stand-in's finder moved to the front of sys.meta_path."""
    real = tmp_path / "torchvision"
    real.mkdir()
    (real / "__init__.py").write_text("REAL = True\n")
    got = _python(PROBE.format(first=first), pythonpath=str(tmp_path))
    assert got == {"file": str(real / "__init__.py"), "stub": False, "real": True}


def test_stand_in_is_found_without_a_real_torchvision():
    got = _python(PROBE.format(first=False))
    if not got["stub"]:
        pytest.skip(f"a real torchvision is installed here ({got['file']}): nothing to stand in")
    assert pathlib.Path(got["file"]).is_relative_to(ROOT / "vllm_kvbuffer" / "tools")


def test_dev_venv_installs_it_and_qwen3_5_imports():
    """The development setup's .pth installs the finder in every interpreter of the venv, so the
    module that made vLLM's Qwen3.5 unimportable (vLLM's qwen3_5 -> qwen3_vl -> transformers'
    Qwen2-VL image processor -> torchvision) imports; tests/plugin/test_models.py runs Qwen3.5 in
    the engine."""
    got = _python("""
import json, sys
from transformers.models.qwen2_vl import image_processing_qwen2_vl
import torchvision
from vllm_kvbuffer.tools.torchvision_stub import StubFinder
print(json.dumps({"finder_last": isinstance(sys.meta_path[-1], StubFinder),
                  "stub": getattr(torchvision, "__kvbuffer_stub__", False)}))
""")
    assert got["finder_last"] or not got["stub"], got


def test_resize_close_to_pil():
    """Bilinear antialiased resize of a uint8 image (down and up) within 1 level of PIL's, as
    torchvision's own; normalize, pad, crop, grayscale_to_rgb, to_tensor and to_pil_image as
    torchvision defines them."""
    got = _python("""
import json, numpy as np, torch
import vllm_kvbuffer.tools.torchvision_stub as stub
stub.install()
from PIL import Image
from torchvision.transforms.v2 import functional as F
a = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
im = Image.fromarray(a)
t = F.pil_to_tensor(im)
out = {"shape": list(t.shape), "diff": []}
for h, w in ((20, 30), (80, 100)):
    r = F.resize(t, [h, w], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    p = torch.from_numpy(np.array(im.resize((w, h), Image.BILINEAR))).permute(2, 0, 1)
    out["diff"].append(int((r.int() - p.int()).abs().max()))
    out["dtype"] = str(r.dtype)
x = torch.rand(3, 5, 7)
out["norm"] = bool(torch.equal(F.normalize(x, [0.5] * 3, [2.0] * 3), (x - 0.5) / 2.0))
pd = F.pad(x, [1, 2, 3, 4], fill=0)
out["pad"] = [list(pd.shape), bool(torch.equal(pd[:, 2:7, 1:8], x)), float(pd[:, 0].abs().sum())]
out["crop"] = bool(torch.equal(F.crop(x, 1, 2, 3, 4), x[:, 1:4, 2:6]))
out["gray"] = list(F.grayscale_to_rgb(torch.zeros(2, 1, 5, 7)).shape)
out["to_tensor"] = bool(torch.equal(F.to_tensor(im), t.float() / 255))
out["pil_round_trip"] = bool(torch.equal(F.pil_to_tensor(F.to_pil_image(t)), t))
from torchvision.transforms.functional import rotate   # a name the stand-in lacks
try:
    rotate(x, 90)
except NotImplementedError as e:
    out["missing"] = str(e)
print(json.dumps(out))
""")
    assert got["shape"] == [3, 37, 53] and got["dtype"] == "torch.uint8"
    assert max(got["diff"]) <= 1, got["diff"]
    assert got["norm"] and got["crop"]
    assert got["pad"] == [[3, 11, 11], True, 0.0]
    assert got["gray"] == [2, 3, 5, 7] and got["to_tensor"] and got["pil_round_trip"]
    # Names it does not implement import (modules import many they never call) and fail when
    # called, naming themselves.
    assert got["missing"].startswith("torchvision.transforms.functional.rotate: not available "
                                     "in the development stand-in for torchvision")
