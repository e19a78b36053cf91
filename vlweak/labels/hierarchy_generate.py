"""Generated sub-class sets: ask a language model for "N kinds of {class}" (CHiLS, Sec. 3).

A :class:`SubclassGenerator` turns a prompt into text; :func:`parse_list` reads a list out of that
text; :func:`generate_hierarchy` asks for every class, caches the parsed answers in a JSON file and
returns the cleaned :class:`~vlweak.labels.LabelHierarchy`. Once the cache holds every class, a run
needs no model at all (``generator=None``) and is reproducible and offline.

Two generators ship:

* :class:`TransformersGenerator`: a local transformers causal LM given by a directory or hub id
  (greedy decoding, so answers are deterministic);
* :class:`OpenAICompatibleGenerator`: any OpenAI-compatible ``/chat/completions`` (or
  ``/completions``) endpoint given by URL, called with the standard library only.

Cache file format (JSON)::

    {"version": 1,
     "entries": {"<generator>|<n>|<prompt>": {"class": ..., "n": ..., "generator": ...,
                                             "prompt": ..., "response": ..., "subclasses": [...]}}}

``subclasses`` are the parsed, *uncleaned* names; cleaning is applied when the hierarchy is built.
"""

from __future__ import annotations

import abc
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlweak.labels.hierarchy import LabelHierarchy, normalize_name, two_level

DEFAULT_PROMPT = "List {n} different kinds of {classname}{context}. Answer with a numbered list, one per line."

_ITEM_PREFIX = re.compile(r"^\s*(?:\(?\d+[.):]|[-*•·]|[a-zA-Z][.)])\s*")
_ONE_LINE_SPLIT = re.compile(r";|&|,(?![^()]*\))")  # separators of a list written on one line


class GenerationError(RuntimeError):
    """A language model could not be reached or loaded, or a cache lacks an answer it must hold."""


def build_prompt(classname: str, n: int, template: str = DEFAULT_PROMPT, context: str = "") -> str:
    """The question for one class. ``context`` (e.g. ``"satellite image land use"``) is added as
    ``" (<context>)"`` when given."""
    return template.format(n=n, classname=classname, context=f" ({context})" if context else "")


def parse_list(text: str, n: int | None = None, max_words: int = 6) -> list[str]:
    """The items of a list in a language model's answer.

    Accepts numbered (``1.``, ``1)``), bulleted (``-``, ``*``) or one-per-line answers (an item per
    line: ``1. Mac & cheese`` is one item; a line ending with ``:`` is a lead-in), and single-line
    answers separated by commas, semicolons or ``&`` (a lead-in before ``:`` dropped: ``Here are 3
    kinds of pasta: spaghetti, penne``). Numbering, bullets, surrounding quotes and punctuation are
    removed; ``name: description`` keeps ``name``; items longer than ``max_words`` words (sentences,
    not names) and repeats are dropped. At most ``n`` items are returned.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        parts = [line for line in lines if not line.rstrip().endswith(":")]
    else:
        line = lines[0] if lines else ""
        _, colon, tail = line.partition(":")
        parts = _ONE_LINE_SPLIT.split(tail if colon and _ONE_LINE_SPLIT.search(tail) else line)
    items: list[str] = []
    seen: set[str] = set()
    for raw in parts:
        item = _ITEM_PREFIX.sub("", raw.strip())
        item = re.split(r"\s[-–—]\s|:", item, maxsplit=1)[0]  # "name - description" / "name: ..."
        item = " ".join(item.split()).strip(" .\"'`*_")
        if not item or len(item.split()) > max_words or not re.search(r"[^\W\d_]", item):
            continue
        key = normalize_name(item)
        if key in seen:
            continue
        seen.add(key)
        items.append(item)
        if n is not None and len(items) >= n:
            break
    return items


class SubclassGenerator(abc.ABC):
    """Something that answers a prompt with text."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Identifies the model in cache keys (model id, endpoint + model)."""

    @abc.abstractmethod
    def complete(self, prompt: str) -> str:
        """The model's answer to ``prompt``."""


class TransformersGenerator(SubclassGenerator):
    """A local transformers causal LM.

    Args:
        model: a directory with a saved model and tokenizer, or a hub id (loaded with
            ``local_files_only`` unless ``allow_download``).
        max_new_tokens: answer length limit.
        device: torch device for generation.
        use_chat_template: wrap the prompt as a user message when the tokenizer has a chat template.
        allow_download: let transformers fetch ``model`` from the hub.
    """

    def __init__(
        self,
        model: str,
        max_new_tokens: int = 96,
        device: str = "cpu",
        use_chat_template: bool = True,
        allow_download: bool = False,
    ) -> None:
        self.model_id = str(model)
        self.max_new_tokens = max_new_tokens
        self.device = device
        self.use_chat_template = use_chat_template
        self.allow_download = allow_download
        self._model = None
        self._tokenizer = None

    @property
    def name(self) -> str:
        return f"transformers:{self.model_id}"

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw = {"local_files_only": not self.allow_download}
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_id, **kw)
            self._model = AutoModelForCausalLM.from_pretrained(self.model_id, **kw).to(self.device).eval()
        except (OSError, ValueError) as err:
            raise GenerationError(
                f"cannot load causal LM {self.model_id!r} ({err}); pass a local directory holding a saved "
                "model and tokenizer, or allow_download=True where the hub is reachable"
            ) from err

    def complete(self, prompt: str) -> str:
        import torch

        self._load()
        tok, model = self._tokenizer, self._model
        if self.use_chat_template and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        else:
            text = prompt + "\n1."
        enc = tok(text, return_tensors="pt").to(self.device)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad
            )
        answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return "1." + answer if text.endswith("\n1.") else answer


class OpenAICompatibleGenerator(SubclassGenerator):
    """Any OpenAI-compatible completion endpoint.

    Args:
        url: the API base (``http://host:8000/v1``) or a full ``.../chat/completions`` or
            ``.../completions`` URL; a base gets ``/chat/completions``.
        model: the model name sent in the request.
        api_key: bearer token; default: the environment variable named by ``api_key_env``.
        api_key_env: where to read the key from when ``api_key`` is not given (none needed locally).
        temperature: sampling temperature (0 = as deterministic as the server allows).
        max_tokens: answer length limit.
        timeout: seconds per request.
    """

    def __init__(
        self,
        url: str,
        model: str,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 256,
        timeout: float = 60.0,
    ) -> None:
        url = url.rstrip("/")
        self.url = url if url.endswith("completions") else url + "/chat/completions"
        self.chat = self.url.endswith("/chat/completions")
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get(api_key_env)
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.timeout = timeout

    @property
    def name(self) -> str:
        return f"openai:{self.url}:{self.model}"

    def complete(self, prompt: str) -> str:
        body: dict[str, Any] = {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                data = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")[:300]
            raise GenerationError(f"{self.url} answered HTTP {err.code}: {detail}") from err
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as err:
            raise GenerationError(f"cannot get a completion from {self.url}: {err}") from err
        try:
            choice = data["choices"][0]
            return choice["message"]["content"] if self.chat else choice["text"]
        except (KeyError, IndexError, TypeError) as err:
            raise GenerationError(f"{self.url}: unexpected response shape {str(data)[:300]}") from err


class SubclassCache:
    """The JSON file of answers (see the module docstring); writes are atomic."""

    VERSION = 1

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("version") != self.VERSION:
                raise GenerationError(f"{self.path}: unsupported cache version {data.get('version')!r}")
            self.entries = data["entries"]

    @staticmethod
    def key(generator_name: str, n: int, prompt: str) -> str:
        return f"{generator_name}|{n}|{prompt}"

    def find(self, n: int, prompt: str, generator_name: str | None) -> dict[str, Any] | None:
        """The entry for ``(n, prompt)``: from ``generator_name``, or from any generator when None."""
        if generator_name is not None:
            return self.entries.get(self.key(generator_name, n, prompt))
        for entry in self.entries.values():
            if entry["n"] == n and entry["prompt"] == prompt:
                return entry
        return None

    def put(self, entry: dict[str, Any]) -> None:
        self.entries[self.key(entry["generator"], entry["n"], entry["prompt"])] = entry

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(
            json.dumps({"version": self.VERSION, "entries": self.entries}, indent=2, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )
        os.replace(tmp, self.path)


def generate_subclasses(
    classnames: Sequence[str],
    n: int = 10,
    generator: SubclassGenerator | None = None,
    cache: str | os.PathLike | None = None,
    template: str = DEFAULT_PROMPT,
    context: str = "",
    max_words: int = 6,
) -> dict[str, list[str]]:
    """Parsed (uncleaned) sub-class names per class, from the cache or the generator.

    With ``generator=None`` every answer must be in ``cache`` (any generator's); otherwise missing
    answers are generated and written to ``cache`` (when given) after each class.
    """
    store = SubclassCache(cache) if cache is not None else None
    out: dict[str, list[str]] = {}
    for classname in classnames:
        prompt = build_prompt(classname, n, template, context)
        entry = store.find(n, prompt, generator.name if generator else None) if store else None
        if entry is None:
            if generator is None:
                where = f"cache {store.path}" if store else "no cache"
                raise GenerationError(f"no generated sub-classes for {classname!r} (n={n}) in {where}; pass a generator")
            response = generator.complete(prompt)
            entry = {
                "class": classname,
                "n": n,
                "generator": generator.name,
                "prompt": prompt,
                "response": response,
                "subclasses": parse_list(response, n, max_words),
            }
            if store:
                store.put(entry)
                store.save()
        out[classname] = list(entry["subclasses"])
    return out


def generate_hierarchy(
    classnames: Sequence[str],
    n: int = 10,
    generator: SubclassGenerator | None = None,
    cache: str | os.PathLike | None = None,
    template: str = DEFAULT_PROMPT,
    context: str = "",
    clean: bool = True,
) -> LabelHierarchy:
    """A two-level hierarchy over ``classnames`` from generated sub-class sets, cleaned as CHiLS does
    (the class itself kept, the class name appended where missing; see
    :func:`~vlweak.labels.hierarchy_clean.clean_subclasses`). Without ``clean``, a class whose answer
    parsed to nothing keeps itself as its only sub-class."""
    from vlweak.labels.hierarchy_clean import clean_subclasses

    sets = generate_subclasses(classnames, n, generator, cache, template, context)
    if clean:
        tree = {c: clean_subclasses(c, subs) for c, subs in sets.items()}
    else:
        tree = {c: subs or [c] for c, subs in sets.items()}
    return two_level(tree, source=f"generated:{cache or 'memory'}")
