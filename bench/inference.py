"""One measurement of the agent path for bench/inference.sh: a streamed chat completion
over HTTP (SSE) through the agent's plugin chain and engine, with a prompt of about 128
tokens and exactly GEN_TOKENS generated (`ignore_eos`).

The client is deliberately light (httpx, the HTTP library the `openai` package is built
on, reading raw SSE lines): on a 2-core machine a heavier client would take CPU from
llama.cpp's two threads and measure itself rather than the agent. The official `openai`
client drives the same API in the agent's tests.

Prompt speed = prompt tokens / time to the first streamed token; generation speed =
(generated tokens - 1) / time from the first to the last streamed token.

Usage: inference.py BASE_URL MODEL; prints `pp_tps tg_tps prompt_tokens completion_tokens`.
"""
import json
import sys
import time

import httpx2 as httpx  # the HTTP client the openai package ships with

base, model = sys.argv[1], sys.argv[2]
GEN_TOKENS = 64
text = ("The lighthouse keeper walked the stairs each evening, counting the steps, checking the lamp, "
        "and writing the weather into a worn book. ") * 4 + "Continue the story."
body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": GEN_TOKENS,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
first = last = None
usage = None
with httpx.Client(timeout=300) as client:
    started = time.perf_counter()
    with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            now = time.perf_counter()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if '"content":"' in line and '"content":""' not in line:
                first = first or now
                last = now
            elif '"usage":{' in line:
                usage = json.loads(line[6:])["usage"]
if usage is None or first is None or usage["completion_tokens"] != GEN_TOKENS:
    sys.exit(f"unexpected stream: usage={usage}")
print(f"{usage['prompt_tokens'] / (first - started):.2f} {(usage['completion_tokens'] - 1) / (last - first):.2f} "
      f"{usage['prompt_tokens']} {usage['completion_tokens']}")
