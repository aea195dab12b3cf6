"""carrot serve through the official OpenAI Python client.

Usage:  python tests/python/openai_client.py BASE_URL API_KEY

BASE_URL is the server's `http://host:port/v1`. Checks, exiting non-zero on the first failure:
the model list; a greedy answer with usage, seed and max_completion_tokens; the same answer
streamed (with stream_options.include_usage); logprobs with top_logprobs; n choices; a stop
string; and that a wrong key is refused with AuthenticationError.
"""

import sys

import openai

QUESTION = "What is in this picture?"


def main():
    base, key = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
    models = [m.id for m in client.models.list().data]
    assert len(models) == 1, models
    model = models[0]
    messages = [{"role": "user", "content": QUESTION}]

    whole = client.chat.completions.create(
        model=model, messages=messages, temperature=0, seed=7, max_completion_tokens=6
    )
    text = whole.choices[0].message.content
    assert whole.model == model and whole.object == "chat.completion", whole
    assert whole.usage.completion_tokens <= 6 and whole.usage.prompt_tokens > 0, whole.usage
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_completion_tokens=6, stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text, (streamed, text)
    usage = [c.usage for c in chunks if c.usage]
    assert len(usage) == 1 and usage[0].completion_tokens == whole.usage.completion_tokens, usage

    lp = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_completion_tokens=4, logprobs=True, top_logprobs=2
    )
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens, content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content), content

    many = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_completion_tokens=4, n=3
    )
    assert [c.index for c in many.choices] == [0, 1, 2], many.choices
    assert len({c.message.content for c in many.choices}) == 1, many.choices

    if len(text) > 2:
        stop = text[1:3]
        cut = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_completion_tokens=6, stop=[stop]
        )
        assert stop not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop", cut

    bad = openai.OpenAI(base_url=base, api_key="wrong", max_retries=0)
    try:
        bad.chat.completions.create(model=model, messages=messages, max_completion_tokens=1)
    except openai.AuthenticationError as e:
        assert e.status_code == 401
    else:
        raise AssertionError("a wrong API key was accepted")
    print(f"ok: {model}: {text!r}")


if __name__ == "__main__":
    main()
