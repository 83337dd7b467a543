"""Chat with `moela serve` through the official OpenAI Python client: one answer streamed with its reasoning
apart, then a follow-up turn, which the server answers from the same slot's cache.

    moela serve                       # in another terminal (cargo run --release -p moela-cli -- serve)
    pip install openai
    python3 examples/openai_client.py [BASE_URL]      # default http://127.0.0.1:8080/v1
"""

import sys

from openai import OpenAI

base_url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080/v1"
# moela serve asks for no key; the client insists on having one.
client = OpenAI(base_url=base_url, api_key="none")
model = client.models.list().data[0].id

messages = [{"role": "user", "content": "What is 2 + 3?"}]
stream = client.chat.completions.create(model=model, messages=messages, stream=True)
answer = ""
for chunk in stream:
    delta = chunk.choices[0].delta
    # Like DeepSeek's own API, moela streams the text inside <think> as `reasoning_content`, beside `content`
    # (an extra field, so it is read with getattr).
    reasoning = getattr(delta, "reasoning_content", None)
    if reasoning:
        print(reasoning, end="", flush=True)
    if delta.content:
        answer += delta.content
        print(delta.content, end="", flush=True)
print()

# The next turn repeats the conversation so far: the server finds it in a slot's latent cache and prefills
# only the new message (`cached_tokens`).
messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "What is 4 + 4?"}]
reply = client.chat.completions.create(model=model, messages=messages, max_tokens=400)
print(reply.choices[0].message.content)
details = reply.usage.prompt_tokens_details
print(f"[{reply.usage.prompt_tokens} prompt tokens, {details.cached_tokens} of them cached; "
      f"{reply.usage.completion_tokens} generated]")
