"""llc serve: the OpenAI API over a build's devices, driven with the official openai client.

Ground truth is greedy decoding of the unsplit model (tests/helpers.Reference);
the build is tiny llama over 2 local devices with a chat template beside the model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from helpers import Reference, compiled_build, free_port
from llc.runtime.chat import ChatTemplate
from llc.runtime.coordinator import Coordinator, load_tokenizer
from models import tiny_llama

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s> {% endfor %}"
            "{% if add_generation_prompt %}<s>assistant{% endif %}")


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """tiny llama, copied beside a chat template, compiled for 2 devices with 2 requests in flight."""
    root = tmp_path_factory.mktemp("serve")
    model = root / "model" / "model.onnx"
    model.parent.mkdir()
    shutil.copyfile(tiny_llama("legacy"), model)
    (model.parent / "chat_template.jinja").write_text(TEMPLATE)
    return compiled_build(model, root / "build", 2, requests=2, eos_token_ids=[])


class Server:
    def __init__(self, build: Path, *args: str):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "llc.cli", "serve", str(build), "--port", str(self.port),
                                      *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            try:
                httpx.get(self.url + "/metrics", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("llc serve did not come up")

    def stop(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=20)
        return err.decode()


@pytest.fixture(scope="module")
def server(build):
    s = Server(build)
    yield s
    assert s.proc.poll() is None, "the server died during the tests"
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def truth(build):
    tok, ref = load_tokenizer(build), Reference(Path(build) / ".." / "model" / "model.onnx")
    chat = ChatTemplate.of_build(build, tok)

    def greedy_text(prompt_ids: list[int], n: int) -> str:
        return tok.decode(ref.greedy(prompt_ids, n), skip_special_tokens=True)

    def completion(text: str, n: int) -> str:
        return greedy_text(tok.encode(text).ids, n)

    def chat_answer(messages: list[dict], n: int) -> str:
        return greedy_text(tok.encode(chat.render(messages), add_special_tokens=False).ids, n)

    return completion, chat_answer


def test_models_lists_the_one_model(client):
    assert [m.id for m in client.models.list().data] == ["model"]


def test_completion_equals_unsplit_greedy(client, truth):
    r = client.completions.create(model="model", prompt="w5 w6 w7", max_tokens=12, temperature=0)
    assert r.choices[0].text == truth[0]("w5 w6 w7", 12)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 12, 16)


def test_streamed_chat_equals_unsplit_greedy_with_the_template(client, truth):
    messages = [{"role": "user", "content": "w40 w41 w42"}]
    chunks = list(client.chat.completions.create(model="model", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == truth[1](messages, 10)
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 10
    whole = client.chat.completions.create(model="model", messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.content == text and whole.choices[0].message.role == "assistant"


def test_stop_sequence_ends_the_answer(client, truth):
    full = truth[0]("w9", 12)
    stop = full.split()[3]
    r = client.completions.create(model="model", prompt="w9", max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_four_clients_at_once_each_get_their_own_answer(client, truth):
    prompts = ["w5 w6 w7", "w100 w101", "w7 w8 w9 w200", "w33"]
    got: dict[str, str] = {}

    def ask(p):
        got[p] = client.completions.create(model="model", prompt=p, max_tokens=8, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == {p: truth[0](p, 8) for p in prompts}


def test_seeded_sampling_repeats(client):
    a, b = (client.completions.create(model="model", prompt="w5", max_tokens=8, temperature=1.0, seed=7)
            .choices[0].text for _ in range(2))
    assert a == b


def test_a_client_that_goes_away_leaves_no_kv_cache(server, client, build):
    stream = client.completions.create(model="model", prompt="w5 w6", max_tokens=100, temperature=0, stream=True)
    for i, _ in zip(range(3), stream):
        pass
    stream.close()
    with Coordinator(build) as c:  # stats only: the server keeps its place as the devices' coordinator
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(s.active for s in c.stats()):
            time.sleep(0.2)
        assert [s.active for s in c.stats()] == [0, 0]


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b'{"model": "gpt-4", "prompt": "w5"}', 404, "model"),
    (b'{"prompt": "w5", "max_tokens": -1}', 400, "max_tokens"),
    (b'{"prompt": "w5", "n": 2}', 400, "n"),
    (b'{"prompt": ' + b'"' + b"w5 " * 200 + b'", "max_tokens": 20}', 400, "max_tokens"),
    (b'{"prompt": 5}', 400, "prompt"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client, truth, body, status, param):
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    assert client.completions.create(model="model", prompt="w5", max_tokens=3, temperature=0).choices[0].text \
        == truth[0]("w5", 3)


def test_metrics_count_requests_and_tokens(server, client):
    client.completions.create(model="model", prompt="w5", max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    assert 'llc_requests_total{endpoint="completions",status="200"}' in text
    assert "llc_generated_tokens_total" in text and "llc_time_to_first_token_seconds_count" in text


def test_api_key_and_full_queue(tmp_path):
    """--api-key: no key, 401. Two requests in flight and none may wait: the next one gets 429."""
    from openai import OpenAI, RateLimitError

    build = compiled_build(tiny_llama("legacy"), tmp_path / "build", 2, requests=2, eos_token_ids=[])
    s = Server(build, "--api-key", "sesame", "--queue", "0")
    try:
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "w5"}).status_code == 401
        client = OpenAI(base_url=s.url + "/v1", api_key="sesame", max_retries=0)
        model = client.models.list().data[0].id
        streams = [client.completions.create(model=model, prompt="w5", max_tokens=100, temperature=0, stream=True)
                   for _ in range(2)]  # the build reserved KV cache for 2
        for st in streams:
            next(iter(st))
        with pytest.raises(RateLimitError):
            client.completions.create(model=model, prompt="w6", max_tokens=3)
        for st in streams:
            st.close()
    finally:
        s.stop()


def test_llc_run_chat_uses_the_template(build, tmp_path):
    """`llc run --chat` sends the prompt as a user message laid out by the build's chat template."""
    model = Path(build).parent / "model" / "model.onnx"  # beside its chat template; other ports than the server's
    chat_build = compiled_build(model, tmp_path / "build", 2, requests=2, eos_token_ids=[])
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "llc.cli", "run", str(chat_build), "--chat", "--prompt", "w40 w41",
                           "--max-new-tokens", "6", "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    (r,) = json.loads(out.read_text())["results"]
    tok = load_tokenizer(chat_build)
    want = tok.encode(ChatTemplate.of_build(chat_build, tok).render([{"role": "user", "content": "w40 w41"}]),
                      add_special_tokens=False).ids
    assert r["prompt_ids"] == want and r["tokens"] == Reference(model).greedy(want, 6)
