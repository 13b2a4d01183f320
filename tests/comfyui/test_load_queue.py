"""Load through ComfyUI's queue: 20 prompts (2 CPU ranks, tiny Wan, 2 steps) back to back on the shared server.
After a warm-up the server's process tree, its threads, the open file descriptors of the server and its
workers, and their memory must not grow; the workers are the same processes throughout. Memory is read after each
half of the prompts: a leak grows both halves, while a one-time step (an allocator arena opened under load) grows
one, so the smaller half's growth is the one held to the limit.
"""

from __future__ import annotations

import time

import psutil
from comfy_harness import TWO_RANKS, base_prompt, loader_inputs, sampler_inputs

PROMPTS = 20
WARMUP = 3
RSS_GROWTH_BYTES = 24 << 20
"""Per process and half (10 prompts): ComfyUI keeps every prompt's history (outputs, status messages) in memory, a
little per prompt; a leak of 2.4 MiB per prompt fails."""
FD_GROWTH = 2
"""ComfyUI's own sockets (HTTP keep-alive, the websocket) come and go."""


def _tree(comfy) -> dict:
    server = psutil.Process(comfy.process.pid)
    children = [p for p in server.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    return {
        "pids": sorted(p.pid for p in children),
        "threads": server.num_threads(),
        "fds": [server.num_fds()] + [p.num_fds() for p in children],
        "rss": [server.memory_info().rss] + [p.memory_info().rss for p in children],
    }


def test_twenty_prompts_through_the_queue_do_not_grow_the_server(comfy):
    def prompt(seed: int) -> dict:
        return base_prompt(loader_inputs(**TWO_RANKS), sampler_inputs(steps=2, seed=1000 + seed), prefix="load/latent")

    for seed in range(WARMUP):
        comfy.run(prompt(seed))
    ranks = comfy.get("/distrifusion/status").json()["runtime"]["pids"]
    before = _tree(comfy)
    began = time.monotonic()
    for seed in range(WARMUP, WARMUP + PROMPTS // 2):
        comfy.run(prompt(seed))
    middle = _tree(comfy)
    for seed in range(WARMUP + PROMPTS // 2, WARMUP + PROMPTS):
        comfy.run(prompt(seed))
    per_prompt = (time.monotonic() - began) / PROMPTS
    after = _tree(comfy)
    print(
        f"\n{PROMPTS} prompts, {per_prompt:.2f} s each: processes {before['pids']} -> {after['pids']}, server threads "
        f"{before['threads']} -> {after['threads']}, fds {before['fds']} -> {after['fds']}, RSS MiB "
        f"{[r >> 20 for r in before['rss']]} -> {[r >> 20 for r in middle['rss']]} -> {[r >> 20 for r in after['rss']]}"
    )
    assert comfy.get("/distrifusion/status").json()["runtime"]["pids"] == ranks
    assert after["pids"] == before["pids"] and set(ranks) <= set(after["pids"])
    assert after["threads"] <= before["threads"] + 1, (before["threads"], after["threads"])
    assert all(a - b <= FD_GROWTH for a, b in zip(after["fds"], before["fds"])), (before["fds"], after["fds"])
    halves = [(m - b, a - m) for b, m, a in zip(before["rss"], middle["rss"], after["rss"])]
    growth = [min(first, second) for first, second in halves]
    assert max(growth) < RSS_GROWTH_BYTES, f"RSS grew by {[(f >> 20, s >> 20) for f, s in halves]} MiB per half"
