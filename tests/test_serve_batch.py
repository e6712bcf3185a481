"""Batching across requests (pipelines/serve/batch.py), without Ray: requests that join a running
batch at different steps, with different prompts, n and sampling settings, get exactly the text each
gets alone with the same seed; the step loop batches concurrent requests, drops a cancelled one and
keeps serving after a request fails."""

from __future__ import annotations

import threading

import pytest

from conftest import write_random_ae, write_random_model
from calm_core.batching import Batch, Member, RequestTimeout
from calm_core.engine import BaselineEngine, CalmEngine, GenRequest
from pipelines.serve.batch import StepLoop


def stream_alone(engine, r):
    """One request on its own (the test driver): after every model step, the deltas of its running
    completions."""
    batch = Batch(engine)
    batch.join([Member.start(engine, r)])
    while batch.members:
        out = batch.step()
        if batch.failed:
            raise batch.failed[0][1]
        for _, deltas, _ in out:
            yield deltas


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tiny_corpus_text):
    run = tmp_path_factory.mktemp("batch") / "run"
    _, tok = write_random_ae(run / "ae", tiny_corpus_text, for_text=True)
    write_random_model(run, "calm", tok)
    write_random_model(run, "baseline", tok)
    return {"calm": CalmEngine.load(run / "ae", run / "calm"), "baseline": BaselineEngine.load(run / "baseline")}


def texts(deltas_per_step) -> dict[int, tuple[str, str | None, int]]:
    out: dict[int, list] = {}
    for step in deltas_per_step:
        for d in step:
            t = out.setdefault(d.index, ["", None, 0])
            t[0] += d.text
            t[1], t[2] = d.finish, d.tokens
    return {i: tuple(v) for i, v in out.items()}


REQUESTS = {
    "calm": [dict(max_tokens=24, seed=1), dict(max_tokens=13, n=2, seed=2),
             dict(max_tokens=16, temperature=0.5, candidates=12, seed=3),
             dict(max_tokens=12, temperature=0.5, sampler="exact", max_draws=40, candidates=8, seed=4),
             dict(max_tokens=20, seed=5, stop=["e"])],
    "baseline": [dict(max_tokens=30, seed=1), dict(max_tokens=7, n=3, seed=2),
                 dict(max_tokens=16, temperature=0.7, top_p=0.9, seed=3), dict(max_tokens=10, temperature=0.0),
                 dict(max_tokens=25, seed=5, stop=["e"])],
}
PROMPTS = ["the cat", "a dog ran to the old tree and sat down", "hello", "she said that", "one two three four five"]


@pytest.mark.parametrize("kind", ["calm", "baseline"])
def test_requests_joining_a_running_batch_get_the_text_they_get_alone(engines, kind):
    eng = engines[kind]
    reqs = [GenRequest.of(eng.tok.encode(p), **kw) for p, kw in zip(PROMPTS, REQUESTS[kind])]
    alone = [texts(stream_alone(eng, r)) for r in reqs]
    joins = {0: [0, 1], 1: [2], 3: [3, 4]}  # step -> requests that join before it
    batch, got, rows_seen = Batch(eng), {}, []
    members: dict[int, Member] = {}
    step = 0
    while step in joins or batch.members or step <= max(joins):
        joining = {i: Member.start(eng, reqs[i]) for i in joins.get(step, [])}
        if joining:
            batch.join(list(joining.values()))  # requests of different prompt lengths prefilled together
            members.update(joining)
        rows_seen.append(batch.rows)
        for m, deltas, _ in batch.step():
            i = next(k for k, v in members.items() if v is m)
            got.setdefault(i, []).append(deltas)
        step += 1
    assert max(rows_seen) >= 5  # several requests really shared steps
    for i in range(len(reqs)):
        assert texts(got[i]) == alone[i], f"request {i} ({REQUESTS[kind][i]}) differs when batched"
    assert any(t[1] == "length" for a in alone for t in a.values())


def test_the_step_loop_batches_concurrent_requests_and_survives_a_failing_one(engines):
    eng = engines["baseline"]
    steps: list[int] = []
    loop = StepLoop(eng, max_rows=8, on_step=lambda rows, tokens: steps.append(rows))
    results: dict[str, list] = {}
    done = {k: threading.Event() for k in ("a", "b", "bad", "cancel", "big")}

    def sink(key):
        def put(item):
            results.setdefault(key, []).append(item)
            if isinstance(item, BaseException) or item[1]:
                done[key].set()
        return put

    ok = GenRequest.of(eng.tok.encode("the cat"), max_tokens=40, seed=1)
    loop.submit(ok, sink("a"))
    loop.submit(GenRequest.of(eng.tok.encode("a dog"), max_tokens=40, n=2, seed=2), sink("b"))
    loop.submit(GenRequest.of([10 ** 6], max_tokens=5), sink("bad"))  # a token id beyond the vocabulary
    gone = loop.submit(GenRequest.of(eng.tok.encode("hi"), max_tokens=40, seed=3), sink("cancel"))
    loop.submit(GenRequest.of(eng.tok.encode("hi"), max_tokens=4, n=9), sink("big"))  # more rows than a step takes
    assert done["bad"].wait(60) and isinstance(results["bad"][0], IndexError)
    gone.cancelled = True
    for k in ("a", "b", "big"):
        assert done[k].wait(120), k
    assert not done["cancel"].is_set() and len(results.get("cancel", [])) < 40
    assert 3 <= max(s for s in steps if s != 9) <= 4  # a, b (2 rows) and the cancelled one shared steps
    assert 9 in steps and not any(4 < s < 9 for s in steps)  # "big" ran alone: it never fits with others
    assert [d for s, _ in results["a"] for d in s] and texts(s for s, _ in results["a"]) == texts(stream_alone(eng, ok))
    big = texts(s for s, _ in results["big"])
    assert len(big) == 9 and all(t[2] <= 4 for t in big.values())


class FaultyPick:
    """An engine whose sampling raises for the rows of chosen requests (a fault injected into one
    request's step), whose backbone feed can be made to raise once (a whole step fails) and
    whose every pick can be made to hang (a stuck step)."""

    def __init__(self, engine):
        self.engine, self.hang = engine, threading.Event()
        self.release, self.feed_fault = threading.Event(), threading.Event()
        self.poisoned: set[int] = set()  # ids of the generators (requests) whose sampling raises

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def feed(self, ids):
        if self.feed_fault.is_set():
            self.feed_fault.clear()
            raise RuntimeError("injected fault in the backbone step")
        return self.engine.feed(ids)

    def pick(self, h, r, gen):
        if self.hang.is_set():
            self.release.wait(60)
        if any(id(g) in self.poisoned for g in getattr(gen, "gens", [gen])):
            raise RuntimeError("injected fault")
        return self.engine.pick(h, r, gen)


class FaultyAll(FaultyPick):
    def pick(self, h, r, gen):
        raise RuntimeError("injected fault")


def test_a_row_whose_step_raises_fails_its_request_alone(engines):
    """Two requests with the same settings share one sampling call; the faulty one's call raises, so
    each is sampled alone: the faulty one ends with the error, the other gets its text as if alone."""
    eng = engines["baseline"]
    faulty = FaultyPick(eng)
    good = GenRequest.of(eng.tok.encode("the cat"), max_tokens=9, seed=1, top_p=0.9)
    bad = GenRequest.of(eng.tok.encode("a dog"), max_tokens=9, seed=2, top_p=0.9)
    batch = Batch(faulty)
    mg, mb = Member.start(faulty, good), Member.start(faulty, bad)
    faulty.poisoned.add(id(mb.gen))
    batch.join([mg, mb])
    got = []
    out = batch.step()
    assert [m for m, _ in batch.failed] == [mb] and "injected" in str(batch.failed[0][1])
    assert [m for m, _, _ in out] == [mg] and batch.members == [mg] and batch.rows == 1
    got.append(out[0][1])
    while batch.members:
        got += [d for _, d, _ in batch.step()]
    assert texts(got) == texts(stream_alone(eng, good))  # the failure did not disturb the other row
    with pytest.raises(RuntimeError, match="injected"):
        list(stream_alone(FaultyAll(eng), bad))


def test_a_request_past_its_deadline_ends_with_length_and_a_waiting_one_times_out(engines):
    eng = engines["baseline"]
    batch = Batch(eng)
    m = Member.start(eng, GenRequest.of(eng.tok.encode("the cat"), max_tokens=30, seed=1), timeout_s=0.0)
    batch.join([m])
    (_, deltas, finished), = batch.step()  # one step, then its time is up
    assert finished and deltas[0].finish == "length" and deltas[0].tokens == 1 and not batch.members

    loop = StepLoop(eng, max_rows=4, timeout_s=0.0)
    got, done = [], threading.Event()
    loop.submit(GenRequest.of(eng.tok.encode("a dog"), max_tokens=30), lambda item: (got.append(item), done.set()))
    assert done.wait(60) and isinstance(got[0], RequestTimeout)
    loop.stopped = True


def test_the_step_loop_survives_an_error_outside_a_step_and_reports_a_stuck_or_dead_loop(engines):
    eng = engines["baseline"]
    faulty = FaultyPick(eng)
    loop = StepLoop(faulty, max_rows=4)
    assert loop.health(step_timeout_s=60) is None

    def run(r) -> list:
        got, done = [], threading.Event()
        loop.submit(r, lambda item: (got.append(item), done.set() if isinstance(item, BaseException) or item[1] else None))
        assert done.wait(60)
        return got

    def broken_sink(item):
        raise ValueError("a sink that raises")  # its consumer is gone: that request is dropped, no other

    alone = texts(stream_alone(eng, GenRequest.of(eng.tok.encode("the cat"), max_tokens=5, seed=1)))
    loop.submit(GenRequest.of(eng.tok.encode("hi"), max_tokens=3, seed=1), broken_sink)
    ok = run(GenRequest.of(eng.tok.encode("the cat"), max_tokens=5, seed=1))
    assert ok[-1][1] and texts(s for s, _ in ok) == alone and loop.restarts == 0
    faulty.feed_fault.set()  # the backbone step of the whole batch raises: its requests end, the loop goes on
    failed = run(GenRequest.of(eng.tok.encode("the cat"), max_tokens=5, seed=1))
    assert isinstance(failed[-1], RuntimeError) and loop.restarts == 1
    ok = run(GenRequest.of(eng.tok.encode("the cat"), max_tokens=5, seed=1))
    assert ok[-1][1] and texts(s for s, _ in ok) == alone
    faulty.hang.set()  # the next step hangs: a stuck loop is unhealthy
    loop.submit(GenRequest.of(eng.tok.encode("a"), max_tokens=3), lambda item: None)
    import time
    while loop.busy_since is None or loop.health(step_timeout_s=0.01) is None:
        time.sleep(0.01)
    assert "in one step" in loop.health(step_timeout_s=0.01)
    loop.stopped = True
    faulty.hang.clear()
    faulty.release.set()
    loop.thread.join(60)
    assert loop.health(step_timeout_s=60) == "the step loop thread has ended"


@pytest.mark.parametrize("temperature,sampler", [(1.0, "batch"), (0.5, "batch"), (0.5, "exact")])
def test_offline_generation_runs_the_step_engine_and_equals_the_reference_loop(engines, temperature, sampler):
    """jobs/generate.py's Generator goes through the server's engine (one request in a Batch); its ids
    are those of calm_core.generate.generate, the plain prefix/extend loop, for the same seed."""
    from calm_core import rng
    from calm_core.generate import generate, prompt_chunks
    from pipelines.serve.generation import Generator

    eng = engines["calm"]
    tok, K = eng.tok, eng.step_tokens
    ctx, _ = prompt_chunks(tok.encode("the cat sat on"), K, "document", tok.eot_id, tok.pad_id, tok.bos_id)
    ref = generate(eng.model, eng.ae, ctx, 5, temperature, 16, rng.generator_for("cpu", 3), sampler, 40)[0].flatten()
    docs = [[]]
    for i in ref.tolist():
        docs.append([]) if i == tok.eot_id else docs[-1].append(i)
    out = Generator(eng.model, eng.ae, tok).complete("the cat sat on", chunks=5, temperature=temperature, candidates=16,
                                                   seed=3, stop_at_end=False, sampler=sampler, max_draws=40)
    assert out["steps"] == 5 and out["tokens"] == 5 * K
    assert out["completion"] == "\n".join(tok.decode(d) for d in (docs[:-1] if not docs[-1] else docs))
    assert (out["exact"] is not None) == (sampler == "exact")
