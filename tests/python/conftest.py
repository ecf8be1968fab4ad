"""Starts the real parlance binary (built by cargo) on a free loopback port for the SDK suite.

The server exits when this process goes away: its standard input is a pipe we hold."""

import os
import pathlib
import re
import subprocess
import tempfile
import threading

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = "smollm2"
ADMIN_TOKEN = "adm-sdk-test"


def _binary() -> str:
    b = os.environ.get("PARLANCE_BIN", str(ROOT / "target" / "debug" / "parlance"))
    assert os.path.exists(b), f"{b} is missing: build with `cargo build -p parlance` first"
    return b


def _model_path() -> str:
    base = os.environ.get("PARLANCE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "parlance"
    )
    p = os.path.join(base, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.exists(p), f"default model missing at {p}: run `parlance pull`"
    return p


@pytest.fixture(scope="session")
def server():
    args = [_binary(), "serve", "--addr", "127.0.0.1:0", "--exit-on-stdin-eof",
            "--model", f"{MODEL}={_model_path()}", "--api-key", "sk-sdk-test",
            "--admin-token", ADMIN_TOKEN]
    proc, base = _start_parlance(args, _env(tempfile.mkdtemp(prefix="parlance-sdk-")))
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture()
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server + "/v1", api_key="sk-sdk-test", max_retries=0)


def _env(data_dir: str) -> dict:
    """The server's environment: a database of its own in `data_dir`, no keys or services
    inherited from the caller's."""
    env = dict(os.environ, RUST_LOG="info", PARLANCE_DATA_DIR=data_dir)
    for var in ("PARLANCE_API_KEYS", "PARLANCE_DATABASE_URL", "PARLANCE_REDIS_URL"):
        env.pop(var, None)
    return env


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_parlance(args, env):
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    base = None
    for line in proc.stderr:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            base = m.group(1)
            break
    assert base, "server did not start"
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc, base


@pytest.fixture(scope="session")
def gateway():
    """parlance in front of the mock upstream (the tests' Rust mock, built as an example):
    `gpt` is served by the OpenAI-compatible mock, `claude` and `claude-tools` by its Anthropic
    Messages endpoint."""
    mock_bin = os.environ.get("PARLANCE_MOCK_UPSTREAM",
                              str(ROOT / "target" / "debug" / "examples" / "mock_upstream"))
    assert os.path.exists(mock_bin), f"{mock_bin} is missing: cargo build -p parlance --example mock_upstream"
    port = _free_port()
    mock = subprocess.Popen([mock_bin, f"127.0.0.1:{port}"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, text=True)
    assert "mock upstream at" in mock.stdout.readline()
    work = tempfile.mkdtemp(prefix="parlance-gw-")
    cfg = os.path.join(work, "parlance.toml")
    with open(cfg, "w") as f:
        f.write(f"""
[[providers]]
name = "mock"
kind = "openai"
base_url = "http://127.0.0.1:{port}/v1"
api_key = "sk-up"

[[providers]]
name = "claude"
kind = "anthropic"
base_url = "http://127.0.0.1:{port}/v1"
api_key = "sk-up"

[[models]]
name = "gpt"
deployments = [{{ provider = "mock", model = "fail500" }}, {{ provider = "mock", model = "ok" }}]

[[models]]
name = "thinker"
deployments = [{{ provider = "mock", model = "think" }}]

[[models]]
name = "gpt-tools"
deployments = [{{ provider = "mock", model = "tools" }}]

[[models]]
name = "claude"
deployments = [{{ provider = "claude", model = "claude-ok" }}]

[[models]]
name = "claude-tools"
deployments = [{{ provider = "claude", model = "claude-tools" }}]
""")
    proc, base = _start_parlance([_binary(), "serve", "--addr", "127.0.0.1:0", "--exit-on-stdin-eof",
                                  "--config", cfg], _env(work))
    yield base
    proc.terminate()
    proc.wait(timeout=30)
    mock.terminate()
    mock.wait(timeout=10)
