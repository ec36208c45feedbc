"""The server's generation thread on a stand-in pool: order, cancellation, time limits, errors.

The stand-in yields one response per decode step (a few milliseconds each) and records how many
it produced and whether it was closed, so "stops within one decode step" can be counted.
"""

from __future__ import annotations

import asyncio
import time

import mlx.core as mx
import pytest
from test_generate import write_model_folder
from tiny_tokenizer import CHAT_TEMPLATE

import mimo_mlx
from mimo_mlx.conversation.pool import ConversationPool
from mimo_mlx.errors import ContextFull
from mimo_mlx.generation.loop import GenerationResponse
from mimo_mlx.serve.engine import Engine
from mimo_mlx.serve.events import Delta, Failed, Finished, Job, Started
from mimo_mlx.serve.requests import APIError

STEP_S = 0.005
EOS = 0


class Tokenizer:
    eos_token_ids = frozenset({EOS})

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


class Pool:
    """Answers "w1 w2 ..." to any prompt; messages[0]['content'] may ask for a failure."""

    opens_thinking = False
    notices = ()
    nbytes = 0

    def __init__(self) -> None:
        self.produced: dict[str, int] = {}
        self.closed: set[str] = set()
        self.order: list[str] = []

    def __len__(self) -> int:
        return 0

    def stats(self) -> dict:
        return {"conversations": 0, "bytes": 0}

    def stream(self, messages, max_tokens, **options):
        name = messages[0]["content"]
        self.order.append(name)
        if name == "too long":
            raise ContextFull("the conversation is 5000 tokens ... /reset", tokens=5000, limit=4096)
        if name == "bug":
            raise RuntimeError("a bug")
        self.produced[name] = 0
        try:
            for n in range(1, max_tokens + 1):
                time.sleep(STEP_S)
                self.produced[name] = n
                yield _response(f" w{n}", n, 10, "length" if n == max_tokens else None)
        finally:
            self.closed.add(name)


def _response(text, n, prompt, finish):
    return GenerationResponse(
        text=text,
        token=n,
        logprobs=mx.zeros(4),
        from_draft=False,
        prompt_tokens=prompt,
        prompt_tps=100.0,
        generation_tokens=n,
        generation_tps=50.0,
        peak_memory=0.5,
        time_to_first_token=0.1,
        finish_reason=finish,
        cached_tokens=4,
    )


@pytest.fixture
def engine():
    engine = Engine(Pool(), Tokenizer(), queue_size=2)
    engine.start()
    yield engine
    engine.close()


def job(name, max_tokens=5, timeout=30.0, greedy=False, **kwargs) -> Job:
    """A job asking `name`; `greedy`: at temperature 0, to compare with a solo greedy answer."""
    return Job(
        id=name,
        messages=[{"role": "user", "content": name}],
        options={"max_tokens": max_tokens, **({"temp": 0.0} if greedy else {})},
        deadline=time.monotonic() + timeout,
        loop=asyncio.get_running_loop(),
        **kwargs,
    )


async def events(job: Job) -> list:
    found = []
    while not found or not isinstance(found[-1], Finished | Failed):
        found.append(await asyncio.wait_for(job.events.get(), 10))
    return found


def run(coroutine):
    return asyncio.run(coroutine())


def run_started(engine: Engine, coroutine):
    """`run(coroutine)` with `engine`'s generation thread started, and closed afterwards whatever
    happens (for the tests that make their own engine)."""
    engine.start()
    try:
        return run(coroutine)
    finally:
        engine.close()


def test_a_job_streams_started_deltas_and_finished(engine):
    async def main():
        first = job("a", max_tokens=3, stop=("w3",))
        engine.submit(first)
        return await events(first)

    found = run(main)
    assert isinstance(found[0], Started) and found[0].prompt_tokens == 10
    assert "".join(e.content for e in found if isinstance(e, Delta)) == "w1 w2"
    finished = found[-1]
    assert finished.finish_reason == "stop"  # the stop sequence, not max_tokens
    assert finished.usage["prompt_tokens_details"] == {"cached_tokens": 4}
    assert finished.timings["prompt_n"] == 6 and finished.timings["cache_n"] == 4
    assert engine.stats()["requests"]["completed"] == 1 and engine.peak_memory == 0.5


def test_jobs_run_one_at_a_time_in_order_of_arrival(engine):
    async def main():
        jobs = [job(name, max_tokens=4) for name in "abc"]
        engine.submit(jobs[0])
        started = await jobs[0].events.get()  # a left the queue: room for two
        engine.submit(jobs[1])
        engine.submit(jobs[2])
        return [[started, *await events(jobs[0])]] + [await events(each) for each in jobs[1:]]

    results = run(main)
    assert engine.pool.order == ["a", "b", "c"]
    assert all(found[-1].finish_reason == "length" for found in results)


def test_a_full_queue_refuses_at_once(engine):
    async def main():
        running = job("running", max_tokens=1000)
        engine.submit(running)
        await running.events.get()  # Started: it left the queue
        engine.submit(job("w1"))
        engine.submit(job("w2"))
        started = time.monotonic()
        with pytest.raises(APIError) as caught:
            engine.submit(job("w3"))
        assert time.monotonic() - started < 0.1
        engine.cancel(running)
        return caught.value

    error = run(main)
    assert error.status == 503 and error.code == "server_overloaded"
    assert "generates 1 at once and queues 2 more" in error.message and "--" not in error.message
    assert engine.stats()["requests"]["rejected"] == 1


def test_a_place_is_reserved_before_the_request_is_read(engine):
    """A request takes its place as soon as it is parsed; while it reads its media, the queue
    counts it, and a request beyond the places left is refused at once. Places given back are
    free again; a place is used once."""

    async def main():
        running = job("running", max_tokens=1000)
        engine.submit(running)
        await running.events.get()
        first, second = engine.reserve(), engine.reserve()
        assert engine.stats()["queue"]["reading"] == 2
        with pytest.raises(APIError) as caught:
            engine.reserve()
        engine.release(second)
        engine.release(second)  # twice: no effect
        engine.submit(job("w1"), first)
        with pytest.raises(ValueError):
            engine.submit(job("w2"), first)
        queue = engine.stats()["queue"]
        engine.cancel(running)
        return caught.value, queue

    error, queue = run(main)
    assert error.status == 503 and engine.stats()["requests"]["rejected"] == 1
    assert queue["reading"] == 0 and queue["waiting"] == 1


def test_cancelling_stops_generation_within_one_step(engine):
    async def main():
        running = job("long", max_tokens=10_000)
        engine.submit(running)
        await running.events.get()
        await asyncio.sleep(20 * STEP_S)
        at_cancel = engine.pool.produced["long"]
        engine.cancel(running)
        for _ in range(200):
            if "long" in engine.pool.closed:
                break
            await asyncio.sleep(STEP_S)
        return at_cancel

    at_cancel = run(main)
    assert "long" in engine.pool.closed  # the generator was closed: the pool keeps the answer
    assert engine.pool.produced["long"] <= at_cancel + 1
    assert engine.stats()["requests"]["cancelled"] == 1


def test_a_waiting_job_that_is_cancelled_or_expires_never_runs(engine):
    async def main():
        running = job("running", max_tokens=1000)
        engine.submit(running)
        await running.events.get()
        gone, late = job("gone"), job("late")
        engine.submit(gone)
        engine.submit(late)
        engine.cancel(gone)
        assert engine.expire(late) and not engine.expire(running)
        engine.cancel(running)
        done = job("next", max_tokens=2)
        engine.submit(done)
        return await events(done)

    found = run(main)
    assert found[-1].finish_reason == "length"
    assert engine.pool.order == ["running", "next"]
    counts = engine.stats()["requests"]
    assert counts["cancelled"] == 2 and counts["timed_out"] == 1


def test_the_time_limit_ends_generation_with_length(engine):
    async def main():
        limited = job("limited", max_tokens=100_000, timeout=0.3)
        engine.submit(limited)
        return await events(limited)

    started = time.monotonic()
    found = run(main)
    assert time.monotonic() - started < 2
    assert found[-1].finish_reason == "length" and found[-1].usage["completion_tokens"] < 1000
    assert engine.stats()["requests"]["timed_out"] == 1


def test_errors_are_answered_and_the_thread_goes_on(engine):
    async def main():
        found = []
        for each in (job("too long"), job("bug"), job("fine", max_tokens=2)):
            engine.submit(each)
            found.append(await events(each))
        return found

    too_long, bug, fine = run(main)
    assert too_long[-1].error.status == 400
    assert too_long[-1].error.code == "context_length_exceeded"
    assert (
        "5000 tokens" in too_long[-1].error.message and "/reset" not in too_long[-1].error.message
    )
    assert bug[-1].error.status == 500 and "a bug" not in bug[-1].error.message
    assert fine[-1].finish_reason == "length"
    counts = engine.stats()["requests"]
    assert counts["invalid"] == 1 and counts["failed"] == 1 and counts["completed"] == 1


def test_closing_answers_every_job_left(engine):
    async def main():
        running, waiting = job("running", max_tokens=100_000), job("waiting")
        engine.submit(running)
        engine.submit(waiting)
        await running.events.get()
        await asyncio.get_running_loop().run_in_executor(None, engine.close)
        return await events(running), await events(waiting)

    running, waiting = run(main)
    assert running[-1].error.code == waiting[-1].error.code == "shutting_down"
    with pytest.raises(APIError):
        engine.submit(Job("x", [], {}, 0.0, None))


def test_a_template_that_opens_thinking_puts_the_answer_in_reasoning(tmp_path):
    """On the real pool: the running turn's <think> reaches the split, as `generate` does it."""
    folder = write_model_folder(tmp_path / "model", seed=21)
    opened = CHAT_TEMPLATE.replace(
        "<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}"
    )
    (folder / "chat_template.jinja").write_text(opened)
    model, processor = mimo_mlx.load(folder)
    expected = mimo_mlx.generate(model, processor, "Hello", max_tokens=12, temp=0.0)
    assert expected.inputs.opens_thinking and expected.thinking and not expected.answer
    engine = Engine(ConversationPool(model, processor), processor.tokenizer, queue_size=1)

    async def main():
        asked = job("Hello", max_tokens=12, greedy=True)
        engine.submit(asked)
        return await events(asked)

    found = run_started(engine, main)
    deltas = [e for e in found if isinstance(e, Delta)]
    assert "".join(d.reasoning for d in deltas) == expected.thinking
    assert "".join(d.content for d in deltas) == expected.answer == ""


def test_a_cancelled_job_leaves_the_batch_within_a_step_and_the_other_goes_on(tmp_path):
    """On the real pool, two jobs batched (--max-batch 2): one is cancelled mid-answer. Its
    conversation goes back to the pool holding at most the tokens it was sent plus the step in
    flight, the batch runs the other alone at once, and the other's answer is its solo answer."""
    model, processor = mimo_mlx.load(write_model_folder(tmp_path / "model", seed=21))
    expected = mimo_mlx.generate(model, processor, "Count to ten.", max_tokens=60, temp=0.0)
    pool = ConversationPool(model, processor)
    engine = Engine(pool, processor.tokenizer, queue_size=1, max_batch=2)

    async def main():
        leaving = job("Tell me a long story.", max_tokens=2000, greedy=True, top_logprobs=0)
        staying = job("Count to ten.", max_tokens=60, greedy=True)
        for each in (leaving, staying):
            engine.submit(each)
        sent = 0
        while sent < 10:  # every token has a delta: its log-probability
            event = await asyncio.wait_for(leaving.events.get(), 30)
            sent += isinstance(event, Delta)
        engine.cancel(leaving)
        rest = await events(staying)
        return sent, rest

    sent, rest = run_started(engine, main)
    stats = engine.stats()
    assert stats["requests"]["cancelled"] == 1 and stats["queue"]["running"] == 0
    story = next(c for c in pool._entries if "story" in str(c.messages[0]))
    answered = len(story._tokens) - story.answer_start
    # Sent, plus the token the step in flight fed and the one it drew (not sent), at most.
    assert sent <= answered <= sent + 2
    assert "".join(e.content for e in rest if isinstance(e, Delta)) == expected.answer


def _slow_down_preparation(processor, seconds: float = 1.0) -> list[float]:
    """Make preparing a request that mentions "slow" take `seconds` longer (as decoding a long
    video's frames may); returns the list its start and end times are appended to."""
    preparing: list[float] = []
    prepare_messages = processor.prepare_messages

    def slow_prepare(messages, **options):
        if "slow" not in str(messages):
            return prepare_messages(messages, **options)
        preparing.append(time.perf_counter())
        time.sleep(seconds)
        try:
            return prepare_messages(messages, **options)
        finally:
            preparing.append(time.perf_counter())

    processor.prepare_messages = slow_prepare
    return preparing


def test_a_request_whose_media_take_long_to_prepare_does_not_stall_the_batch(tmp_path):
    """On the real pool (--max-batch 2): a request's chat template and media preparation (here
    made to take a second, as decoding a long video's frames may) runs beside the batch, so the
    running answer keeps getting tokens meanwhile; both answers are their solo answers."""
    model, processor = mimo_mlx.load(write_model_folder(tmp_path / "model", seed=21))
    expected = {
        prompt: mimo_mlx.generate(model, processor, prompt, max_tokens=tokens, temp=0.0).answer
        for prompt, tokens in (("Tell me a long story.", 300), ("A slow one.", 8))
    }
    preparing = _slow_down_preparation(processor)
    engine = Engine(ConversationPool(model, processor), processor.tokenizer, 1, max_batch=2)

    async def main():
        running = job("Tell me a long story.", max_tokens=300, greedy=True, top_logprobs=0)
        slow = job("A slow one.", max_tokens=8, greedy=True)
        engine.submit(running)
        arrived, found = [], []
        while not found or not isinstance(found[-1], Finished | Failed):
            found.append(await asyncio.wait_for(running.events.get(), 30))
            arrived.append(time.perf_counter())
            if len(found) == 5:  # the answer runs: the slow request arrives
                engine.submit(slow)
        return arrived, found, await events(slow)

    arrived, found, other = run_started(engine, main)
    start, end = preparing
    assert end - start >= 1.0
    during = [t for t in arrived if start < t < end]
    assert len(during) >= 3, f"{len(during)} tokens of the running answer while the other prepared"
    answers = [
        "".join(e.content for e in events if isinstance(e, Delta)) for events in (found, other)
    ]
    assert answers == list(expected.values())


def test_a_request_that_leaves_while_its_media_are_prepared_frees_its_place_at_once(tmp_path):
    """(--max-batch 2) A client goes away while its request's media take a second to prepare:
    the request is counted cancelled and its place is free at once, not when the preparation
    ends; the next request is answered as it would be alone."""
    model, processor = mimo_mlx.load(write_model_folder(tmp_path / "model", seed=21))
    expected = mimo_mlx.generate(model, processor, "Hello", max_tokens=8, temp=0.0).answer
    _slow_down_preparation(processor)
    engine = Engine(ConversationPool(model, processor), processor.tokenizer, 1, max_batch=2)

    async def main():
        slow = job("A slow one.", max_tokens=8)
        engine.submit(slow)
        await asyncio.sleep(0.2)  # its preparation has begun
        assert engine.stats()["queue"]["running"] == 1
        left = time.perf_counter()
        engine.cancel(slow)
        while engine.stats()["requests"]["cancelled"] == 0:
            await asyncio.sleep(0.01)
        freed = time.perf_counter() - left
        assert engine.stats()["queue"]["running"] == 0
        after = job("Hello", max_tokens=8, greedy=True)
        engine.submit(after)
        return freed, await events(after)

    freed, found = run_started(engine, main)
    assert freed < 0.5, f"the place was freed {freed:.2f} s after the client left"
    assert "".join(e.content for e in found if isinstance(e, Delta)) == expected


def test_a_request_is_prepared_as_soon_as_it_has_a_place_not_when_the_step_ends(
    tmp_path, monkeypatch
):
    """(--max-batch 2) A request that arrives while a decode step runs (each made to last half a
    second here) has its turn prepared at once, beside that step, so it can start at the next
    step rather than one later; its answer is its solo answer."""
    from mimo_mlx.generation.batch import BatchGenerator  # noqa: PLC0415

    step_s = 0.5
    model, processor = mimo_mlx.load(write_model_folder(tmp_path / "model", seed=21))
    expected = mimo_mlx.generate(model, processor, "A slow one.", max_tokens=8, temp=0.0).answer
    preparing = _slow_down_preparation(processor, seconds=0.0)  # when it began and ended
    steps: list[tuple[float, float]] = []
    step = BatchGenerator.next

    def slow_step(self):
        began = time.perf_counter()
        time.sleep(step_s)
        try:
            return step(self)
        finally:
            steps.append((began, time.perf_counter()))

    monkeypatch.setattr(BatchGenerator, "next", slow_step)
    engine = Engine(ConversationPool(model, processor), processor.tokenizer, 1, max_batch=2)

    async def main():
        running = job("Tell me a long story.", max_tokens=20, greedy=True, top_logprobs=0)
        engine.submit(running)
        for _ in range(2):  # Started, then a token: the next step is running now
            await asyncio.wait_for(running.events.get(), 30)
        arrived = time.perf_counter()
        second = job("A slow one.", max_tokens=8, greedy=True)
        engine.submit(second)
        return arrived, await events(second)

    arrived, found = run_started(engine, main)
    began = preparing[0]
    assert began - arrived < step_s / 2, f"prepared {began - arrived:.2f} s after it arrived"
    # Before the step it arrived in (or between, the one after) had ended.
    assert began < next(end for _, end in steps if end > arrived)
    assert "".join(e.content for e in found if isinstance(e, Delta)) == expected
