"""The OpenAI Python client against a running `moela serve` with the shipped model (scripts/test.sh starts
it): chat streamed and not, with `reasoning_content` and the right answer, `stop`, `max_tokens`, the usage
numbers, `/v1/models`, and an error as the client raises it.

    python3 scripts/test_serve.py http://127.0.0.1:PORT/v1
"""

import sys

import openai
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="none")
models = client.models.list().data
assert [m.id for m in models] == ["moela-arith-tiny"], models
model = models[0].id
question = [{"role": "user", "content": "What is 457 + 389?"}]

whole = client.chat.completions.create(model=model, messages=question, max_tokens=400)
message = whole.choices[0].message
assert message.content == "The answer is 846.", message
reasoning = message.model_extra["reasoning_content"]
assert "457 + 389 = 846" in reasoning, reasoning
assert whole.choices[0].finish_reason == "stop"
usage = whole.usage
assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage
assert 0 < usage.completion_tokens_details.reasoning_tokens < usage.completion_tokens, usage

parts = {"content": "", "reasoning_content": ""}
last = None
stream = client.chat.completions.create(
    model=model, messages=question, max_tokens=400, stream=True, stream_options={"include_usage": True}
)
for chunk in stream:
    last = chunk
    if chunk.choices:
        delta = chunk.choices[0].delta
        parts["content"] += delta.content or ""
        parts["reasoning_content"] += (delta.model_extra or {}).get("reasoning_content") or ""
assert parts == {"content": message.content, "reasoning_content": reasoning}, parts
assert last.usage.completion_tokens == usage.completion_tokens, last.usage
assert last.usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1, last.usage

short = client.chat.completions.create(model=model, messages=question, max_tokens=5)
assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 5, short
stopped = client.chat.completions.create(model=model, messages=question, max_tokens=400, stop=["answer"])
assert stopped.choices[0].message.content == "The ", stopped

try:
    client.chat.completions.create(model="not-this-one", messages=question)
    raise AssertionError("an unknown model was served")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body
try:
    client.chat.completions.create(model=model, messages=question, temperature=-1)
    raise AssertionError("a negative temperature was taken")
except openai.BadRequestError as e:
    assert e.body["param"] == "temperature", e.body

print("moela serve: the OpenAI client's checks passed")
