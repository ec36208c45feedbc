"""The client side of `benchmarks.serve_load`: the requests it sends (an image and a question,
streamed, greedy, one event per token), how many at once, and the video probe."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from pathlib import Path

import httpx2
import numpy as np
from PIL import Image

QUESTIONS = (
    "Describe this picture in detail.",
    "What colour is the largest object?",
    "Is there any text in the image? Read it.",
    "How many distinct shapes can you see?",
)


def picture_url(size: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 256, (size // 16 + 1, size // 16 + 1, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(smooth).resize((size, size), Image.BILINEAR).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def one_request(http: httpx2.AsyncClient, body: dict, arrivals: list | None = None) -> dict:
    """Send one streamed completion; its TTFT, latency, tokens and each token's arrival (also
    appended to `arrivals` as they come), or the error. With `logprobs` asked for, the server
    sends one event per token."""
    started = time.perf_counter()
    first = None
    usage, finish, error = None, None, None
    arrivals = [] if arrivals is None else arrivals  # seconds from `started`, one per token
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return {"error": f"HTTP {response.status_code}: {response.text[:300]}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                first = first or now
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"].get("message")
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices", ()):
                    finish = choice.get("finish_reason") or finish
                    if (choice.get("logprobs") or {}).get("content"):
                        arrivals.append(now - started)
    except (httpx2.HTTPError, json.JSONDecodeError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    if error or usage is None or first is None:
        return {"error": error or "the stream ended without usage"}
    return {
        "ttft_s": first - started,
        "latency_s": time.perf_counter() - started,
        "completion_tokens": usage["completion_tokens"],
        "prompt_tokens": usage["prompt_tokens"],
        "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
        "finish_reason": finish,
        "arrivals_s": arrivals,
    }


def request_body(index: int, images: list[str], max_tokens: int) -> dict:
    question = f"{QUESTIONS[index % len(QUESTIONS)]} (request {index})"
    content = [{"type": "image_url", "image_url": {"url": images[index % len(images)]}}]
    return chat_body([*content, {"type": "text", "text": question}], max_tokens)


def chat_body(content, max_tokens: int) -> dict:
    """A streamed, greedy chat completion with one event per token (log-probabilities on)."""
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def load(
    url: str, bodies: list[dict], concurrency: int, timeout: float
) -> tuple[list, float]:
    """Every body sent, `concurrency` at a time; (results in order, wall seconds)."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx2.Limits(max_connections=concurrency)
    async with httpx2.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:

        async def gated(body: dict) -> dict:
            async with gate:
                return await one_request(http, body)

        started = time.perf_counter()
        results = await asyncio.gather(*(gated(body) for body in bodies))
        return results, time.perf_counter() - started


def gaps(arrivals: list[float]) -> list[float]:
    """Seconds between consecutive tokens."""
    return np.diff(arrivals).tolist() if len(arrivals) > 1 else []


def video_frames(folder: Path, count: int, size: int) -> Path:
    """`count` smooth random frames of `size` x `size` as PNG files: a video the server reads."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for i in range(count):
        smooth = rng.integers(0, 256, (size // 16 + 1, size // 16 + 1, 3), dtype=np.uint8)
        frame = Image.fromarray(smooth).resize((size, size), Image.BILINEAR)
        frame.save(folder / f"frame{i:03d}.png")
    return folder


async def probe_run(url: str, frames: Path, running_tokens: int, timeout: float) -> dict:
    """A text answer runs; after its 8th token a video request arrives. The running answer's
    time between tokens before it arrived, while it was prefilled (until its first token), and
    the video's TTFT."""
    async with httpx2.AsyncClient(base_url=url, timeout=timeout) as http:
        text = chat_body("Tell me a long story about the sea.", running_tokens)
        times: list[float] = []
        running = asyncio.create_task(one_request(http, text, times))
        while len(times) < 8 and not running.done():
            await asyncio.sleep(0.002)
        sent = times[-1] if times else 0.0  # on the running request's clock
        video = [
            {"type": "video_url", "video_url": {"url": str(frames)}},
            {"type": "text", "text": "What happens in this video?"},
        ]
        other = await one_request(http, chat_body(video, 4))
        first = await running
    if "error" in first or "error" in other:
        return {"error": first.get("error") or other.get("error")}
    arrived = sent + other["ttft_s"]
    before = gaps([t for t in times if t <= sent])
    during = [b - a for a, b in zip(times, times[1:], strict=False) if b > sent and a < arrived]
    return {
        "running_tokens": first["completion_tokens"],
        "video_prompt_tokens": other["prompt_tokens"],
        "video_ttft_s": other["ttft_s"],
        "gap_before_p50_s": float(np.median(before)) if before else None,
        "gap_during_max_s": max(during) if during else None,
        "gaps_during": len(during),
        "gaps_during_s": during,  # in order: which units of the video's work stalled it
        "running_latency_s": first["latency_s"],
    }
