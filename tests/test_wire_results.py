"""Packed results and the one list framing: what routers read, what they never decode."""

from __future__ import annotations

import uuid

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.wire import (
    ActorName,
    MessageError,
    PackedResult,
    Result,
    ResultErrorDetails,
    TaskState,
    TaskTransition,
    pack,
    serialize,
)
from funcx_endpoint.wire.amp import ChunkedViews
from funcx_endpoint.wire.framing import (
    FramingError,
    ListDecoder,
    decode_list,
    decode_list_pieces,
    encode_list,
    join_pieces,
)
from funcx_endpoint.wire.results import read_result, transitions_json

# Text as users' results and errors hold it: any code point, lone surrogates too.
texts = st.text(st.characters(codec=None, exclude_categories=()), max_size=200)
transitions = st.builds(
    TaskTransition,
    st.integers(0, 2**63 - 1),
    st.sampled_from(list(TaskState)),
    st.sampled_from(list(ActorName)),
)
results = st.builds(
    Result,
    st.uuids().map(str),
    texts,
    st.none() | st.builds(ResultErrorDetails, texts, texts),
    st.none() | st.lists(transitions, max_size=5),
)


class PackedResultTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(results)
    def test_message_is_byte_identical_to_pack(self, result: Result) -> None:
        packed = PackedResult.from_result(result)
        self.assertEqual(packed.message(), pack(result))
        self.assertEqual(b"".join(packed.message_pieces()), pack(result))
        self.assertEqual(packed.message_size(), len(pack(result)))

    @settings(max_examples=200, deadline=None)
    @given(results)
    def test_encode_decode_roundtrip(self, result: Result) -> None:
        decoded = PackedResult.decode(PackedResult.from_result(result).encode())
        self.assertIsInstance(decoded.data, memoryview)  # the payload is not copied
        self.assertEqual(decoded.to_result(), result)
        self.assertEqual(read_result(PackedResult.from_result(result).encode()), result)

    @settings(max_examples=200, deadline=None)
    @given(results, st.lists(transitions, min_size=1, max_size=3))
    def test_added_transitions_come_first(self, result: Result, mine: list[TaskTransition]) -> None:
        packed = PackedResult.decode(PackedResult.from_result(result).encode())
        packed.add_transitions(mine)
        self.assertEqual(packed.to_result().task_statuses, mine + (result.task_statuses or []))

    def test_success_and_failure_match_result(self) -> None:
        task_id = str(uuid.uuid4())
        statuses = [TaskTransition.now(TaskState.RUNNING, ActorName.MANAGER)]
        data = serialize({"x": [1, 2, "é"]})
        self.assertEqual(
            PackedResult.success(task_id, data, statuses).message(),
            pack(Result.success(task_id, data, statuses)),
        )
        self.assertEqual(
            PackedResult.failure(task_id, "WorkerLost", "it died", None, statuses).message(),
            pack(Result.failure(task_id, "WorkerLost", "it died", task_statuses=statuses)),
        )
        failed = PackedResult.failure(task_id, "RemoteExecutionError", "ValueError: x", "tb")
        self.assertTrue(failed.is_error)
        self.assertFalse(PackedResult.success(task_id, data).is_error)
        self.assertEqual(failed.to_result().data, "tb")

    def test_a_whole_message_from_an_older_manager_is_read(self) -> None:
        result = Result.success(str(uuid.uuid4()), serialize(7))
        self.assertEqual(PackedResult.decode(pack(result)).to_result(), result)

    def test_malformed(self) -> None:
        task_id = str(uuid.uuid4()).encode()
        good = [task_id, b"null", b"null", b'"x"']
        self.assertEqual(PackedResult.decode(encode_list(good)).task_id, task_id.decode())
        cases = {
            "three parts": good[:3],
            "id not a uuid": [b"nope", *good[1:]],
            "details not an object": [task_id, b"[1]", b"null", b'"x"'],
            "statuses not an array": [task_id, b"null", b"{}", b'"x"'],
            "data not a string": [task_id, b"null", b"null", b"17"],
        }
        for name, items in cases.items():
            with self.assertRaises(MessageError, msg=name) as caught:
                PackedResult.decode(encode_list(items))
            if name not in ("three parts", "id not a uuid"):
                self.assertEqual(caught.exception.task_id, task_id.decode(), name)
        self.assertRaises(MessageError, PackedResult.decode, b"\x00\x00\x00\x09short")
        self.assertRaises(MessageError, PackedResult.decode, b"\x01not json")

    def test_transitions_json(self) -> None:
        t = TaskTransition(5, TaskState.RUNNING, ActorName.WORKER)
        self.assertEqual(
            transitions_json([t, t]),
            b'[{"timestamp":5,"state":"running","actor":"worker"},'
            b'{"timestamp":5,"state":"running","actor":"worker"}]',
        )


def _chunked(data: bytes, cuts: list) -> list:
    points = sorted({0, len(data), *[c % (len(data) + 1) for c in cuts]})
    return [data[a:b] for a, b in zip(points, points[1:])] or [b""]


class PiecesTests(SynchronousTestCase):
    """Items read across the chunks AMP delivers, without joining them."""

    @given(st.lists(st.binary(max_size=300), max_size=8), st.lists(st.integers(0, 10**6)))
    def test_items_across_chunks(self, items: list, cuts: list) -> None:
        chunks = _chunked(encode_list(items), cuts)
        found = decode_list_pieces(chunks)
        self.assertEqual([join_pieces(item) for item in found], items)

    @settings(max_examples=200, deadline=None)
    @given(results, st.lists(st.integers(0, 10**6), max_size=6))
    def test_packed_result_from_pieces(self, result: Result, cuts: list) -> None:
        encoded = encode_list([PackedResult.from_result(result).encode()])
        [item] = decode_list_pieces(_chunked(encoded, cuts))
        packed = PackedResult.decode(item)
        self.assertEqual(packed.message(), pack(result))
        self.assertEqual(packed.message_size(), len(pack(result)))
        self.assertEqual(PackedResult.decode(packed.encode()).to_result(), result)

    def test_a_large_result_is_never_joined(self) -> None:
        result = Result.success(str(uuid.uuid4()), serialize("x" * 300_000))
        strings: dict = {}
        ChunkedViews().toBox(
            b"results", strings, {"results": [PackedResult.from_result(result).encode()]}, None
        )
        self.assertGreater(len(strings), 4)
        objects: dict = {}
        ChunkedViews().fromBox(b"results", strings, objects, None)
        [item] = objects["results"]
        packed = PackedResult.decode(item)
        self.assertIsInstance(packed.data, list)  # views of what AMP received
        self.assertTrue(all(isinstance(piece, memoryview) for piece in packed.data))
        self.assertEqual(packed.message(), pack(result))

    def test_truncated_pieces(self) -> None:
        data = encode_list([b"hello", b"world"])
        for cut in range(1, len(data) - 1):
            if cut == 9:
                continue
            self.assertRaises(FramingError, decode_list_pieces, [data[:3], data[3:cut]])


class FramingTests(SynchronousTestCase):
    @given(st.lists(st.binary(max_size=300), max_size=20))
    def test_roundtrip(self, items: list[bytes]) -> None:
        data = encode_list(items)
        self.assertEqual(decode_list(data), items)
        self.assertEqual([bytes(v) for v in decode_list(data, views=True)], items)

    @given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=20), st.data())
    def test_stream_split_anywhere(self, items: list[bytes], data: st.DataObject) -> None:
        stream = encode_list(items)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
        decoder = ListDecoder()
        received = []
        start = 0
        for cut in [*cuts, len(stream)]:
            received += decoder.feed(stream[start:cut])
            start = cut
        self.assertEqual(received, items)
        self.assertEqual(decoder.pending, 0)

    def test_truncated(self) -> None:
        data = encode_list([b"hello", b"world"])
        for cut in range(1, len(data)):
            if cut in (9,):  # a whole first item: a valid shorter list
                continue
            self.assertRaises(FramingError, decode_list, data[:cut])

    def test_stream_refuses_empty_and_oversized_items(self) -> None:
        self.assertRaises(FramingError, ListDecoder().feed, b"\x00\x00\x00\x00")
        self.assertRaises(FramingError, ListDecoder(max_item=10).feed, b"\x00\x00\x01\x00")
