"""``cli.py generate --lora FILE[:STRENGTH]``: a chain merged on every rank, and bad LoRAs refused before anything starts."""

from __future__ import annotations

import re

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_cli import SETTINGS, flags, in_process, run_cli
from tiny_lora import random_lora, reference_merge, write_lora
from tiny_wan import random_model, relative_error, tiny_config, write_checkpoint

pytestmark = pytest.mark.slow
CONFIG = tiny_config()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import torch

    folder = tmp_path_factory.mktemp("cli_lora")
    model = random_model(CONFIG, seed=4)
    checkpoint = write_checkpoint(folder / "tiny.safetensors", model)
    first, second = random_lora(CONFIG, seed=1), random_lora(CONFIG, seed=2, with_diffs=True)
    write_lora(folder / "a.safetensors", first, "kohya")
    write_lora(folder / "b.safetensors", second, "lightx2v")
    merged = reference_merge(reference_merge(model.state_dict(), first, 0.7), second, 1.0)
    merged_checkpoint = write_checkpoint(folder / "merged.safetensors", merged, config=CONFIG)
    generator = torch.Generator().manual_seed(2)
    context = {
        "positive": torch.randn(1, 6, 32, generator=generator),
        "negative": torch.randn(1, 6, 32, generator=generator),
    }
    save_file(context, str(folder / "context.safetensors"))
    return folder, checkpoint, merged_checkpoint, context


def test_lora_chain_at_world_size_two_equals_the_directly_merged_checkpoint(files, tmp_path):
    folder, checkpoint, merged, context = files
    out = tmp_path / "latent.safetensors"
    result = run_cli(
        "generate", "--model", str(checkpoint), "--context", str(folder / "context.safetensors"), *flags(SETTINGS),
        "--lora", f"{folder / 'a.safetensors'}:0.7", "--lora", str(folder / "b.safetensors"),
        "--world-size", "2", "--mode", "sync", "--patch-size", "16", "--device", "cpu", "--out", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    error = relative_error(load_file(str(out))["latent"], in_process(merged, context))
    assert error < 1e-5, error
    with safe_open(str(out), "pt") as handle:
        assert (
            '"loras": [{"file": "a.safetensors", "strength": 0.7}, {"file": "b.safetensors", "strength": 1.0}]'
            in (handle.metadata()["settings"])
        )


def test_bad_loras_exit_before_anything_starts(files, tmp_path):
    folder, checkpoint, _, _ = files
    write_lora(folder / "wide.safetensors", random_lora(tiny_config(dim=128, ffn_dim=128), seed=3), "comfyui")
    cases = [
        ([str(folder / "missing.safetensors")], "error: lora: --lora .*missing.safetensors: .* does not exist"),
        ([f"{folder / 'a.safetensors'}:nan"], "error: lora: --lora .*a.safetensors:nan: nan .* not a finite number"),
        ([str(folder / "wide.safetensors")], "error: lora: wide.safetensors does not fit this model: .*width 64"),
    ]
    for lora, expected in cases:
        out = tmp_path / "x.safetensors"
        result = run_cli(
            "generate", "--model", str(checkpoint), "--device", "cpu", "--lora", *lora, "--out", str(out),
            cwd=tmp_path, timeout=60,
        )  # fmt: skip
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert re.match(expected, lines[0]), lines[0]
        assert "starting" not in result.stdout and not out.exists()
