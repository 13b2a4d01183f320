"""Real-ComfyUI fixtures: a base directory with our pack linked under a hyphenated folder name, tiny
models, a test-only node pack, and one ComfyUI server (``--cpu``, loopback) shared by the session.

Needs ``COMFYUI_PATH`` (the ComfyUI checkout) and ``COMFYUI_PYTHON`` (its venv's python); without them
every test here is skipped with one line saying so.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from comfy_harness import (
    COMFYUI_PATH,
    COMFYUI_PYTHON,
    PACK_FOLDER,
    RANDOM_VAE,
    REPO_ROOT,
    TEST_PACK_FOLDER,
    TINY_MODEL,
    TINY_MODEL_4_HEADS,
    load_by_path,
    random_vae,
    start_server,
    stop_server,
    write_tiny_loras,
)

HERE = Path(__file__).resolve().parent
SKIP_REASON = (
    "{count} real-ComfyUI and browser tests in tests/comfyui/ left out (this one skipped, the rest deselected): "
    "real ComfyUI not configured; set COMFYUI_PATH and COMFYUI_PYTHON "
    '(eval "$(../shared/tools/comfyui-setup.sh /tmp/comfyui)"), or run them all with `bash .ci/run`'
)

TINY_CONFIG = dict(
    dim=256, ffn_dim=256, num_heads=2, num_layers=2, in_dim=16, out_dim=16, text_dim=4096, freq_dim=256, image_dim=1280
)
"""Tiny, yet what ComfyUI's own Wan detection accepts (heads = dim / 128, text 4096, freq 256), so native
KSampler runs the same checkpoint; 2 heads, so a head-layout difference from native shows (and Ulysses splits
them over 2 ranks). The 4-head twin (head dim 64, heads in its metadata) serves Ulysses on 4 ranks."""


def pytest_collection_modifyitems(config, items):
    here = [item for item in items if Path(str(item.fspath)).resolve().is_relative_to(HERE)]
    for item in here:
        item.add_marker(pytest.mark.comfyui)
    if here and not (COMFYUI_PATH and COMFYUI_PYTHON):
        # One line in the summary: keep the first test as the skipped one, deselect the rest.
        here[0].add_marker(pytest.mark.skip(reason=SKIP_REASON.format(count=len(here))))
        rest = set(map(id, here[1:]))
        config.hook.pytest_deselected(items=here[1:])
        items[:] = [item for item in items if id(item) not in rest]


def write_tiny_model(path: Path, **overrides) -> None:
    from tiny_wan import random_model, tiny_config, write_checkpoint

    config = tiny_config(**{**TINY_CONFIG, **overrides})
    write_checkpoint(path, random_model(config, seed=1), layout="original", dtype=torch.float32)


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("comfy-base")
    for folder in (
        "custom_nodes",
        "models/diffusion_models",
        "models/vae",
        "models/loras",
        "input",
        "output",
        "user",
        "temp",
    ):
        (base / folder).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(REPO_ROOT, target_is_directory=True)
    (base / "custom_nodes" / TEST_PACK_FOLDER).symlink_to(HERE / "test_pack", target_is_directory=True)
    write_tiny_model(base / "models" / "diffusion_models" / TINY_MODEL)
    write_tiny_model(base / "models" / "diffusion_models" / TINY_MODEL_4_HEADS, num_heads=4)
    write_tiny_loras(base / "models" / "loras", TINY_CONFIG)
    cache = Path(tempfile.gettempdir()) / "wan-distrifusion-test-cache"
    random_vae(COMFYUI_PYTHON, COMFYUI_PATH, base / "models" / "vae" / RANDOM_VAE, cache)
    return base


@pytest.fixture(scope="session")
def comfy(comfy_base):
    """The running server; skip the tutorial dialog for browser tests."""
    server = start_server(COMFYUI_PYTHON, COMFYUI_PATH, comfy_base)
    try:
        server.post("/api/settings/Comfy.TutorialCompleted", True)
        yield server
    finally:
        stop_server(server)


@pytest.fixture(scope="session")
def wan21_format():
    """ComfyUI's own ``Wan21`` latent format (process_in / process_out), loaded from the checkout."""
    return load_by_path("comfy_latent_formats", Path(COMFYUI_PATH) / "comfy" / "latent_formats.py").Wan21()
