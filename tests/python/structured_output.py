"""Structured output through the official OpenAI Python client.

Usage:  python tests/python/structured_output.py BASE_URL

BASE_URL is the server's `http://host:port/v1`. With `client.chat.completions.parse` and a
Pydantic model (the client sends `response_format: json_schema`, strict), sampled answers under
several seeds must finish with `stop`, parse into the model, and validate against the schema the
client sent (checked with `jsonschema`); a greedy `json_object` answer must be a JSON object when
it finishes. Exits non-zero on the first failure.
"""

import json
import sys
from typing import Literal

import jsonschema
import openai
import pydantic
from openai.lib._pydantic import to_strict_json_schema


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=6)
    kind: Literal["cat", "dog", "rabbit"]
    age: int = pydantic.Field(ge=0, le=30)
    vaccinated: bool
    toys: list[Literal["ball", "rope", "carrot"]] = pydantic.Field(max_length=2)


def main():
    base = sys.argv[1]
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Describe a pet as JSON."}]
    schema = to_strict_json_schema(Pet)
    answers = []
    for seed in range(6):
        completion = client.chat.completions.parse(
            model=model, messages=messages, response_format=Pet, temperature=1.0, seed=seed,
            max_completion_tokens=400,
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", (seed, choice)
        assert isinstance(choice.message.parsed, Pet), (seed, choice.message)
        jsonschema.validate(json.loads(choice.message.content), schema)
        answers.append(choice.message.content)
    assert len(set(answers)) > 1, answers

    streamed = client.chat.completions.create(
        model=model, messages=messages, temperature=1.0, seed=3, max_completion_tokens=400,
        stream=True, response_format={"type": "json_schema", "json_schema": {"name": "Pet", "schema": schema}},
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    jsonschema.validate(json.loads(text), schema)

    obj = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_completion_tokens=200,
        response_format={"type": "json_object"},
    )
    content = obj.choices[0].message.content
    assert content.lstrip().startswith("{"), content
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict), content

    try:
        client.chat.completions.create(
            model=model, messages=messages, max_completion_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}},
        )
    except openai.BadRequestError as e:
        assert e.status_code == 400 and "response_format" in str(e), e
    else:
        raise AssertionError("an unusable schema was accepted")
    print(f"ok: {model}: {answers[0]}")


if __name__ == "__main__":
    main()
