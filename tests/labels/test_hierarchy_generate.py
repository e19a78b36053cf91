"""Generated sub-class sets: parsing, a tiny local causal LM, a fake OpenAI-compatible endpoint,
and the JSON cache that makes reruns offline."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from vlweak.labels.hierarchy_generate import (
    GenerationError,
    OpenAICompatibleGenerator,
    SubclassGenerator,
    TransformersGenerator,
    build_prompt,
    generate_hierarchy,
    generate_subclasses,
    parse_list,
)


def test_parse_list_shapes():
    assert parse_list("1. Dolphin\n2) whale\n3. Sea otter - a small mammal\n4. whale\n") == ["Dolphin", "whale", "Sea otter"]
    assert parse_list("- oak\n* pine\n• birch: a tree") == ["oak", "pine", "birch"]
    assert parse_list("apple, pear; plum & fig", n=3) == ["apple", "pear", "plum"]
    assert parse_list('"red fox", "arctic fox (white)"') == ["red fox", "arctic fox (white)"]
    long = "1. this is a whole sentence rather than a name of a kind\n2. ok"
    assert parse_list(long) == ["ok"]
    assert parse_list("1.\n2. 42\n\n") == []
    # an item per line keeps its "&"; a lead-in before the list is not an item
    assert parse_list("1. Mac & cheese\n2. lasagna") == ["Mac & cheese", "lasagna"]
    assert parse_list("Here are 3 kinds of pasta: spaghetti, penne, fusilli") == ["spaghetti", "penne", "fusilli"]
    assert parse_list("Here are some kinds of pasta:\n- spaghetti\n- penne") == ["spaghetti", "penne"]


class Canned(SubclassGenerator):
    def __init__(self, answer: str) -> None:
        self.answer, self.calls = answer, []

    @property
    def name(self) -> str:
        return "canned"

    def complete(self, prompt: str) -> str:
        self.calls.append(prompt)
        return self.answer


def test_cache_makes_reruns_offline(tmp_path):
    cache = tmp_path / "subclasses.json"
    gen = Canned("1. dolphin\n2. whale\n3. clownfish")
    h = generate_hierarchy(["aquatic mammals", "fish"], n=3, generator=gen, cache=cache)
    assert len(gen.calls) == 2 and "3 different kinds of aquatic mammals" in gen.calls[0]
    assert h.subclasses_of("aquatic mammals") == ["aquatic mammals", "dolphin aquatic mammals", "whale aquatic mammals", "clownfish aquatic mammals"]
    assert h.subclasses_of("fish") == ["fish", "dolphin fish", "whale fish", "clownfish"]
    data = json.loads(cache.read_text())
    assert data["version"] == 1 and len(data["entries"]) == 2
    # rerun: no generator needed, same hierarchy
    assert generate_hierarchy(["aquatic mammals", "fish"], n=3, cache=cache).as_dict() == h.as_dict()
    # the same generator again: answered from the cache, no call
    generate_hierarchy(["fish"], n=3, generator=gen, cache=cache)
    assert len(gen.calls) == 2
    with pytest.raises(GenerationError, match="birds"):
        generate_subclasses(["birds"], n=3, cache=cache)
    assert generate_hierarchy(["fish"], n=3, cache=cache, clean=False).subclasses == ["dolphin", "whale", "clownfish"]


# ----------------------------------------------------------------------------- tiny local LM
WORDS = ["1", "2", "3", ".", "dolphin", "whale", "shark", "tuna", "kinds", "of", "fish", "list", "different",
         "answer", "with", "a", "numbered", "one", "per", "line", "aquatic", "mammals", "\n"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]", pad_token="[EOS]")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(vocab), n_positions=128, n_embd=16, n_layer=1, n_head=2,
                     bos_token_id=1, eos_token_id=1)
    path = tmp_path_factory.mktemp("tiny-lm")
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_transformers_generator_plumbing(tiny_lm, tmp_path):
    gen = TransformersGenerator(str(tiny_lm), max_new_tokens=12)
    assert gen.name == f"transformers:{tiny_lm}"
    text = gen.complete(build_prompt("fish", 3))
    assert isinstance(text, str) and text.startswith("1.")
    assert text == gen.complete(build_prompt("fish", 3))  # greedy: deterministic
    cache = tmp_path / "lm.json"
    h = generate_hierarchy(["fish", "aquatic mammals"], n=3, generator=gen, cache=cache)
    # a random LM says nothing sensible; what it says is parsed, cleaned and cached
    for parent in h.parents:
        subs = h.subclasses_of(parent)
        assert subs[0] == parent and 1 <= len(subs) <= 4
        assert all(parent in s for s in subs)
    entries = json.loads(cache.read_text())["entries"]
    assert {e["generator"] for e in entries.values()} == {gen.name}
    assert generate_hierarchy(["fish", "aquatic mammals"], n=3, cache=cache).as_dict() == h.as_dict()


def test_transformers_generator_missing_model(tmp_path):
    with pytest.raises(GenerationError, match="local directory"):
        TransformersGenerator(str(tmp_path / "nowhere")).complete("x")


# ----------------------------------------------------------------------------- fake endpoint
class _Handler(BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, dict(self.headers), body))
        if body.get("model") == "broken":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"boom")
            return
        if self.path.endswith("/chat/completions"):
            what = body["messages"][0]["content"].split("kinds of ")[1].split(".")[0]
            reply = {"choices": [{"message": {"role": "assistant", "content": f"1. big {what}\n2. small {what}\n3. Rock"}}]}
        else:
            reply = {"choices": [{"text": "oak, pine, birch"}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def endpoint():
    _Handler.requests = []
    server = HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def test_openai_compatible_chat(endpoint, tmp_path):
    gen = OpenAICompatibleGenerator(endpoint, model="tiny-chat", api_key="sk-test")
    h = generate_hierarchy(["bird", "tree"], n=3, generator=gen, cache=tmp_path / "c.json")
    path, headers, body = _Handler.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "tiny-chat" and body["temperature"] == 0.0
    assert body["messages"][0]["content"] == build_prompt("bird", 3)
    assert h.subclasses_of("bird") == ["bird", "big bird", "small bird", "Rock bird"]
    n = len(_Handler.requests)
    generate_hierarchy(["bird", "tree"], n=3, generator=gen, cache=tmp_path / "c.json")
    assert len(_Handler.requests) == n  # cached


def test_openai_compatible_completions_and_errors(endpoint, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    gen = OpenAICompatibleGenerator(endpoint + "/completions", model="tiny")
    assert gen.complete("trees?") == "oak, pine, birch"
    path, headers, body = _Handler.requests[-1]
    assert path == "/v1/completions" and "Authorization" not in headers and body["prompt"] == "trees?"
    with pytest.raises(GenerationError, match="HTTP 500"):
        OpenAICompatibleGenerator(endpoint, model="broken").complete("x")
    with pytest.raises(GenerationError, match="cannot get a completion"):
        OpenAICompatibleGenerator("http://127.0.0.1:9/v1", model="m", timeout=2).complete("x")


def test_a_generated_subclass_named_like_another_class_stays_that_class():
    gen = Canned("1. red grape\n2. grapefruit")
    h = generate_hierarchy(["grape", "grapefruit"], n=2, generator=gen)
    assert h.parents == ["grape", "grapefruit"] and "grapefruit" not in h.subclasses_of("grape")
    assert h.subclasses_of("grapefruit")[0] == "grapefruit"
