"""Agent building blocks without I/O: reconnect backoff, saved credentials, SSE parsing."""

from __future__ import annotations

import itertools
import json
import os
import random
import stat

import pytest

from agent import credentials as store
from agent.backoff import backoff_delays, is_retryable
from agent.credentials import Credentials
from wire import iter_sse_data

# -- backoff --------------------------------------------------------------------


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def test_full_jitter_bounds_grow_exponentially():
    base, cap = 0.5, 30.0
    samples = [take(backoff_delays(base, cap, random.Random(seed)), 8) for seed in range(300)]
    for attempt in range(8):
        bound = min(cap, base * 2**attempt)
        column = [s[attempt] for s in samples]
        assert all(0 <= d <= bound for d in column)
        # Full jitter: the whole range [0, bound] is used, not just its top.
        assert min(column) < 0.2 * bound
        assert max(column) > 0.8 * bound


def test_backoff_is_capped():
    delays = take(backoff_delays(0.5, 3.0, random.Random(1)), 200)
    assert all(0 <= d <= 3.0 for d in delays)
    assert max(delays[50:]) > 2.0  # stays near the cap, does not collapse or overflow


def test_backoff_never_overflows():
    delays = backoff_delays(1.0, 30.0, random.Random(2))
    for d in take(delays, 2000):
        assert 0 <= d <= 30.0


def test_backoff_is_the_documented_uniform_draw():
    rng, reference = random.Random(42), random.Random(42)
    got = take(backoff_delays(0.5, 30.0, rng), 10)
    expected = [reference.uniform(0, min(30.0, 0.5 * 2**n)) for n in range(10)]
    assert got == expected


def test_a_new_generator_starts_over():
    rng = random.Random(7)
    first = backoff_delays(1.0, 30.0, rng)
    take(first, 6)  # well into the backoff: bound 32 -> capped at 30
    fresh = backoff_delays(1.0, 30.0, rng)
    assert [d <= b for d, b in zip(take(fresh, 3), (1.0, 2.0, 4.0), strict=False)] == [True] * 3


@pytest.mark.parametrize("status, close_code, retry", [
    (401, None, False),
    (403, None, False),
    (None, 4001, False),  # unsupported protocol version
    (None, 4003, False),  # unauthorized / instance deleted
    (None, None, True),
    (500, None, True),
    (502, None, True),
    (503, None, True),
    (429, None, True),
    (None, 1000, True),
    (None, 1001, True),  # relay going away
    (None, 1006, True),  # connection lost
    (None, 1011, True),
    (None, 4008, True),  # heartbeat timeout
    (None, 4009, True),  # replaced
])
def test_is_retryable(status, close_code, retry):
    assert is_retryable(status=status, close_code=close_code) is retry


# -- credentials ------------------------------------------------------------------


def creds(relay="http://relay.example:8080", iid="abc123"):
    return Credentials(relay_url=relay, instance_id=iid, agent_token=f"ira_secret_{iid}",
                       chat_url=f"{relay}/api/chat/{iid}")


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_credentials_saved_0600_and_reloaded(tmp_path):
    path = tmp_path / "config" / "agent.json"
    saved = creds()
    store.save(path, saved)
    assert mode(path) == 0o600
    assert store.load(path, saved.relay_url) == saved
    assert [p.name for p in path.parent.iterdir()] == ["agent.json"]  # no temp file left behind


def test_credentials_become_0600_even_if_the_file_was_readable(tmp_path):
    path = tmp_path / "agent.json"
    path.write_text("{}")
    os.chmod(path, 0o644)
    store.save(path, creds())
    assert mode(path) == 0o600


def test_credentials_are_keyed_by_relay_url(tmp_path):
    path = tmp_path / "agent.json"
    a, b = creds("http://a:1", "aaa"), creds("https://b.example", "bbb")
    store.save(path, a)
    store.save(path, b)
    assert store.load(path, "http://a:1") == a
    assert store.load(path, "https://b.example") == b
    assert store.load(path, "https://b.example/") == b  # trailing slash is the same relay
    assert store.load(path, "http://c:1") is None
    # Re-registering on one relay replaces only that relay's entry.
    a2 = creds("http://a:1", "aaa2")
    store.save(path, a2)
    assert store.load(path, "http://a:1") == a2
    assert store.load(path, "https://b.example") == b
    assert set(json.loads(path.read_text())) == {"http://a:1", "https://b.example"}


@pytest.mark.parametrize("content", ["", "not json", "[]", '{"http://a:1": "x"}', '{"http://a:1": {"relay_url": 1}}'])
def test_unreadable_credentials_are_ignored(tmp_path, content):
    path = tmp_path / "agent.json"
    path.write_text(content)
    assert store.load(path, "http://a:1") is None
    store.save(path, creds("http://a:1"))  # and a broken file is replaced, not fatal
    assert store.load(path, "http://a:1") == creds("http://a:1")


def test_missing_credentials_file(tmp_path):
    assert store.load(tmp_path / "nope.json", "http://a:1") is None


# -- SSE parsing --------------------------------------------------------------------


def parse(*feeds: bytes) -> list[bytes]:
    buffer = bytearray()
    out: list[bytes] = []
    for data in feeds:
        out += iter_sse_data(buffer, data)
    return out


def bytewise(stream: bytes) -> list[bytes]:
    return parse(*(stream[i : i + 1] for i in range(len(stream))))


STREAMS = {
    "lf": b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n',
    "crlf": b'data: {"a":1}\r\n\r\ndata: {"b":2}\r\n\r\ndata: [DONE]\r\n\r\n',
    "cr": b'data: {"a":1}\r\rdata: {"b":2}\r\rdata: [DONE]\r\r',
}


@pytest.mark.parametrize("name", STREAMS)
def test_sse_line_endings(name):
    assert parse(STREAMS[name]) == [b'{"a":1}', b'{"b":2}', b"[DONE]"]


@pytest.mark.parametrize("name", STREAMS)
def test_sse_split_across_feeds(name):
    stream = STREAMS[name]
    expected = [b'{"a":1}', b'{"b":2}', b"[DONE]"]
    assert bytewise(stream) == expected
    for cut in range(len(stream) + 1):
        assert parse(stream[:cut], stream[cut:]) == expected, cut


def test_sse_incomplete_event_waits_for_the_blank_line():
    buffer = bytearray()
    assert iter_sse_data(buffer, b'data: {"a":1}\n') == []
    assert iter_sse_data(buffer, b"\n") == [b'{"a":1}']
    assert buffer == b""


def test_sse_comments_and_other_fields_are_ignored():
    stream = b": keep-alive\n\nevent: message\nid: 7\nretry: 100\ndata: x\n\n:comment\ndata: y\n\n"
    assert parse(stream) == [b"x", b"y"]
    assert bytewise(stream) == [b"x", b"y"]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_sse_multi_line_data_is_joined_with_lf(eol):
    stream = b"data: first" + eol + b"data:second" + eol + b"data:  third" + eol + eol
    assert parse(stream) == [b"first\nsecond\n third"]
    assert bytewise(stream) == [b"first\nsecond\n third"]


def test_sse_mixed_line_endings():
    stream = b"data: a\r\n\ndata: b\n\r\ndata: c\r\n\r\n"
    assert parse(stream) == [b"a", b"b", b"c"]
    assert bytewise(stream) == [b"a", b"b", b"c"]


def test_sse_only_one_leading_space_is_stripped_and_colons_are_kept():
    assert parse(b'data: {"url": "http://x"}\n\n') == [b'{"url": "http://x"}']
    assert parse(b"data:no-space\n\n") == [b"no-space"]
