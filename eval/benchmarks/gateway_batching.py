"""Requests/s through the gateway with the dynamic batcher against serialised generation, side by side in one run.

    OMP_NUM_THREADS=1 distill-guard bench batching [--clients 16] [--requests 128] [--rounds 3]

The reference teacher behind the real gateway (uvicorn on loopback, in this process), asked by `clients`
concurrent clients (the `openai` SDK, async) for greedy completions of the lab's held-out prompts. Two gateways
differ only in `max_batch`: the batcher's (`window` seconds to gather a batch) and 1, which serialises the
requests as the global lock did. Rounds alternate (A B A B ...), so load from other jobs falls on both; the
result is each side's median requests/s and the median of each round's paired ratio. Every batched answer is
checked against the serialised one, as greedy text should not depend on the batch.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import openai
import torch

from eval.benchmarks import write_result
from eval.reference import load_teacher
from eval.reference.world import reference_task
from guard.gateway.app import create_app, serve_in_thread


async def ask(url: str, prompts: list[str], clients: int) -> tuple[list[str], float]:
    """Each prompt's greedy text, asked by `clients` concurrent clients, and the seconds it took."""
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    queue = asyncio.Queue()
    for i, prompt in enumerate(prompts):
        queue.put_nowait((i, prompt))
    texts = [""] * len(prompts)

    async def one_client():
        while not queue.empty():
            i, prompt = queue.get_nowait()
            response = await client.completions.create(model="teacher", prompt=prompt, temperature=0)
            texts[i] = response.choices[0].text

    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    seconds = time.perf_counter() - start
    await client.close()
    return texts, seconds


def main(clients: int = 16, requests: int = 128, rounds: int = 3, window: float = 0.0,
         max_batch: int = 16) -> dict:
    teacher = load_teacher("reference")
    prompts = [item.prompt for item in reference_task().eval_items[:requests]]
    sides = {"batched": max_batch, "serialised": 1}
    rates: dict[str, list[float]] = {side: [] for side in sides}
    mismatches = 0
    with serve_in_thread(create_app(lambda: teacher, "teacher", batch_window=window, max_batch=max_batch)) as batched, \
            serve_in_thread(create_app(lambda: teacher, "teacher", batch_window=window, max_batch=1)) as serialised:
        batched, serialised = batched + "/v1", serialised + "/v1"
        asyncio.run(ask(batched, prompts[:clients], clients))  # warm-up
        for _ in range(rounds):
            texts = {}
            for side, url in (("batched", batched), ("serialised", serialised)):
                texts[side], seconds = asyncio.run(ask(url, prompts, clients))
                rates[side].append(len(prompts) / seconds)
            mismatches += sum(a != b for a, b in zip(texts["batched"], texts["serialised"]))
    results = {
        "clients": clients, "requests_per_round": len(prompts), "rounds": rounds, "window_s": window,
        "max_batch": max_batch,
        **{f"{side}_requests_per_s": float(np.median(r)) for side, r in rates.items()},
        "speedup": float(np.median(np.array(rates["batched"]) / np.array(rates["serialised"]))),
        "rounds_requests_per_s": rates,
        "greedy_mismatches": mismatches, "greedy_compared": rounds * len(prompts),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(results, indent=2))
    print("wrote", write_result("gateway_batching", results))
    return results
