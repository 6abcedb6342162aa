"""Generation: schema encoding, stop strings, EOS, streaming == generate, batching, cancel."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

from ragtune.config import GenerateConfig
from ragtune.generate import Decoding, Generator
from ragtune.schema import PromptFields, get_schema
from ragtune.stopping import cut_stop, finish_text

STOPS = ["### Instruction:", "### Response:", "\n###"]


# --------------------------------------------------------------------------- pure text logic
def test_cut_stop_takes_the_earliest_stop():
    assert cut_stop("a ### Response: b ### Instruction: c", STOPS) == ("a ", True)
    assert cut_stop("plain answer", STOPS) == ("plain answer", False)
    # a model that opens a new section at once has answered nothing
    assert cut_stop("### Instruction: more", STOPS) == ("", True)


def test_a_possible_stop_string_is_held_back_whole_while_streaming():
    """With a stop whose start repeats ("###"), the longest tail that could still become it
    is held back, not only its last character."""
    assert finish_text("Paris ##", ["###"], final=False) == ("Paris", False)


def test_stop_criteria_end_only_the_rows_that_wrote_a_stop(lm_path):
    from transformers import AutoTokenizer

    from ragtune.stopping import StopOnText

    tok = AutoTokenizer.from_pretrained(lm_path)
    rows = [tok("Q? Paris.\n### Instruction:")["input_ids"], tok("Q? Paris is the")["input_ids"]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.eos_token_id] * (width - len(r)) for r in rows])
    assert StopOnText(tok, STOPS, prompt_len=2)(ids, None).tolist() == [True, False]
    # no stop strings (a schema without markup): nothing stops a row but EOS and the limit
    assert StopOnText(tok, [], prompt_len=2)(ids, None).tolist() == [False, False]
    cancel = threading.Event()
    cancel.set()
    assert StopOnText(tok, [], prompt_len=2, cancel=cancel)(ids, None).tolist() == [True, True]


@pytest.mark.parametrize(
    ("raw", "final", "want"),
    [
        ("Paris.\n\n### Instruction:\nmore", True, ("Paris.", True)),
        ("Paris. ### Instr", False, ("Paris.", False)),  # held back while it may be a stop
        ("Paris. ### Instr", True, ("Paris. ### Instr", False)),  # ...and kept once it is not
        ("Paris.\n\n### Instr", True, ("Paris.", True)),  # "\n###" itself is a stop
        ("Paris.\n\n#", True, ("Paris.", False)),  # a dangling header start is dropped at the end
        ("C#", True, ("C#", False)),  # "#" inside a line is content
        ("C#", False, ("C", False)),  # ...but held back until the next token says so
        ("  spaced  ", True, ("spaced", False)),
        ("caf\ufffd", False, ("caf", False)),  # an incomplete UTF-8 character waits
        ("標高1,240メ\ufffd", True, ("標高1,240メ", False)),  # ...and is dropped when cut off
    ],
)
def test_finish_text(raw, final, want):
    assert finish_text(raw, STOPS, final=final) == want


def test_streamed_prefixes_only_grow():
    """Whatever was shown for a prefix of the raw text is a prefix of what comes later."""
    raw = "The festival is held on the second Saturday.\n\n### Instruction:\nWhat"
    shown = ""
    for i in range(1, len(raw) + 1):
        visible, hit = finish_text(raw[:i], STOPS, final=False)
        assert visible.startswith(shown), (raw[:i], visible, shown)
        shown = visible
        if hit:
            break
    assert (
        shown
        == finish_text(raw, STOPS, final=True)[0]
        == "The festival is held on the second Saturday."
    )


# --------------------------------------------------------------------------- scripted model
class ScriptedLM(torch.nn.Module):
    """Stands in for a causal LM: "generates" a fixed token script, the way HF generate does.

    It feeds the streamer and consults the stopping criteria after each token, and ends a
    row at EOS, so the Generator's stop handling is tested deterministically.
    """

    def __init__(self, script: list[int], eos: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.script, self.eos = script, eos
        self.calls: list[torch.Tensor] = []

    def generate(self, input_ids, attention_mask, generation_config, stopping_criteria, streamer):
        self.calls.append(input_ids.clone())
        if streamer is not None:
            streamer.put(input_ids.cpu())
        seq = input_ids
        for step in range(generation_config.max_new_tokens):
            tok = self.script[step] if step < len(self.script) else self.eos
            nxt = torch.full((seq.shape[0], 1), tok, dtype=torch.long)
            seq = torch.cat([seq, nxt], dim=1)
            if streamer is not None:
                streamer.put(nxt[:, 0])
            if tok == self.eos or bool(stopping_criteria(seq, None).all()):
                break
        if streamer is not None:
            streamer.end()
        return seq


@pytest.fixture(scope="module")
def schema():
    return get_schema("alpaca_rag")


def _prompt(schema, tokenizer, question="What is the capital?"):
    return schema.render_prompt(
        PromptFields(question, "", ["France's capital is Paris."]), tokenizer
    )


def _scripted(tokenizer, schema, text: str, **gen):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    model = ScriptedLM(ids, tokenizer.eos_token_id)
    return model, Generator(model, tokenizer, schema, GenerateConfig(**gen))


def test_encode_keeps_recent_prompts_ids(tokenizer, schema, monkeypatch):
    """A prompt encoded again (the pipeline's fit check, then the generation) costs no second
    tokenizer call; the ids are the schema's, a caller's changes do not leak, the memo is
    bounded."""
    import ragtune.generate as generate

    _, gen = _scripted(tokenizer, schema, "Paris")
    prompt = _prompt(schema, tokenizer)
    calls: list[str] = []
    real = type(schema).encode_prompt
    monkeypatch.setattr(
        type(schema), "encode_prompt", lambda s, tok, t: calls.append(t) or real(s, tok, t)
    )
    first = gen.encode(prompt)
    assert first == real(schema, tokenizer, prompt) and calls == [prompt]
    first.append(-1)
    assert gen.encode(prompt) == first[:-1] and calls == [prompt]
    monkeypatch.setattr(generate, "_RECENT_PROMPTS", 2)
    for q in ("a?", "b?", "c?"):
        gen.encode(_prompt(schema, tokenizer, q))
    assert len(gen._recent_ids) == 2 and prompt not in gen._recent_ids


def test_stop_string_ends_generation_and_is_trimmed(tokenizer, schema):
    text = "Paris.\n\n### Instruction:\nWhat is the capital of Spain?\n\n### Response:\nMadrid"
    model, gen = _scripted(tokenizer, schema, text, max_new_tokens=60)
    res = gen.generate(_prompt(schema, tokenizer))
    assert res.text == "Paris."
    assert res.stop_reason == "stop_string"
    assert "Spain" not in gen.decode(res.token_ids)  # generation stopped, not just trimmed
    # The prompt went in encoded by the schema, exactly once.
    assert model.calls[0][0].tolist() == schema.encode_prompt(tokenizer, _prompt(schema, tokenizer))


def test_eos_ends_generation(tokenizer, schema):
    text = "Paris" + tokenizer.eos_token + "runaway text that must not appear"
    _, gen = _scripted(tokenizer, schema, text, max_new_tokens=60)
    res = gen.generate(_prompt(schema, tokenizer))
    assert (res.text, res.stop_reason) == ("Paris", "eos")
    assert res.new_tokens == len(res.token_ids) + 1


def test_length_limit_and_dangling_header(tokenizer, schema):
    text = "Paris is the capital of France.\n\n###"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    _, gen = _scripted(tokenizer, schema, text, max_new_tokens=len(ids))
    res = gen.generate(_prompt(schema, tokenizer))
    assert res.text == "Paris is the capital of France."
    assert res.stop_reason == "stop_string"  # "\n###" opens a new section


def test_stream_pieces_equal_generate_text(tokenizer, schema):
    text = "The festival is on the second Saturday of October.\n\n### Response: again"
    _, gen = _scripted(tokenizer, schema, text, max_new_tokens=60)
    prompt = _prompt(schema, tokenizer)
    stream = gen.stream(prompt)
    pieces = list(stream)
    assert len(pieces) > 3  # really streamed, token by token
    assert "".join(pieces) == stream.result.text == gen.generate(prompt).text
    assert "###" not in "".join(pieces)
    assert stream.result.stop_reason == "stop_string"


# --------------------------------------------------------------------------- real tiny model
@pytest.fixture(scope="module")
def tiny(tiny_lm_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path, use_safetensors=True)
    return model, AutoTokenizer.from_pretrained(tiny_lm_path)


def test_tiny_model_generate_respects_limits(tiny, schema):
    model, tok = tiny
    gen = Generator(model, tok, schema, GenerateConfig(max_new_tokens=12))
    prompt = _prompt(schema, tok)
    res = gen.generate(prompt)
    assert 1 <= res.new_tokens <= 12
    assert res.prompt_tokens == len(schema.encode_prompt(tok, prompt))
    assert res.stop_reason in ("eos", "stop_string", "length")
    assert "### Instruction:" not in res.text
    # greedy: deterministic
    assert gen.generate(prompt).token_ids == res.token_ids


def test_a_model_left_in_training_mode_answers_without_dropout(tiny_lm_path, schema):
    """A model straight from a trainer (training mode, dropout on) answers the same way twice:
    the generator switches it to inference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        tiny_lm_path, use_safetensors=True, attention_dropout=0.5
    ).train()
    tok = AutoTokenizer.from_pretrained(tiny_lm_path)
    gen = Generator(model, tok, schema, GenerateConfig(max_new_tokens=8))
    prompts = [_prompt(schema, tok, q) for q in ("Short?", "Where is the lake town?", "Why?")]
    assert not model.training
    assert [r.token_ids for r in gen.generate_batch(prompts, batch_size=3)] == [
        r.token_ids for r in gen.generate_batch(prompts, batch_size=3)
    ]


def test_batched_generation_reports_each_finished_batch_for_progress(tiny, schema):
    model, tok = tiny
    gen = Generator(model, tok, schema, GenerateConfig(max_new_tokens=2))
    prompts = [_prompt(schema, tok, "Q" * n + "?") for n in range(1, 6)]
    done: list[int] = []
    assert len(gen.generate_batch(prompts, batch_size=2, on_batch=done.append)) == 5
    assert done == [2, 2, 1]


def test_a_tokenizer_without_an_end_token_is_refused(tiny_lm_path, schema):
    """Generation would never stop: say so before any answer is attempted."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune.models import embedder_dir

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path, use_safetensors=True)
    model.generation_config.eos_token_id = None
    bert = AutoTokenizer.from_pretrained(embedder_dir())  # [SEP], no end-of-text token
    with pytest.raises(ValueError, match="no EOS token"):
        Generator(model, bert, schema, GenerateConfig(max_new_tokens=2))


def test_a_row_ends_at_its_first_end_token(tiny, schema):
    """In a batch a row that ended early is padded after its end token: the padding is
    neither text nor counted (the end token itself counts as generated)."""
    model, tok = tiny
    gen = Generator(model, tok, schema, GenerateConfig(max_new_tokens=8))
    words = tok("Paris", add_special_tokens=False)["input_ids"]
    end = min(gen.eos_ids)
    res = gen._result([*words, end, *words, end], seconds=1.0, prompt_tokens=3)
    assert (res.text, res.token_ids, res.new_tokens, res.stop_reason) == (
        "Paris",
        words,
        len(words) + 1,
        "eos",
    )


def test_a_dropped_stream_stops_its_generation(tiny, schema):
    """A caller that stops reading and lets go of a stream (no close()) does not keep the
    model busy: the generation ends at the next token, not at the token limit."""
    import gc

    model, tok = tiny
    gen = Generator(model, tok, schema, GenerateConfig(max_new_tokens=100_000))
    steps: list[int] = []
    hook = model.register_forward_hook(lambda *a: steps.append(1))
    try:
        before = set(threading.enumerate())
        stream = gen.stream(_prompt(schema, tok, "Tell me a long story?"))
        first = next(iter(stream))
        (worker,) = set(threading.enumerate()) - before
        at_drop = len(steps)
        del stream
        gc.collect()
        worker.join(timeout=120)
    finally:
        hook.remove()
    # a model step or two may be under way when the stream goes; unstopped, it runs hundreds
    assert first and not worker.is_alive() and len(steps) - at_drop <= 3


def test_batch_matches_single_greedy(tiny, schema):
    model, tok = tiny
    gen = Generator(model, tok, schema, GenerateConfig(max_new_tokens=8))
    prompts = [
        _prompt(schema, tok, "Short?"),
        _prompt(
            schema, tok, "A much longer question about the festival held on the lake every year?"
        ),
        _prompt(schema, tok, "Medium length question here?"),
    ]
    batched = gen.generate_batch(prompts, batch_size=3)
    single = [gen.generate(p) for p in prompts]
    assert len({tuple(s.token_ids) for s in single}) == 3  # the model tells them apart
    assert [b.token_ids for b in batched] == [s.token_ids for s in single]
    assert [b.text for b in batched] == [s.text for s in single]


def test_sampling_uses_temperature(tiny, schema):
    model, tok = tiny
    gen = Generator(model, tok, schema, GenerateConfig(max_new_tokens=8, temperature=5.0))
    prompt = _prompt(schema, tok)
    outs = set()
    for seed in range(4):
        torch.manual_seed(seed)
        outs.add(tuple(gen.generate(prompt).token_ids))
    assert len(outs) > 1  # a hot random model does not repeat itself; greedy would


def test_closing_a_stream_frees_the_generator(tiny, schema):
    model, tok = tiny
    gen = Generator(model, tok, schema, GenerateConfig(max_new_tokens=64))
    prompt = _prompt(schema, tok)
    stream = gen.stream(prompt)
    next(iter(stream), None)
    stream.close()
    done = threading.Event()
    threading.Thread(target=lambda: (gen.generate(prompt), done.set()), daemon=True).start()
    assert done.wait(60), "generate() blocked: the closed stream kept the lock"


def test_a_request_sets_max_new_tokens_within_the_model(tiny, schema):
    model, tok = tiny
    gen = Generator(model, tok, schema, GenerateConfig(max_new_tokens=6), max_seq_length=200)
    prompt = _prompt(schema, tok)
    n_prompt = len(gen.encode(prompt))
    assert gen.generate(prompt, Decoding(max_new_tokens=2)).new_tokens <= 2
    # above the config's default (no hidden cap), but never past max_seq_length
    long = gen.generate(prompt, Decoding(max_new_tokens=500))
    assert gen.max_new_for(n_prompt, Decoding(max_new_tokens=500)) == 200 - n_prompt
    assert long.new_tokens <= 200 - n_prompt
    assert gen.max_new_for(n_prompt, Decoding(max_new_tokens=20)) == 20
    stream = gen.stream(prompt, Decoding(max_new_tokens=1))
    list(stream)
    assert stream.result.new_tokens == 1


def test_request_stop_strings_and_seeded_sampling(tiny, schema):
    model, tok = tiny
    gen = Generator(model, tok, schema, GenerateConfig(max_new_tokens=12))
    prompt = _prompt(schema, tok)
    greedy = gen.generate(prompt)
    assert gen.generate(prompt).token_ids == greedy.token_ids  # greedy by default
    assert not gen.samples() and gen.samples(Decoding(temperature=0.8))
    sampled = [gen.generate(prompt, Decoding(temperature=1.5, seed=s)).token_ids for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # a seed repeats
    assert sampled[0] != sampled[2] or sampled[0] != greedy.token_ids
    # a request's stop string cuts the answer there (a sampled answer: the tiny LM's greedy
    # one is empty); the same seed makes the same tokens up to the stop
    seed = next(
        s
        for s in range(1, 30)
        if len(gen.generate(prompt, Decoding(temperature=1.5, seed=s)).text) > 3
    )
    full = gen.generate(prompt, Decoding(temperature=1.5, seed=seed))
    stop = full.text[2:4]
    cut = gen.generate(prompt, Decoding(temperature=1.5, seed=seed, stop=(stop,)))
    assert cut.text == full.text[: full.text.index(stop)].strip()
    assert cut.stop_reason == "stop_string"
    streamed = gen.stream(prompt, Decoding(temperature=1.5, seed=seed, stop=(stop,)))
    assert "".join(streamed) == cut.text


def test_fast_flag_falls_back_without_cuda(tiny, schema):
    model, tok = tiny
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen = Generator(model, tok, schema, GenerateConfig(max_new_tokens=4, fast=True))
    assert any("generate.fast" in str(w.message) for w in caught)
    assert gen.generate(_prompt(schema, tok)).new_tokens >= 1


def test_fast_path_gives_the_same_answers(tiny, schema):
    """The fast decoder, wired in as on GPU (here on CPU, uncompiled), changes no token."""
    from ragtune.fastdecode import FastDecoder

    model, tok = tiny
    gen = Generator(model, tok, schema, GenerateConfig(max_new_tokens=10))
    prompts = [_prompt(schema, tok, "Short?"), _prompt(schema, tok, "A longer question here?")]
    slow = gen.generate_batch(prompts)
    gen._fast = FastDecoder(model, tok, max_seq_len=512, compile=False)
    fast = gen.generate_batch(prompts)
    assert [f.token_ids for f in fast] == [s.token_ids for s in slow]
    assert [f.stop_reason for f in fast] == [s.stop_reason for s in slow]


def test_dict_config_is_accepted(tiny, schema):
    from omegaconf import OmegaConf

    model, tok = tiny
    gcfg = OmegaConf.create({"max_new_tokens": 3, "temperature": 0.0})
    gen = Generator(model, tok, schema, gcfg)
    assert gen.settings.max_new_tokens == 3
    assert gen.generate(_prompt(schema, tok)).new_tokens <= 3


@pytest.mark.gpu
def test_fast_flag_on_cuda_matches_the_standard_path(tiny_lm_path, schema):
    """On a GPU, generate.fast=true wires in the compiled fast decoder: the same tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path, use_safetensors=True).cuda()
    prompts = [_prompt(schema, tok, "Short?"), _prompt(schema, tok, "A longer question here?")]
    slow = Generator(model, tok, schema, GenerateConfig(max_new_tokens=12), max_seq_length=512)
    fast = Generator(
        model, tok, schema, GenerateConfig(max_new_tokens=12, fast=True), max_seq_length=512
    )
    assert fast._fast is not None
    want = [r.token_ids for r in slow.generate_batch(prompts)]
    assert [fast.generate(p).token_ids for p in prompts] == want


def test_text_held_back_as_a_possible_stop_string_is_the_streams_last_piece(tokenizer, schema):
    """An answer that ends with the start of a stop string (the "#" of "C#", "### Instruction:"
    may follow): held back while the answer may still complete the stop, it is the last piece."""
    text = "The festival opens with an overture in C#"
    _, gen = _scripted(tokenizer, schema, text, max_new_tokens=60)
    prompt = _prompt(schema, tokenizer)
    stream = gen.stream(prompt)
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text == gen.generate(prompt).text
    assert all(pieces) and pieces[-1] == "#" and stream.result.stop_reason == "eos"


class BrokenLM(ScriptedLM):
    def generate(self, *args, **kwargs):
        raise RuntimeError("the model broke")


def test_a_failed_streamed_generation_raises_to_its_reader(tokenizer, schema):
    """An error in the worker thread reaches the thread reading the stream (it neither hangs
    nor gets an empty answer), and the generator is free for the next request."""
    model = BrokenLM([], tokenizer.eos_token_id)
    gen = Generator(model, tokenizer, schema, GenerateConfig(max_new_tokens=8))
    stream = gen.stream(_prompt(schema, tokenizer))
    caught: list[BaseException] = []

    def read() -> None:
        try:
            list(stream)
        except RuntimeError as e:
            caught.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert not reader.is_alive(), "the reader hangs: the streamer was never ended"
    assert [str(e) for e in caught] == ["the model broke"] and stream.result is None
    assert gen._lock.acquire(timeout=5)
    gen._lock.release()
