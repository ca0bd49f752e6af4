"""Golden bytes pin every message's encoding; decode refuses anything malformed."""

import msgpack
import pytest

from allm.kernel import protocol as p
from allm.kernel.codes import Code

MESSAGES = {
    "hello": p.Hello(client="c1"),
    "req": p.Request(rid=7, op="chat", model="m", params={"max_tokens": 4}, timeout_ms=1500, stream=True),
    "req_blobs": p.Request(rid=8, op="transcribe", blobs=(b"RIFF", b"\x00\x01")),
    "req_tagged": p.Request(rid=9, op="chat", tag="req_1"),
    "cancel": p.Cancel(rid=7),
    "start": p.Started(rid=7),
    "chunk": p.Chunk(rid=7, seq=3, data={"text": "hi"}),
    "result": p.Result(rid=7, data={"finish": "stop"}, blobs=(b"PNG",)),
    "error": p.Error(rid=7, code=Code.MODEL_CORRUPT, message="bad file", reason="", param="model"),
    "hb": p.Heartbeat(
        pid=42,
        incarnation="abc",
        modality="text",
        instance=0,
        models=("smollm2",),
        active=1,
        queued=2,
        capacity=17,
        memory_bytes=1024,
        draining=False,
        extra={},
    ),
    "bye": p.Bye(seq=2),
}

# Changing any of these bytes changes the wire: bump protocol.VERSION and update them.
GOLDEN = {
    "hello": [
        "83a17603a16ba568656c6c6fa6636c69656e74a26331",
    ],
    "req": [
        (
            "88a17603a16ba3726571a372696407a26f70a463686174a56d6f64656ca16da6706172616d7381aa6d61785f746f6b65"
            "6e7304aa74696d656f75745f6d73cd05dca673747265616dc3"
        ),
    ],
    "req_blobs": [
        (
            "89a17603a16ba3726571a372696408a26f70aa7472616e736372696265a56d6f64656ca0a6706172616d7380aa74696d"
            "656f75745f6d7300a673747265616dc2a16e02"
        ),
        "52494646",
        "0001",
    ],
    "req_tagged": [
        (
            "89a17603a16ba3726571a372696409a26f70a463686174a56d6f64656ca0a6706172616d7380aa74696d656f75745f6d"
            "7300a673747265616dc2a3746167a57265715f31"
        ),
    ],
    "cancel": [
        "83a17603a16ba663616e63656ca372696407",
    ],
    "start": [
        "83a17603a16ba57374617274a372696407",
    ],
    "chunk": [
        "85a17603a16ba56368756e6ba372696407a373657103a46461746181a474657874a26869",
    ],
    "result": [
        "85a17603a16ba6726573756c74a372696407a46461746181a666696e697368a473746f70a16e01",
        "504e47",
    ],
    "error": [
        (
            "87a17603a16ba56572726f72a372696407a4636f646503a76d657373616765a86261642066696c65a6726561736f6ea0"
            "a5706172616da56d6f64656c"
        ),
    ],
    "hb": [
        (
            "8da17603a16ba26862a37069642aab696e6361726e6174696f6ea3616263a86d6f64616c697479a474657874a8696e73"
            "74616e636500a66d6f64656c7391a7736d6f6c6c6d32a661637469766501a671756575656402a8636170616369747911"
            "ac6d656d6f72795f6279746573cd0400a8647261696e696e67c2a5657874726180"
        ),
    ],
    "bye": [
        "83a17603a16ba3627965a373657102",
    ],
}


def test_golden_bytes_pin_every_message_kind():
    kinds = {type(m) for m in MESSAGES.values()}
    assert kinds == set(p.Message.__args__)  # type: ignore[attr-defined]
    for name, msg in MESSAGES.items():
        assert [f.hex() for f in p.encode(msg)] == GOLDEN[name], name


@pytest.mark.parametrize("name", list(MESSAGES))
def test_decode_inverts_encode(name):
    msg = MESSAGES[name]
    assert p.decode(p.encode(msg)) == msg


def _head(**fields):
    return msgpack.packb({"v": p.VERSION, **fields})


@pytest.mark.parametrize(
    ("frames", "reason", "needle"),
    [
        ([], "bad_frame", "empty"),
        ([b"\xc1garbage"], "bad_frame", "not msgpack"),
        ([msgpack.packb([1, 2])], "bad_frame", "not a map"),
        ([msgpack.packb({"v": 99, "k": "hello", "client": "x"})], "bad_version", "version 99"),
        ([msgpack.packb({"k": "hello", "client": "x"})], "bad_version", "version None"),
        ([_head(k="bogus")], "bad_frame", "unknown message kind 'bogus'"),
        ([_head(k="cancel")], "bad_frame", "lacks field 'rid'"),
        ([_head(k="cancel", rid="7")], "bad_frame", "field 'rid' is str"),
        ([_head(k="cancel", rid=True)], "bad_frame", "field 'rid' is bool"),
        ([_head(k="error", rid=1, code=42, message="", reason="", param="")], "bad_frame", "code 42"),
        ([_head(k="error", rid=1, code=0, message="", reason="", param="")], "bad_frame", "code 0 (OK)"),
        ([_head(k="cancel", rid=1), b"extra"], "bad_frame", "0 blobs, 1 arrived"),
        ([_head(k="result", rid=1, data={}, n=2), b"one"], "bad_frame", "2 blobs, 1 arrived"),
        (
            [
                _head(
                    k="req", rid=1, op="chat", model="", params={}, timeout_ms=0, stream=False, tag="x" * 129
                )
            ],
            "bad_frame",
            "field 'tag' must be printable and at most 128",
        ),
        (
            [_head(k="req", rid=1, op="chat", model="", params={}, timeout_ms=0, stream=False, tag="a\nb")],
            "bad_frame",
            "field 'tag' must be printable",
        ),
        (
            [_head(k="req", rid=1, op="chat", model="", params={}, timeout_ms=0, stream=False, tag=7)],
            "bad_frame",
            "field 'tag' is int",
        ),
    ],
)
def test_decode_refuses_malformed_frames(frames, reason, needle):
    with pytest.raises(p.ProtocolError) as info:
        p.decode(frames)
    assert info.value.reason == reason
    assert needle in info.value.message


def test_protocol_error_keeps_the_request_id_it_could_read():
    with pytest.raises(p.ProtocolError) as info:
        p.decode([_head(k="req", rid=5, op=3)])
    assert info.value.rid == 5


def test_chunk_fast_paths_match_the_general_codec():
    chunk = p.Chunk(rid=9, seq=4, data={"text": "é"})
    assert p.encode_chunk(9, 4, {"text": "é"}) == p.encode(chunk)
    assert p.decode(p.encode_chunk(9, 4, {"text": "é"})) == chunk


@pytest.mark.parametrize(
    "head",
    [
        {"v": 2, "k": "chunk", "rid": 1, "seq": "0", "data": {}},
        {"v": 2, "k": "chunk", "rid": 1, "seq": 0, "data": []},
        {"v": 2, "k": "chunk", "rid": True, "seq": 0, "data": {}},
        {"v": 1, "k": "chunk", "rid": 1, "seq": 0, "data": {}},
    ],
)
def test_malformed_chunks_do_not_slip_through_the_fast_path(head):
    with pytest.raises(p.ProtocolError):
        p.decode([msgpack.packb(head)])
