"""`vlprune serve` starts vLLM's OpenAI-compatible server with the plugin: it answers a chat request with an image,
its usage shows the pruned prompt length, and its log each image's tokens before and after; a method the family
cannot serve stops the server at start-up, before the engine starts, with the reason as its last line."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from vlprune.testing.images import make_test_image

KEEP = 9
VLLM_OPTIONS = [
    "--dtype",
    "float32",
    "--enforce-eager",
    "--max-model-len",
    "1024",
    "--kv-cache-memory-bytes",
    "134217728",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(folder, method: str, port: int, log) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if key != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    command = [sys.executable, "-m", "vlprune.cli", "serve", "--model", str(folder), "--method", method]
    command += ["--keep", str(KEEP), "--port", str(port), "--", *VLLM_OPTIONS]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait_ready(server: subprocess.Popen, port: int, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError("the server did not become ready")


def _chat(port: int, image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = {
        "model": _model_name(port),
        "max_tokens": 4,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}],
            }
        ],
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def _model_name(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as response:
        return json.load(response)["data"][0]["id"]


def test_the_server_answers_with_the_pruned_prompt(qwen, scratch):
    _, processor, folder = qwen
    port = _free_port()
    log_path = scratch / "server.log"
    with open(log_path, "w") as log:
        server = _serve(folder, "divprune", port, log)
        try:
            _wait_ready(server, port)
            answer = _chat(port, make_test_image(4, 48))
        finally:
            server.terminate()
            server.wait(timeout=60)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    text_tokens = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) - 1  # less the image's pad
    assert answer["usage"]["prompt_tokens"] == text_tokens + KEEP  # of the 36 tokens of a 48 x 48 image
    assert answer["choices"][0]["message"]["content"] is not None
    assert "vlprune divprune: 1 image(s), visual tokens 36 -> 9" in log_path.read_text()


def test_a_method_the_family_cannot_serve_stops_the_server_at_start_up(qwen, scratch):
    _, _, folder = qwen
    with open(scratch / "refused.log", "w") as log:
        server = _serve(folder, "fastervlm", _free_port(), log)
        assert server.wait(timeout=120) != 0
    lines = (scratch / "refused.log").read_text().strip().splitlines()
    assert "vlprune.errors.VlpruneError: vlprune: method 'fastervlm' needs the vision tower's [CLS] token" in lines[-1]
    assert not any("EngineCore" in line for line in lines)  # refused before the engine started


@pytest.mark.parametrize("method", ["fastv", "flowcut"])
def test_serve_refuses_methods_that_prune_elsewhere_before_starting_vllm(qwen, method):
    _, _, folder = qwen
    result = subprocess.run(
        [sys.executable, "-m", "vlprune.cli", "serve", "--model", str(folder), "--method", method, "--keep", "9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "vlprune cannot serve" in result.stderr
