"""The official ``distrifuser.utils.PatchParallelismCommManager`` behind our displaced mode.

Needs the official profile (``pip install -r requirements_official_distrifusion.txt``), e.g.
``/work/venv-official/bin/python -m pytest tests/test_official_comm.py``; elsewhere the equivalence tests
skip and only the selection/error behaviour of a missing package is checked.
"""

from __future__ import annotations

import pytest
from parallel_harness import digest, rel_err, run_ranks, tiny_model
from test_displaced import check_stale_repeat
from wan_distrifusion.distrifusion.comm import official_status, resolve_comm_backend
from wan_distrifusion.wanvideo.errors import WanDistriFusionError

OFFICIAL_OK, OFFICIAL_DETAIL = official_status()
needs_official = pytest.mark.skipif(
    not OFFICIAL_OK,
    reason=f"official distrifuser package not importable here ({OFFICIAL_DETAIL}); install "
    "requirements_official_distrifusion.txt or run this file with the official-profile venv",
)


@pytest.mark.skipif(OFFICIAL_OK, reason="distrifuser imports here: the missing-package path cannot be exercised")
def test_missing_official_package_falls_back_or_explains():
    assert resolve_comm_backend("auto") == "builtin"
    assert resolve_comm_backend("builtin") == "builtin"
    with pytest.raises(WanDistriFusionError) as exc:
        resolve_comm_backend("official")
    text = str(exc.value)
    assert "comm backend" in text and "requirements_official_distrifusion.txt" in text and "builtin" in text


@needs_official
def test_auto_selects_official():
    assert resolve_comm_backend("auto") == "official"
    assert resolve_comm_backend("official") == "official"
    assert resolve_comm_backend("builtin") == "builtin"


def managers_agree(rank: int, world_size: int) -> dict:
    """Same registrations and enqueues into both managers: identical gathered buffers."""
    import torch
    from wan_distrifusion.distrifusion.comm import BuiltinCommManager, OfficialCommManager

    shapes = [(2, 3), (2, 3), (4,), (1, 5), (3,)]
    managers = [
        cls(group=None, group_rank=rank, group_size=world_size, device="cpu", comm_checkpoint=2)
        for cls in (BuiltinCommManager, OfficialCommManager)
    ]
    for manager in managers:
        for shape in shapes:
            manager.register_tensor(shape, torch.float32)
        manager.create_buffer()
    gen = torch.Generator().manual_seed(rank)
    sent = [torch.randn(shape, generator=gen) for shape in shapes]
    for manager in managers:
        for idx, tensor in enumerate(sent):
            manager.enqueue(idx, tensor)
        manager.flush()
    same = True
    for idx in range(len(shapes)):
        for manager in managers:
            manager.wait(idx)
        for a, b in zip(*(m.get_buffer_list(idx) for m in managers)):
            same &= torch.equal(a, b)
    mine = torch.full((1, 5), float(rank))
    for manager in managers:
        manager.gather_now(3, mine)
    same &= all(torch.equal(a, b) for a, b in zip(*(m.get_buffer_list(3) for m in managers)))
    for manager in managers:
        manager.clear()
    return {"same": same, "names": [m.name for m in managers]}


@needs_official
def test_official_and_builtin_managers_gather_the_same_buffers():
    for result in run_ranks("test_official_comm", "managers_agree", 3):
        assert result == {"same": True, "names": ["builtin", "official"]}


def backends_agree(rank: int, world_size: int) -> dict:
    """Displaced trajectories with changing inputs (stale steps) through both backends: identical outputs."""
    import torch
    from wan_distrifusion.distrifusion.config import ParallelConfig
    from wan_distrifusion.distrifusion.parallel_model import ParallelWan

    model = tiny_model(0, sharp=True)
    gen = torch.Generator().manual_seed(2)
    shape = (2, 4, 3, 14, 6)
    inputs = [(torch.randn(shape, generator=gen), torch.full((2,), 900.0 - 100 * s)) for s in range(6)]
    context = torch.randn(2, 6, 32, generator=gen)
    out = {}
    with torch.no_grad():
        for split, cfg_parallel, overlap in (("spatial", False, 16), ("spatiotemporal", world_size == 4, 0)):
            config = dict(
                world_size=world_size,
                split_mode=split,
                patch_size=16,
                patch_overlap=overlap,
                mode="displaced",
                cfg_parallel=cfg_parallel,
                warmup_steps=2,
            )
            for kv_dtype in ("auto", "fp8_e4m3fn"):
                runs = {}
                for backend in ("builtin", "official", "auto"):
                    runner = ParallelWan(
                        model, ParallelConfig(comm_backend=backend, kv_dtype=kv_dtype, **config), rank, "cpu"
                    )
                    runner.begin_job(runner.parallel_config.schedule(3))
                    outputs = [runner(x, t, context) for x, t in inputs]
                    runs[backend] = ([digest(o) for o in outputs], runner.comm_backend, runner.stats["stale_steps"])
                    exact = [model(x, t, context) for x, t in inputs]
                    runs[backend] += ([rel_err(o, e) for o, e in zip(outputs, exact)],)
                    runner.close()
                out[f"{split}/cfgp={cfg_parallel}/{kv_dtype}"] = runs
    return out


@needs_official
@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_official_backend_reproduces_builtin(world_size):
    per_rank = run_ranks("test_official_comm", "backends_agree", world_size)
    for key, runs in per_rank[0].items():
        assert runs["builtin"][1] == "builtin" and runs["official"][1] == "official" and runs["auto"][1] == "official"
        assert runs["builtin"][2] == runs["official"][2] >= 3, key
        assert runs["official"][0] == runs["builtin"][0] == runs["auto"][0], f"{key}: backends differ"
        if key.endswith("/auto"):  # fp8 buffers quantise even synchronous steps
            assert max(runs["official"][3][:2]) < 1e-5, f"{key}: warm-up not exact"
        assert max(runs["official"][3][2:]) > 1e-5, f"{key}: stale steps should differ from exact"
        for other in per_rank[1:]:
            assert other[key]["official"][0] == runs["official"][0], f"{key}: ranks disagree"


@needs_official
@pytest.mark.slow
@pytest.mark.parametrize("world_size", [3, 4])
def test_official_stale_steps_are_exact_when_nothing_changed(world_size):
    check_stale_repeat(run_ranks("test_displaced", "stale_repeat_checks", world_size, "official"), "official")
