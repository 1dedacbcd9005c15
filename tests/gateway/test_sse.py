from lmserve.gateway.sse import EventSplitter, StreamTransform, event_payload, has_usage, parse_usage


def test_splitter_keeps_only_the_incomplete_tail() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: {\"a\": 1}\n\ndata: {\"b\"") == [b'data: {"a": 1}']
    assert splitter.pending == b'data: {"b"'
    assert splitter.feed(b": 2}\r\n\r\n: comment\r\n\r\n") == [b'data: {"b": 2}', b": comment"]
    assert splitter.pending == b""


def test_usage_detection_and_parsing() -> None:
    assert has_usage(b'data: {"choices": [], "usage": {"prompt_tokens": 3}}')
    assert not has_usage(b'data: {"choices": [1], "usage": null}')
    payload = event_payload(b'data: {"usage": {"prompt_tokens": 3, "completion_tokens": 4, '
                            b'"prompt_tokens_details": {"cached_tokens": 2}}}')
    assert parse_usage(payload) == (3, 4, 2)
    assert event_payload(b"data: [DONE]") is None and event_payload(b"data: {bad") is None


def test_strip_usage_drops_the_extra_chunk_only() -> None:
    transform = StreamTransform(strip_usage=True, redactor=None)
    usage_only = b'data: {"choices": [], "usage": {"prompt_tokens": 1}}'
    assert transform.apply(usage_only, event_payload(usage_only)) is None
    mixed = b'data: {"choices": [{"index": 0}], "usage": {"prompt_tokens": 1}}'
    assert transform.apply(mixed, event_payload(mixed)) == b'data: {"choices":[{"index":0}]}'
    plain = b'data: {"choices": [{"index": 0}], "usage": null}'
    assert transform.apply(plain, event_payload(plain)) is plain


def _relay_output(chunks: list[bytes], strip_usage: bool) -> tuple[bytes, object]:
    import asyncio

    from lmserve.gateway.proxy import ProxyResult, _StreamRelay

    sent: list[bytes] = []

    async def send(message: dict) -> None:
        sent.append(message["body"])

    result = ProxyResult()
    relay = _StreamRelay(send, StreamTransform(strip_usage, None) if strip_usage else None, result)

    async def run() -> None:
        for chunk in chunks:
            await relay.push(chunk)
        await relay.finish()

    asyncio.run(run())
    return b"".join(sent), result.usage


def test_relay_under_any_chunking() -> None:
    import random

    events = [b'data: {"choices": [{"index": 0, "delta": {"content": "x%d"}}], "usage": null}' % i for i in range(5)]
    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}}'
    stream = b"\n\n".join([*events, usage, b"data: [DONE]"]) + b"\n\n"
    without_usage = b"\n\n".join([*events, b"data: [DONE]"]) + b"\n\n"
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(0, 12)))
        chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
        for strip in (False, True):
            out, counted = _relay_output(chunks, strip)
            assert out == (without_usage if strip else stream)
            assert counted == (3, 5, 0)
