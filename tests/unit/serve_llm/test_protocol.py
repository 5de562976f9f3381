"""Request validation: every bad field becomes a 400 in OpenAI's error shape that names it."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from fabric.serve.llm.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    from_validation_errors,
)

USER = [{"role": "user", "content": "x"}]


def _error(model: type, body: dict) -> OpenAIError:
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    return from_validation_errors(e.value.errors())


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        (ChatCompletionRequest, {"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        (
            ChatCompletionRequest,
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3},
            "temperature",
        ),
        (ChatCompletionRequest, {"model": "m", "messages": []}, "messages"),
        (ChatCompletionRequest, {"model": "m"}, "messages"),
        (CompletionRequest, {"model": "m", "prompt": "x", "max_tokens": -1}, "max_tokens"),
        (ChatCompletionRequest, {"model": "m", "messages": USER, "max_tokens": 0}, "max_tokens"),
        (CompletionRequest, {"model": "m", "prompt": "x", "logprobs": 21}, "logprobs"),
        (ChatCompletionRequest, {"model": "m", "messages": USER, "top_logprobs": -1}, "top_logprobs"),
        (CompletionRequest, {"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
        (CompletionRequest, {"model": "m", "prompt": "x", "n": 0}, "n"),
        (CompletionRequest, {"model": "m", "prompt": [1, "two"]}, "prompt"),
        (CompletionRequest, {"model": "m", "prompt": []}, "prompt"),
        (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
        (CompletionRequest, {"prompt": "x"}, "model"),
    ],
)
def test_invalid_fields_are_named(model: type, body: dict, param: str) -> None:
    err = _error(model, body)
    assert err.status == 400
    assert err.param == param
    assert err.message.startswith(param)
    payload = json.loads(err.body())
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["type"] == "invalid_request_error"


def test_stop_is_a_string_or_up_to_four_non_empty_strings() -> None:
    base = {"model": "m", "prompt": "x"}
    assert CompletionRequest.model_validate({**base, "stop": "\n"}).stop_list() == ["\n"]
    assert CompletionRequest.model_validate({**base, "stop": ["a", "b"]}).stop_list() == ["a", "b"]
    for stop, fragment in ((["a", "b", "c", "d", "e"], "at most 4"), ([""], "empty")):
        with pytest.raises(OpenAIError) as e:
            CompletionRequest.model_validate({**base, "stop": stop}).check()
        assert e.value.param == "stop" and fragment in e.value.message


def test_fields_this_server_does_not_implement_are_refused_not_ignored() -> None:
    base = {"model": "m", "prompt": "x"}
    CompletionRequest.model_validate({**base, "user": "u", "frequency_penalty": 0, "logprobs": 2, "echo": True}).check()
    refused = (
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"functions": [{"name": "f"}]},
        {"response_format": {"type": "json_object"}},
        {"suffix": "end"},
        {"logit_bias": {"50256": -100}},
        {"presence_penalty": 0.5},
        {"best_of": 3},
    )
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    for extra in refused:
        for request in (CompletionRequest.model_validate({**base, **extra}), ChatCompletionRequest(**chat, **extra)):
            with pytest.raises(OpenAIError) as e:
                request.check()
            assert e.value.status == 400 and e.value.param == next(iter(extra))
            assert e.value.code == "unsupported_parameter"


def test_logprob_fields_that_need_another() -> None:
    with pytest.raises(OpenAIError) as e:  # max_tokens 0 scores the prompt: only with echo
        CompletionRequest(model="m", prompt="x", max_tokens=0).check()
    assert e.value.param == "max_tokens" and "echo" in e.value.message
    CompletionRequest(model="m", prompt="x", max_tokens=0, echo=True, logprobs=1).check()
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(OpenAIError) as e:
        ChatCompletionRequest.model_validate({**chat, "top_logprobs": 2}).check()
    assert e.value.param == "top_logprobs"
    ChatCompletionRequest.model_validate({**chat, "top_logprobs": 2, "logprobs": True}).check()
    with pytest.raises(OpenAIError) as e:  # chat has no echo
        ChatCompletionRequest.model_validate({**chat, "echo": True}).check()
    assert e.value.param == "echo"


def test_token_id_prompts() -> None:
    assert CompletionRequest(model="m", prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(model="m", prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    assert CompletionRequest(model="m", prompt=["a", "b"]).prompts() == ["a", "b"]


def test_chat_token_limit_prefers_max_completion_tokens() -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}]}]
    r = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": msgs, "max_tokens": 5, "max_completion_tokens": 9}
    )
    assert r.token_limit() == 9
    assert r.messages[0].text() == "hello"


def test_invalid_json_is_a_400_saying_so() -> None:
    err = from_validation_errors(
        [{"type": "json_invalid", "loc": ("body", 1), "msg": "JSON decode error", "ctx": {"error": "Expecting value"}}]
    )
    assert err.status == 400 and "not valid JSON" in err.message and err.param is None
