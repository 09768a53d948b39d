"""``Runtime.generate`` / ``edgelora run`` give the right answer or a one-line refusal, never a silent wrong one.

Several prompts (one sequence each, as each alone), sampling numbers at float64's edges (no NaN; the limits the
finite values tend to), a negative token count, prompts longer than the positions, and a stream callback that
switches tasks (no deadlock; the call keeps its task). References: PyTorch + the real peft library's greedy
generation of the tiny seeded LLaMA (``conftest``'s session export, cpu-fp32, traced graph), and transformers'
own logits processors for the sampler's distributions.
"""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error

from edgelora.errors import InputError
from edgelora.runtime import Runtime
from edgelora.runtime.decode import Sampler, Sampling

P1 = [9, 40, 41, 72, 33, 90]
P2 = [17, 64, 50, 23, 88, 31, 12, 77, 5]
P3 = [60, 61, 62, 11, 19, 44]
NEW = 8


def _torch_greedy(base: Path, adapter: Path | None, prompt: list[int], n: int, **options: Any) -> list[int]:
    """PyTorch + peft (the adapter unmerged, as trained): n greedy tokens, no stop token."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.generation_config.eos_token_id = None  # plain argmax for n tokens
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                    do_sample=False, pad_token_id=0, **options)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def llama(family_adapters, exported):
    """(folder, {(task, prompt): PyTorch's greedy tokens}) for the tiny LLaMA's t1, t2 and the base."""
    base, adapters = family_adapters["llama"]
    refs = {(task, tuple(p)): _torch_greedy(base, adapters.get(task), p, NEW)
            for task in ("t1", "t2", None) for p in (P1, P2, P3)}
    assert refs[("t1", tuple(P1))] != refs[("t2", tuple(P1))] != refs[(None, tuple(P1))]  # the tasks differ
    return exported["llama"], refs


# ------------------------------------------------------------------------------------------ several prompts
@pytest.mark.parametrize("mode", ["swap", "unmerged"])
def test_several_prompts_generate_one_sequence_each(llama, mode):
    """A list of id lists (any lengths) or a (batch, sequence) array: one list per prompt, each PyTorch's greedy
    tokens for that prompt alone (not one flattened prompt); one list of ids stays one sequence."""
    folder, refs = llama
    rt = Runtime.open(folder, threads=1, mode=mode)
    want = {tuple(p): refs[("t1", tuple(p))] for p in (P1, P2, P3)}
    streamed: list[int] = []
    assert rt.generate([P1, P2], NEW, task="t1", stream=streamed.append) == [want[tuple(P1)], want[tuple(P2)]]
    assert streamed == want[tuple(P1)] + want[tuple(P2)]  # prompt after prompt
    assert rt.generate(np.array([P1, P3]), NEW, task="t1") == [want[tuple(P1)], want[tuple(P3)]]
    assert rt.generate((np.array(P2), P1), NEW, task="t1") == [want[tuple(P2)], want[tuple(P1)]]
    assert rt.generate(np.array([P3]), NEW, task="t1") == [want[tuple(P3)]]  # a batch of one is still a batch
    assert rt.generate(P1, NEW, task="t1") == want[tuple(P1)]
    assert rt.generate(np.array(P2), NEW, task="t1") == want[tuple(P2)]
    # sampled: each prompt from the same seed, exactly as generated alone
    options = {"temperature": 1.1, "top_k": 40, "top_p": 0.95, "seed": 7, "task": "t2"}
    alone = [rt.generate(p, NEW, **options) for p in (P1, P2)]
    assert rt.generate([P1, P2], NEW, **options) == alone and alone[0] != refs[("t2", tuple(P1))]
    for bad, words in [([P1, 7], "mixes"), (np.zeros((2, 0), np.int64), "at least one token"),
                       (np.ones((2, 2, 2), np.int64), "(batch, sequence)"), ([P1, []], "prompt_ids[1] is empty"),
                       ([P1, [1.5]], "prompt_ids[1] has dtype"), ("hello", "generate_text"),
                       ([P1, [600]], "outside the vocabulary"), ([P1, list(range(125))], "prompt 1 has 125 tokens")]:
        with pytest.raises(InputError) as err:
            rt.generate(bad, NEW)
        assert words in str(err.value) and "\n" not in str(err.value), (bad, str(err.value))


# ------------------------------------------------------------------------------------------ sampling numbers
def _reference(logits: np.ndarray, seen: np.ndarray, temperature: float, penalty: float, top_k: int = 0
               ) -> np.ndarray:
    """transformers' logits processors, float64, then torch's softmax."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
    )

    scores = torch.from_numpy(logits.astype(np.float64))[None]
    ids = torch.from_numpy(seen)[None]
    scores = RepetitionPenaltyLogitsProcessor(penalty)(ids, scores) if penalty != 1.0 else scores
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    scores = TopKLogitsWarper(top_k)(ids, scores) if top_k else scores
    return torch.softmax(scores, -1)[0].numpy()


def _probabilities(logits: np.ndarray, seen: np.ndarray, temperature: float, penalty: float, top_k: int = 0
                   ) -> np.ndarray:
    sampler = Sampler(Sampling.checked(temperature, 1.0, top_k, penalty, []), logits.shape[0], seen, seed=0)
    with warnings.catch_warnings(), np.errstate(all="raise"):  # no numpy warning, no floating-point error
        warnings.simplefilter("error")
        p = sampler.probabilities(logits)
        greedy = Sampler(Sampling.checked(0.0, 1.0, top_k, penalty, []), logits.shape[0], seen, seed=0)(logits)
    assert np.isfinite(p).all() and abs(p.sum() - 1) < 1e-12
    if temperature < 1e-6:
        assert p[greedy] == p.max()
    return p


def test_sampling_at_float64s_edges_is_the_limit_of_the_finite_case():
    """A temperature whose 1/T overflows is greedy (torch's softmax of z / T is NaN there; at T = 1e-200, where
    it is finite, it is already one-hot and equal); a repetition penalty that overflows a penalized logit gives
    what transformers gives at the nearest penalty that does not overflow (a seen token's logit 1e-300 / 1e308
    times), with and without top-k; no NaN, no numpy warning, nothing raised."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(512) * 3).astype(np.float32)
    seen = rng.integers(0, 512, 30)
    np.testing.assert_allclose(_probabilities(logits, seen, 0.01, 1.0), _reference(logits, seen, 0.01, 1.0),
                               atol=1e-12)
    one_hot = _reference(logits, seen, 1e-200, 1.0)
    assert one_hot.max() == 1.0 and one_hot.argmax() == logits.argmax()
    for temperature in (1e-200, 1e-300, 1e-310, 5e-324):
        np.testing.assert_array_equal(_probabilities(logits, seen, temperature, 1.0), one_hot)
    with np.errstate(all="ignore"):
        assert np.isnan(_reference(logits, seen, 1e-310, 1.0)).all()  # why the limit is taken, not the formula
    for tiny in (1e-310, 1e-320, 5e-324):
        for top_k in (0, 3):
            want = _reference(logits, seen, 1.0, 1e-300, top_k)
            assert want.max() == 1.0 and want.argmax() in seen
            np.testing.assert_array_equal(_probabilities(logits, seen, 1.0, tiny, top_k), want)
            np.testing.assert_allclose(_probabilities(logits, seen, 0.7, 1e-300, top_k), want, atol=1e-12)
    # a huge penalty: every token seen and negative, so all go to -inf in float64 past ~1e307
    negative = -np.abs(logits[:16]) - 0.5
    everything = np.arange(16)
    want = _reference(negative, everything, 1.0, 1e300)
    assert want.max() == 1.0 and want.argmax() == negative.argmax()
    for huge in (1e300, 1e308, 1.7e308):
        np.testing.assert_array_equal(_probabilities(negative, everything, 1.0, huge), want)
        np.testing.assert_allclose(_probabilities(logits, seen, 1.3, huge), _reference(logits, seen, 1.3, huge),
                                   atol=1e-12)


def test_sampling_numbers_that_are_not_finite_positive_are_refused(llama):
    folder, _ = llama
    rt = Runtime.open(folder, threads=1)
    cases = [("temperature", x) for x in (float("nan"), float("inf"), -1e-310, -1.0, True, "0.5")]
    cases += [("repetition_penalty", x) for x in (float("nan"), float("inf"), 0.0, -1e-310, -2.0, None)]
    cases += [("top_p", x) for x in (float("nan"), float("inf"), 0.0, 1.5)]
    cases += [("top_k", x) for x in (-1, 2.5, False)]
    for name, value in cases:
        with pytest.raises(InputError) as err:
            rt.generate(P1, 3, **{name: value})
        assert str(err.value).startswith(f"{name} = ") and "\n" not in str(err.value), (name, value, err.value)


def test_generation_at_float64s_edges_matches_pytorch(llama, family_adapters):
    """End to end: a temperature of 1e-310 samples PyTorch's greedy tokens (any seed); a repetition penalty of
    1e-310 (overflowing float64) generates what PyTorch generates greedily at 1e-30, where float32 is still
    finite — sampled or greedy."""
    folder, refs = llama
    base, adapters = family_adapters["llama"]
    rt = Runtime.open(folder, threads=1)
    for seed in (0, 1, None):
        assert rt.generate(P1, NEW, temperature=1e-310, seed=seed, task="t1") == refs[("t1", tuple(P1))]
        assert rt.generate(P1, NEW, temperature=5e-324, top_k=5, top_p=0.5, seed=seed) == refs[(None, tuple(P1))]
    want = _torch_greedy(base, adapters["t1"], P2, NEW, repetition_penalty=1e-30)
    assert want != refs[("t1", tuple(P2))]  # the penalty changes the answer
    assert rt.generate(P2, NEW, repetition_penalty=1e-30, task="t1") == want
    for penalty in (1e-300, 1e-310, 5e-324):
        assert rt.generate(P2, NEW, repetition_penalty=penalty, task="t1") == want
        assert rt.generate(P2, NEW, temperature=1.0, repetition_penalty=penalty, seed=3, task="t1") == want


# ------------------------------------------------------------------------------------------ counts and lengths
def test_negative_max_new_tokens_is_refused(llama, cli):
    folder, _ = llama
    r = cli("run", folder, "--text", "hello", "--max-new-tokens", "-3")
    assert_one_line_error(r, "--max-new-tokens is -3")
    assert r.out == ""
    rt = Runtime.open(folder, threads=1)
    for bad in (-3, -1, 2.0, True, None):
        with pytest.raises(InputError, match="max_new_tokens = "):
            rt.generate(P1, bad)
        with pytest.raises(InputError, match="max_new_tokens = "):
            rt.generate_text("hello", bad)
    assert rt.generate(P1, 0) == [] and rt.generate([P1, P2], 0) == [[], []]


def test_a_prompt_longer_than_the_positions_is_refused_not_cut(llama, cli):
    """The tokenizer would cut a long text to the base's 128 positions and the run then generated nothing with
    exit 0. Now: one line naming the prompt's length (counted by the tokenizers package with no truncation)
    and the limit, exit 2, nothing generated for any --text; a prompt that fits but leaves fewer positions than
    --max-new-tokens asks is generated with the count lowered and a warning naming the option."""
    from tokenizers import Tokenizer

    folder, _ = llama
    whole = Tokenizer.from_file(str(folder / "tokenizer/tokenizer.json"))
    long_text = "the quick brown fox jumps. " * 11
    length = len(whole.encode(long_text).ids)
    assert length > 128
    for args in (["--text", long_text], ["--text", "hello", "--text", long_text], ["--text", long_text, "--json"],
                 ["--text", long_text, "--max-new-tokens", "0"]):
        r = cli("run", folder, *args)
        assert_one_line_error(r, f"the prompt is {length} tokens", "128")
        assert r.out == "", r.out  # nothing streamed for any prompt
    rt = Runtime.open(folder, threads=1)
    for n in (0, 5):
        with pytest.raises(InputError, match=f"the prompt is {length} tokens; .* at most 128"):
            rt.generate_text(long_text, n)
    huge = "word " * 800_000  # 4 MB: refused from its start (counted whole, it would cost over a GB)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="the prompt is over 128 tokens \\(4,000,000 characters\\); .* at most 128"):
        rt.generate_text(huge, 5)
    assert time.perf_counter() - t0 < 2.0
    with pytest.raises(InputError, match="the prompt has 200 tokens and max_new_tokens = 1: together they exceed "
                                         "the base's 128 positions"):
        rt.generate(list(range(5, 205)), 1)

    fits = long_text[:128]
    assert len(whole.encode(fits).ids) == 128
    r = cli("run", folder, "--text", fits, "--max-new-tokens", "4")
    assert_one_line_error(r, "the prompt is 128 tokens", "leaves none of the base's 128 positions")
    almost = long_text[:120]
    r = cli("run", folder, "--text", almost, "--max-new-tokens", "20", "--task", "t1")
    assert r.code == 0, r.err
    assert r.err.strip() == "warning: --max-new-tokens 20 lowered to 8: the prompt is 120 tokens of the base's 128 " \
                            "positions"
    assert r.out.strip() == (almost + rt.generate_text(almost, 8, task="t1")).strip()


# ------------------------------------------------------------------------------------------ switching inside a call
def _finishes(fn: Any, timeout: float = 60.0) -> Any:
    """fn() in a thread; fails (instead of hanging the suite) if it has not returned within ``timeout``."""
    out: list[Any] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "deadlocked"
    if errors:
        raise errors[0]
    return out[0]


@pytest.mark.parametrize("mode", ["swap", "unmerged", "engines"])
def test_a_stream_callback_that_switches_tasks_does_not_deadlock(llama, mode):
    """A callback that activates other tasks (or runs a nested generate on another) from inside a generate: the
    call finishes, its tokens are the task it started with (PyTorch's), the last activate wins, and the task it
    activated really runs afterwards. In swap mode with two slots this needs a third slot: the only slot to build
    into is the one the generate itself reads."""
    folder, refs = llama
    rt = Runtime.open(folder, threads=1, mode=mode, slots=2)
    assert rt.mode == mode
    nested: list[list[int]] = []

    def switching(token: int, calls: list[int] = []) -> None:  # noqa: B006 - the call count
        calls.append(token)
        if len(calls) == 1:
            rt.activate("t2")
        elif len(calls) == 3:
            rt.activate(None)
            nested.append(rt.generate(P3, NEW, task="t2"))  # a nested call on a third state
        elif len(calls) == 5:
            rt.activate("t2")

    assert _finishes(lambda: rt.generate(P1, NEW, task="t1", stream=switching)) == refs[("t1", tuple(P1))]
    assert nested == [refs[("t2", tuple(P3))]]
    assert rt.active == "t2" and rt.generate(P1, NEW) == refs[("t2", tuple(P1))]
    # the active task's own call: it keeps t2 while the callback moves the runtime to t1 and back to the base
    steps = iter([lambda: rt.activate("t1"), lambda: rt.activate(None)])
    got = _finishes(lambda: rt.generate([P2, P1], NEW, stream=lambda _t: next(steps, lambda: None)()))
    assert got == [refs[("t2", tuple(P2))], refs[("t2", tuple(P1))]]
    assert rt.active is None and rt.generate(P2, NEW) == refs[(None, tuple(P2))]
    assert rt.generate(P2, NEW, task="t1") == refs[("t1", tuple(P2))]


def test_a_callback_switching_while_another_thread_switches_does_not_deadlock(llama):
    """Thread A activates t2 and must wait for the slot thread B's generate reads; B's stream callback then
    activates too, waiting for the lock A holds. A builds into a new slot instead of waiting forever; B's
    tokens are its task's; both finish."""
    folder, refs = llama
    rt = Runtime.open(folder, threads=1, mode="swap", slots=2)
    b_streaming, a_waiting = threading.Event(), threading.Event()

    def b_callback(token: int, calls: list[int] = []) -> None:  # noqa: B006 - the call count
        calls.append(token)
        if len(calls) == 1:
            b_streaming.set()
            a_waiting.wait(30)
            rt.activate(None)

    b = threading.Thread(target=lambda: out.append(rt.generate(P1, NEW, task="t1", stream=b_callback)), daemon=True)
    a = threading.Thread(target=lambda: rt.activate("t2"), daemon=True)
    out: list[list[int]] = []
    b.start()
    assert b_streaming.wait(30)
    a.start()
    a.join(0.5)  # A is now waiting for B's slot (or, on a slow machine, still on its way there)
    a_waiting.set()
    a.join(60)
    b.join(60)
    assert not a.is_alive() and not b.is_alive(), "deadlocked"
    assert out == [refs[("t1", tuple(P1))]]
    assert rt.active is None and rt.generate(P3, NEW) == refs[(None, tuple(P3))]
    assert rt.generate(P3, NEW, task="t2") == refs[("t2", tuple(P3))]
