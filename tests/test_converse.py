"""SwiftChat's /api/converse <-> OpenAI chat: exact translations both ways, every refusal with its path."""

from __future__ import annotations

import base64
import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import wire
from relay.doors.converse import (
    ConverseStream,
    InvalidConverse,
    StreamFailed,
    UnsupportedContent,
    converse_request,
    openai_messages,
)

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(256))).decode()


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def user(*blocks):
    return {"role": "user", "content": list(blocks)}


def image(fmt="png", data=PNG):
    return {"image": {"format": fmt, "source": {"bytes": data}}}


def document(fmt, data, name="notes"):
    return {"document": {"format": fmt, "name": name, "source": {"bytes": data}}}


def body(messages, **extra):
    return {"messages": messages, "modelId": "anthropic.claude-3-5-sonnet", "region": "us-west-2", **extra}


# ---------------------------------------------------------------- requests


def test_text_only_message_is_a_string():
    assert openai_messages([user({"text": "hi"})]) == [{"role": "user", "content": "hi"}]


def test_conversation_keeps_roles_and_order():
    messages = [user({"text": "a"}), {"role": "assistant", "content": [{"text": "b"}]}, user({"text": "c"})]
    assert openai_messages(messages) == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]


def test_several_text_blocks_join_with_blank_lines():
    assert openai_messages([user({"text": "one"}, {"text": "two"})]) == [
        {"role": "user", "content": "one\n\ntwo"}
    ]


def test_empty_text_is_kept():
    # The app sends {"text": ""} next to an image when the user typed nothing.
    assert openai_messages([user({"text": ""})]) == [{"role": "user", "content": ""}]


def test_system_blocks_become_one_leading_system_message():
    out = openai_messages([user({"text": "hi"})], [{"text": "Be brief."}, {"text": "Answer in French."}])
    assert out == [
        {"role": "system", "content": "Be brief.\n\nAnswer in French."},
        {"role": "user", "content": "hi"},
    ]


@pytest.mark.parametrize("system", [None, []])
def test_no_system_message_without_system_blocks(system):
    assert openai_messages([user({"text": "hi"})], system) == [{"role": "user", "content": "hi"}]


def test_image_is_a_data_uri_part_exactly():
    out = openai_messages([user({"text": "what is this?"}, image("png", "iVBORw0KGgo="))])
    assert out == [{
        "role": "user",
        "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ],
    }]


@pytest.mark.parametrize("fmt, subtype", [
    ("png", "png"), ("jpeg", "jpeg"), ("jpg", "jpeg"), ("gif", "gif"), ("webp", "webp"), ("JPG", "jpeg"),
])
def test_image_formats(fmt, subtype):
    [message] = openai_messages([user(image(fmt))])
    assert message["content"] == [{"type": "image_url", "image_url": {"url": f"data:image/{subtype};base64,{PNG}"}}]


def test_image_base64_passes_through_untouched():
    data = b64(bytes(range(256)) * 3)
    for padded in (data, b64(b"ab"), b64(b"abc"), b64(b"abcd")):
        [message] = openai_messages([user(image("png", padded))])
        assert message["content"][0]["image_url"]["url"] == "data:image/png;base64," + padded


@pytest.mark.parametrize("fmt", ["txt", "md", "csv", "html", "TXT"])
def test_text_documents_are_decoded_into_a_text_part(fmt):
    [message] = openai_messages([user({"text": "summarise"}, document(fmt, b64("a,b\n1,2\n"), "data"))])
    assert message == {
        "role": "user",
        "content": f'summarise\n\nDocument "data" ({fmt.lower()}):\na,b\n1,2\n',
    }


def test_text_document_multibyte_and_bom():
    [message] = openai_messages([user(document("md", b64("\ufeff# Привет 👋\n"), "readme"))])
    assert message["content"] == 'Document "readme" (md):\n# Привет 👋\n'


def test_document_next_to_an_image_is_a_text_part():
    [message] = openai_messages([user(document("txt", b64("hello")), image())])
    assert message["content"] == [
        {"type": "text", "text": 'Document "notes" (txt):\nhello'},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}},
    ]


def test_document_in_an_assistant_message_is_text():
    out = openai_messages([{"role": "assistant", "content": [document("txt", b64("x"))]}])
    assert out == [{"role": "assistant", "content": 'Document "notes" (txt):\nx'}]


@pytest.mark.parametrize("fmt", ["pdf", "doc", "docx", "xls", "xlsx"])
def test_binary_documents_are_refused_with_the_block_path(fmt):
    messages = [user({"text": "a"}), {"role": "assistant", "content": [{"text": "b"}]},
                user({"text": "read this"}, document(fmt, b64(b"%PDF-1.7 ...")))]
    with pytest.raises(UnsupportedContent) as info:
        openai_messages(messages)
    assert info.value.path == "messages.2.content.1"
    assert "takes text and images" in info.value.message
    assert "send the document as text" in info.value.message
    assert str(info.value).startswith("messages.2.content.1: ")
    assert isinstance(info.value, InvalidConverse) and isinstance(info.value, ValueError)


def test_video_is_refused_with_the_block_path():
    video = {"video": {"format": "mp4", "source": {"bytes": b64(b"\x00\x00\x00\x18ftyp")}}}
    with pytest.raises(UnsupportedContent) as info:
        openai_messages([user({"text": "watch"}, video)])
    assert info.value.path == "messages.0.content.1"
    assert "video" in info.value.message and "takes text and images" in info.value.message


def test_document_that_is_not_utf8_is_refused():
    with pytest.raises(UnsupportedContent) as info:
        openai_messages([user(document("txt", b64(b"caf\xe9")))])
    assert info.value.path == "messages.0.content.0"
    assert "UTF-8" in info.value.message


@pytest.mark.parametrize("kind", ["toolUse", "toolResult", "reasoningContent", "guardContent", "cachePoint", "what"])
def test_other_block_kinds_are_refused(kind):
    with pytest.raises(UnsupportedContent) as info:
        openai_messages([user({"text": "x"}, {kind: {}})])
    assert info.value.path == "messages.0.content.1"
    assert repr(kind) in info.value.message


def test_image_in_an_assistant_message_is_refused():
    with pytest.raises(UnsupportedContent) as info:
        openai_messages([user({"text": "x"}), {"role": "assistant", "content": [image()]}])
    assert info.value.path == "messages.1.content.0"


def test_system_blocks_other_than_text_are_refused():
    with pytest.raises(UnsupportedContent) as info:
        openai_messages([user({"text": "x"})], [{"text": "a"}, {"cachePoint": {"type": "default"}}])
    assert info.value.path == "system.1"


MALFORMED = [
    # (messages, system, path)
    ("not a list", None, "messages"),
    ([user({"text": "x"})], "be brief", "system"),
    ([user({"text": "x"})], [{"text": 3}], "system.0.text"),
    ([user({"text": "x"})], ["be brief"], "system.0"),
    (["hi"], None, "messages.0"),
    ([{"content": [{"text": "x"}]}], None, "messages.0.role"),
    ([{"role": "system", "content": [{"text": "x"}]}], None, "messages.0.role"),
    ([{"role": "tool", "content": [{"text": "x"}]}], None, "messages.0.role"),
    ([{"role": "user", "content": "hi"}], None, "messages.0.content"),
    ([{"role": "user", "content": []}], None, "messages.0.content"),
    ([{"role": "user"}], None, "messages.0.content"),
    ([user("hi")], None, "messages.0.content.0"),
    ([user({})], None, "messages.0.content.0"),
    ([user({"text": "x", "image": {}})], None, "messages.0.content.0"),
    ([user({"text": None})], None, "messages.0.content.0.text"),
    ([user({"text": ["x"]})], None, "messages.0.content.0.text"),
    ([user({"image": "png"})], None, "messages.0.content.0.image"),
    ([user({"image": {"source": {"bytes": PNG}}})], None, "messages.0.content.0.image.format"),
    ([user(image("bmp"))], None, "messages.0.content.0.image.format"),
    ([user({"image": {"format": "png"}})], None, "messages.0.content.0.image.source"),
    ([user({"image": {"format": "png", "source": {}}})], None, "messages.0.content.0.image.source.bytes"),
    ([user({"image": {"format": "png", "source": {"bytes": [1]}}})], None, "messages.0.content.0.image.source.bytes"),
    ([user(image("png", ""))], None, "messages.0.content.0.image.source.bytes"),
    ([user(image("png", "abc"))], None, "messages.0.content.0.image.source.bytes"),  # length % 4
    ([user(image("png", "ab!d"))], None, "messages.0.content.0.image.source.bytes"),  # alphabet
    ([user(image("png", "a-_b"))], None, "messages.0.content.0.image.source.bytes"),  # URL-safe alphabet
    ([user(image("png", "ab=d"))], None, "messages.0.content.0.image.source.bytes"),  # padding inside
    ([user(image("png", "a==="))], None, "messages.0.content.0.image.source.bytes"),  # too much padding
    ([user(image("png", "abcd\nabcd"))], None, "messages.0.content.0.image.source.bytes"),  # line breaks
    ([user(image("png", "data:image/png;base64,AAAA"))], None, "messages.0.content.0.image.source.bytes"),
    ([user({"document": "notes.txt"})], None, "messages.0.content.0.document"),
    ([user(document("rtf", b64("x")))], None, "messages.0.content.0.document.format"),
    ([user({"document": {"format": "txt", "source": {"bytes": b64("x")}}})], None,
     "messages.0.content.0.document.name"),
    ([user(document("txt", "%%%%"))], None, "messages.0.content.0.document.source.bytes"),
    ([user({"text": "ok"}), user({"text": "ok"}, 7)], None, "messages.1.content.1"),
]


@pytest.mark.parametrize("messages, system, path", MALFORMED, ids=lambda x: x if isinstance(x, str) else None)
def test_malformed_shapes_name_their_path(messages, system, path):
    with pytest.raises(InvalidConverse) as info:
        openai_messages(messages, system)
    assert type(info.value) is InvalidConverse
    assert info.value.path == path
    assert info.value.message and str(info.value) == f"{path}: {info.value.message}"


def test_converse_request_returns_the_model_id_and_messages():
    model, messages = converse_request(body([user({"text": "hi"})], system=[{"text": "s"}], enableThinking=True))
    assert model == "anthropic.claude-3-5-sonnet"
    assert messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]


def test_converse_request_accepts_what_the_app_sends():
    # The app leaves system out (undefined) when there is no prompt, and may send nulls.
    raw = json.dumps({"messages": [user({"text": "hi"})], "modelId": "m", "region": "us-east-1",
                      "enableThinking": None, "system": None})
    assert converse_request(json.loads(raw)) == ("m", [{"role": "user", "content": "hi"}])
    assert converse_request({"messages": [user({"text": "hi"})], "modelId": "m"})[0] == "m"


BAD_BODIES = [
    ([], ""),
    ("text", ""),
    ({"messages": [user({"text": "x"})]}, "modelId"),
    (body([user({"text": "x"})], modelId=""), "modelId"),
    (body([user({"text": "x"})], modelId=7), "modelId"),
    (body([user({"text": "x"})], region=1), "region"),
    (body([user({"text": "x"})], enableThinking="yes"), "enableThinking"),
    (body([]), "messages"),
    (body(None), "messages"),
    ({"modelId": "m"}, "messages"),
    (body([user({"text": "x"})], system={"text": "s"}), "system"),
    (body([user({"text": "x"}), user({"bogus": 1})]), "messages.1.content.0"),
]


@pytest.mark.parametrize("request_body, path", BAD_BODIES)
def test_converse_request_refuses_bad_bodies(request_body, path):
    with pytest.raises(InvalidConverse) as info:
        converse_request(request_body)
    assert info.value.path == path
    assert str(info.value) == (f"{path}: {info.value.message}" if path else info.value.message)


def test_errors_are_value_errors():
    assert issubclass(UnsupportedContent, InvalidConverse) and issubclass(InvalidConverse, ValueError)


# ---------------------------------------------------------------- answers


def event(obj) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def chunk(delta=None, finish=None, usage=None, choices=True, index=0):
    obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    obj["choices"] = [{"index": index, "delta": delta or {}, "finish_reason": finish}] if choices else []
    if usage is not None:
        obj["usage"] = usage
    return event(obj)


USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}


def openai_stream(texts, usage=USAGE):
    """What the agent sends for one answer: role chunk, content chunks, finish, usage, [DONE]."""
    parts = [chunk({"role": "assistant", "content": ""})]
    parts += [chunk({"content": text}) for text in texts]
    parts.append(chunk(finish="stop"))
    if usage is not None:
        parts.append(chunk(usage=usage, choices=False))
    parts.append(wire.SSE_DONE)
    return b"".join(parts)


def test_whole_stream_in_one_feed():
    stream = ConverseStream()
    assert stream.feed(openai_stream(["Hel", "lo", "!"])) == b"Hello!"
    assert stream.finish() == b'\n{"inputTokens": 12, "outputTokens": 3, "totalTokens": 15}'


def test_one_event_per_feed():
    stream = ConverseStream()
    out = [stream.feed(chunk({"role": "assistant"})), stream.feed(chunk({"content": "a"})),
           stream.feed(chunk({"content": "b"})), stream.feed(chunk(finish="stop")),
           stream.feed(chunk(usage=USAGE, choices=False)), stream.feed(wire.SSE_DONE)]
    assert out == [b"", b"a", b"b", b"", b"", b""]


def test_finish_matches_json_dumps_byte_for_byte():
    stream = ConverseStream()
    stream.feed(openai_stream(["x"], usage={"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}))
    usage = {"inputTokens": 7, "outputTokens": 1, "totalTokens": 8}
    assert stream.finish() == ("\n" + json.dumps(usage)).encode()
    assert stream.usage == usage and list(stream.usage) == ["inputTokens", "outputTokens", "totalTokens"]
    # what the app looks for in the last read
    assert stream.finish().startswith(b'\n{"inputTokens":') and stream.finish().endswith(b"}")


def test_without_usage_output_tokens_count_content_deltas():
    stream = ConverseStream()
    assert stream.feed(openai_stream(["a", "b", "", "c"], usage=None)) == b"abc"
    assert stream.finish() == b'\n{"inputTokens": 0, "outputTokens": 3, "totalTokens": 3}'


def test_partial_usage_is_completed():
    stream = ConverseStream()
    stream.feed(openai_stream(["a", "b"], usage={"prompt_tokens": 5, "completion_tokens": None, "total_tokens": True}))
    assert stream.usage == {"inputTokens": 5, "outputTokens": 2, "totalTokens": 7}


def test_running_usage_on_every_chunk_keeps_the_last():
    stream = ConverseStream()
    payload = b"".join(
        chunk({"content": "t"}, usage={"prompt_tokens": 4, "completion_tokens": n, "total_tokens": 4 + n})
        for n in range(1, 4)
    ) + chunk(finish="stop", usage=None)
    assert stream.feed(payload) == b"ttt"
    assert stream.usage == {"inputTokens": 4, "outputTokens": 3, "totalTokens": 7}


def test_null_usage_on_ordinary_chunks_is_ignored():
    stream = ConverseStream()
    stream.feed(event({"choices": [{"index": 0, "delta": {"content": "a"}}], "usage": None}))
    assert stream.usage == {"inputTokens": 0, "outputTokens": 1, "totalTokens": 1}


def test_reasoning_role_and_other_choices_write_nothing():
    stream = ConverseStream()
    payload = (chunk({"role": "assistant"}) + chunk({"reasoning_content": "let me think"})
               + chunk({"content": "other"}, index=1) + chunk({"content": None}) + chunk({"tool_calls": []})
               + event({"choices": [{"index": 0}]}) + event({"choices": ["junk", {"index": 0, "delta": "junk"}]})
               + event({"object": "chat.completion.chunk"}) + chunk({"content": "answer"}))
    assert stream.feed(payload) == b"answer"
    assert stream.usage["outputTokens"] == 1


def test_comments_and_keepalives_are_ignored():
    stream = ConverseStream()
    assert stream.feed(b": keep-alive\n\n" + chunk({"content": "a"}) + b": ping\n\n") == b"a"


def test_events_after_done_are_ignored():
    stream = ConverseStream()
    assert stream.feed(chunk({"content": "a"}) + wire.SSE_DONE + chunk({"content": "late"})) == b"a"


def test_event_split_across_feeds():
    payload = chunk({"content": "split"})
    for cut in range(1, len(payload)):
        stream = ConverseStream()
        assert stream.feed(payload[:cut]) + stream.feed(payload[cut:]) == b"split"


def test_multibyte_text_split_inside_a_character():
    payload = chunk({"content": "żółw 🐢"}) + chunk({"content": "日本"})
    cut = payload.index("🐢".encode()) + 2  # in the middle of the emoji's four bytes
    stream = ConverseStream()
    first, second = stream.feed(payload[:cut]), stream.feed(payload[cut:])
    assert first == b"" and second.decode() == "żółw 🐢日本"


def test_crlf_events():
    stream = ConverseStream()
    assert stream.feed(b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\r\n\r\n') == b"a"


def test_error_object_fails_the_stream_with_its_message():
    stream = ConverseStream()
    assert stream.feed(chunk({"content": "partial"})) == b"partial"
    with pytest.raises(StreamFailed) as info:
        stream.feed(event({"error": {"message": "model crashed", "type": "server_error"}}))
    assert info.value.message == "model crashed" and info.value.text == b""
    assert stream.error(info.value.message) == b"Error: model crashed"


def test_text_before_an_error_in_the_same_payload_is_kept():
    stream = ConverseStream()
    with pytest.raises(StreamFailed) as info:
        stream.feed(chunk({"content": "so far "}) + event({"error": "overloaded"}) + chunk({"content": "never"}))
    assert info.value.text == b"so far " and info.value.message == "overloaded"
    # the stream stays failed
    with pytest.raises(StreamFailed) as again:
        stream.feed(chunk({"content": "more"}))
    assert again.value.message == "overloaded" and again.value.text == b""


@pytest.mark.parametrize("data, message", [
    (b"data: {not json\n\n", "not JSON"),
    (b"data: [1, 2]\n\n", "not a JSON object"),
    (b'data: {"error": {"code": 500}}\n\n', "the model failed"),
])
def test_broken_chunks_fail_the_stream(data, message):
    with pytest.raises(StreamFailed) as info:
        ConverseStream().feed(data)
    assert message in info.value.message


def test_error_bytes():
    assert ConverseStream.error("boom") == b"Error: boom"
    assert ConverseStream().error("ça a échoué") == "Error: ça a échoué".encode()


def test_empty_stream_finishes_with_zero_usage():
    stream = ConverseStream()
    assert stream.feed(b"") == b""
    assert stream.finish() == b'\n{"inputTokens": 0, "outputTokens": 0, "totalTokens": 0}'


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(st.text(max_size=20), max_size=12), data=st.data())
def test_any_split_of_the_stream_yields_the_concatenation(texts, data):
    payload = openai_stream(texts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(payload)), max_size=10)))
    pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    stream = ConverseStream()
    assert b"".join(stream.feed(piece) for piece in pieces) == "".join(texts).encode()
    assert stream.finish() == b'\n{"inputTokens": 12, "outputTokens": 3, "totalTokens": 15}'


@pytest.mark.parametrize("role", [[], {}, ["user"], 1, None])
def test_a_role_that_is_not_a_string_is_invalid(role):
    # A list or object role was looked up in a frozenset: TypeError, and /api/converse answered 500.
    with pytest.raises(InvalidConverse):
        openai_messages([{"role": role, "content": [{"text": "x"}]}])
