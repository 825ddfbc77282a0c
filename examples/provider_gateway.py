"""A provider puts the gateway in front of its model, as in README's "Deploy" section, with the real commands.

1. Create two API keys in the gateway's store: `acme` (the gateway's default policy) and `beta`, a tier that
   sees answers only. Each key is printed once; only its hash is stored.
2. Start `distill-guard gateway` on loopback with a per-account watermark (its master secret from the
   environment, never the lab's) and the audit log in SQLite.
3. Clients use the official `openai` SDK: acme sees the reasoning, beta's stream carries none of it, and both
   are billed the same tokens.
4. Read the audit log with `distill-guard detect --log sqlite:///…`.

    python examples/provider_gateway.py [--port 8766]
"""

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

from eval.reference.world import reference_task

CLI = str(Path(sys.executable).parent / "distill-guard")


def cli(*args: str, env: dict | None = None) -> str:
    done = subprocess.run([CLI, *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"distill-guard {args[0]} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def wait_until_healthy(url: str, gateway: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if gateway.poll() is not None:
            sys.exit(f"the gateway exited:\n{gateway.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz").json()["status"] == "ok":
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    sys.exit("the gateway did not become healthy")


def main(port: int) -> None:
    store = f"sqlite:///{Path(tempfile.mkdtemp()) / 'gateway.db'}"

    # 1. Keys: `keys create` prints the key alone on stdout, this once.
    acme = cli("keys", "create", "--store", store, "--account", "acme", "--rpm", "600").strip()
    beta = cli("keys", "create", "--store", store, "--account", "beta", "--policy", "answer-only").strip()
    print(cli("keys", "list", "--store", store))

    # 2. The gateway, with a master secret of the provider's own (here a fresh one).
    env = {**os.environ, "DISTILL_GUARD_WATERMARK_KEY": secrets.token_urlsafe(32)}
    gateway = subprocess.Popen([CLI, "gateway", "--teacher", "reference", "--store", store, "--defense", "watermark",
                                "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, gateway)

        # 3. Clients, with the official SDK.
        question = reference_task().eval_items[0].prompt
        asked = dict(model="teacher-a", messages=[{"role": "user", "content": question}], temperature=0,
                     max_tokens=64)
        answer = openai.OpenAI(base_url=f"{url}/v1", api_key=acme).chat.completions.create(**asked)
        print(f"acme sees:  {answer.choices[0].message.content!r} ({answer.usage.completion_tokens} tokens billed)")
        stream = openai.OpenAI(base_url=f"{url}/v1", api_key=beta).chat.completions.create(
            **asked, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        print(f"beta sees:  {text!r} ({chunks[-1].usage.completion_tokens} tokens billed, streamed)")
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)

    # 4. The audit log, read directly by the detector (fitted here on the lab's simulated benign users).
    print(cli("detect", "--log", store, "--lab"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8766)
    main(parser.parse_args().port)
