"""One measurement of the agent path for bench/inference.sh: a streamed chat completion
through the official `openai` client (HTTP, the plugin chain, the engine), with a prompt
of about PROMPT_TOKENS tokens and exactly GEN_TOKENS generated (`ignore_eos`).

Prompt speed = prompt tokens / time to the first streamed token; generation speed =
(generated tokens - 1) / time from the first to the last streamed token.

Usage: inference.py BASE_URL MODEL; prints `pp_tps tg_tps prompt_tokens completion_tokens`.
"""
import sys
import time

import openai

base, model = sys.argv[1], sys.argv[2]
GEN_TOKENS = 64
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
# About 128 tokens once the chat template is applied.
text = ("The lighthouse keeper walked the stairs each evening, counting the steps, checking the lamp, "
        "and writing the weather into a worn book. ") * 4 + "Continue the story."
started = time.perf_counter()
first = last = None
usage = None
for c in client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                        max_tokens=GEN_TOKENS, temperature=0, stream=True,
                                        stream_options={"include_usage": True},
                                        extra_body={"ignore_eos": True}):
    now = time.perf_counter()
    if c.choices and c.choices[0].delta.content:
        first = first or now
        last = now
    if c.usage:
        usage = c.usage
if usage is None or first is None or usage.completion_tokens != GEN_TOKENS:
    sys.exit(f"unexpected stream: usage={usage}")
print(f"{usage.prompt_tokens / (first - started):.2f} {(usage.completion_tokens - 1) / (last - first):.2f} "
      f"{usage.prompt_tokens} {usage.completion_tokens}")
