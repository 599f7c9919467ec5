"""benchmarks/gpu_check.sh: its argument handling on any machine, and the CUDA checks it runs (``pytest -m cuda``;
they skip without a CUDA device)."""

import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")
BASH = shutil.which("bash") or "/bin/bash"
STEP_NAMES = ["env", "pytest-cuda", "txt2img", "attention", "unet", "vae", "train"]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run(*args, env=None, timeout=60):
    return subprocess.run([BASH, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


# -- the script's arguments (any machine) ---------------------------------------------------------------------------


def test_script_is_valid_bash():
    result = subprocess.run([BASH, "-n", SCRIPT], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_help_lists_every_step_and_the_exit_codes():
    result = _run("--help")
    assert result.returncode == 0
    for name in STEP_NAMES:
        assert f"  {name} " in result.stdout
    assert "77 no NVIDIA GPU" in result.stdout and "--dry-run" in result.stdout


def test_dry_run_lists_steps_and_commands_and_writes_nothing(tmp_path):
    out = tmp_path / "report.md"
    result = _run("--dry-run", "--out", str(out), "--python", "/opt/py/bin/python")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:-1:2]] == STEP_NAMES
    assert "/opt/py/bin/python benchmarks/gpu_check.py txt2img --device cuda" in result.stdout
    assert "-m pytest -q -m cuda tests/test_gpu_check.py" in result.stdout
    assert "lightning.precision=bf16-mixed" in result.stdout
    limits = [int(line.split()[1].rstrip("s")) for line in lines[1:-1:2]]
    assert sum(limits) <= 300 and f"report: {out}" in result.stdout
    assert not out.exists()


def test_unknown_argument_and_missing_value_exit_2():
    result = _run("--fast")
    assert result.returncode == 2 and "unknown argument '--fast'" in result.stderr
    result = _run("--out")
    assert result.returncode == 2 and "--out needs a file name" in result.stderr


def test_without_a_gpu_it_stops_at_once_with_one_clear_line(tmp_path):
    # No nvidia-smi on the PATH (and no GPU for torch): the machine every CPU run sees.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "head"):
        found = shutil.which(tool)
        if found:
            os.symlink(found, bin_dir / tool)
    start = time.perf_counter()
    result = _run(env={"PATH": str(bin_dir), "CUDA_VISIBLE_DEVICES": ""}, timeout=30)
    assert time.perf_counter() - start < 10
    assert result.returncode == 77
    message = result.stderr.strip()
    assert message.startswith("gpu_check: no NVIDIA GPU here") and "nothing checked" in message
    assert "\n" not in message and result.stdout == ""
    assert not list((tmp_path).glob("*.md"))


def test_torch_without_cuda_is_reported_when_nvidia_smi_lists_a_gpu(tmp_path):
    # a stand-in nvidia-smi that lists a GPU, with torch seeing none (CUDA_VISIBLE_DEVICES="")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA Test GPU'\n")
    fake.chmod(0o755)
    result = _run("--python", sys.executable, env={"PATH": f"{bin_dir}:{os.environ['PATH']}",
                                                   "CUDA_VISIBLE_DEVICES": ""}, timeout=60)
    assert result.returncode == 77
    assert "lists 'NVIDIA Test GPU' but torch sees no CUDA device" in result.stderr


def test_helper_names_and_image_checks():
    from benchmarks import gpu_check

    assert gpu_check.slug("NVIDIA H200") == "nvidia-h200"
    assert gpu_check.slug("NVIDIA GeForce RTX 4090 (24GB)") == "nvidia-geforce-rtx-4090-24gb"
    images = -torch.ones(3, 3, 8, 8)
    images[0, 0, 2:4, 2:4] = 1.0  # a red object: fine
    images[2, 1, 0, 0] = float("nan")
    problems = gpu_check.image_problems(images)
    assert problems == ["NaN/inf values", "black image(s) [1, 2]"]
    assert gpu_check.image_problems(images[:1]) == []
    assert gpu_check.relative_difference(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])) == 0.5


# -- the CUDA checks (pytest -m cuda) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_model():
    from ldm.assets import DEMO_CHECKPOINT
    from ldm.models.latent_diffusion import LatentDiffusion

    return LatentDiffusion.from_checkpoint(DEMO_CHECKPOINT).eval()


def _generate(model, device, precision="fp32", **spec):
    from ldm.generate import autocast_for, generate

    model.to(device)
    sampler = model.build_sampler({"name": "ddim", "num_steps": 10, **spec})
    return generate(model, ["a red circle", "a small blue square in the top left"], sampler, [0, 1],
                    guidance_scale=5.0, batch_size=2, progress=False, autocast=autocast_for(device, precision))


@pytest.mark.cuda
@needs_cuda
def test_cuda_txt2img_equals_the_cpu_images(demo_model):
    cpu = _generate(demo_model, "cpu")
    gpu = _generate(demo_model, "cuda")
    demo_model.to("cpu")
    assert (gpu - cpu).abs().mean() < 0.01, float((gpu - cpu).abs().mean())


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_autocast_images_are_finite_and_not_black(demo_model, precision):
    from benchmarks.gpu_check import image_problems

    images = _generate(demo_model, "cuda", precision)
    demo_model.to("cpu")
    assert image_problems(images) == []


@pytest.mark.cuda
@needs_cuda
def test_cuda_guidance_interval_and_rescale_run_on_the_gpu(demo_model):
    cpu = _generate(demo_model, "cpu", guidance_rescale=0.7, guidance_interval=[0.3, 5.0])
    gpu = _generate(demo_model, "cuda", guidance_rescale=0.7, guidance_interval=[0.3, 5.0])
    demo_model.to("cpu")
    assert (gpu - cpu).abs().mean() < 0.01


@pytest.mark.cuda
@needs_cuda
def test_cuda_attention_backends_agree_in_fp16():
    from ldm.modules.attention import _xformers, scaled_dot_product_attention

    q, k, v = (torch.randn(2, 8, 256, 40, device="cuda", dtype=torch.float16) for _ in range(3))
    reference = scaled_dot_product_attention(q.float(), k.float(), v.float(), backend="math")
    for backend in ["sdpa", "math"] + (["xformers"] if _xformers() is not None else []):
        out = scaled_dot_product_attention(q, k, v, backend=backend)
        torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-3)


@pytest.mark.cuda
@needs_cuda
def test_cuda_fid_features_equal_the_cpu_ones():
    from ldm.eval.fid import extract_features
    from tests.test_fid import tiny_features

    images = torch.rand(6, 3, 32, 32) * 2 - 1
    network = tiny_features()
    cpu = extract_features(network, images)
    gpu = extract_features(network.cuda(), images, device="cuda")
    torch.testing.assert_close(gpu, cpu, rtol=1e-2, atol=1e-3)  # cuDNN may convolve in TF32
