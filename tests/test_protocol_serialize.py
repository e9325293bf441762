"""funcx_endpoint.wire.serialize: funcX 1.0 serialization and packed buffers."""

from __future__ import annotations

import base64
import functools
import pickle
import sys
import time
from typing import Any

import dill
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from funcx_endpoint.wire import (
    DeserializationError,
    ErrorCode,
    SerializationError,
    Serializer,
    deserialize,
    pack_buffers,
    pack_function,
    pack_payload,
    pack_task_buffer,
    serialize,
    split_task_buffer,
    unpack_buffers,
    unpack_task_buffer,
)
from funcx_endpoint.wire.serialize import LAMBDA_NAME

# --- Test vectors written by the real funcx 1.0.13 SDK (dill 0.3.5.1, Python 3.11) ---

# serialize(add) for ``def add(a, b=1):\n    return a + b\n``: a pickled ('add', source).
REAL_04_ADD = "04\ngASVLgAAAAAAAACMA2FkZJSMImRlZiBhZGQoYSwgYj0xKToKICAgIHJldHVybiBhICsgYgqUhpQu\n"
REAL_ARGS = "00\ngASVBQAAAAAAAABLA4WULg==\n"  # (3,)
REAL_KWARGS = "00\ngASVCgAAAAAAAAB9lIwBYpRLBHMu\n"  # {'b': 4}
REAL_EMPTY_KWARGS = "00\ngAR9lC4=\n"  # {}
REAL_42 = "00\ngARLKi4=\n"  # 42, a result
REAL_PAYLOAD = "28\n00\ngASVBQAAAAAAAABLA4WULg==\n32\n00\ngASVCgAAAAAAAAB9lIwBYpRLBHMu\n"
REAL_FUNCTION_CODE = "80\n" + REAL_04_ADD  # POST /functions "function_code"
# A lambda as the real SDK writes it: name "<lambda>", source "f = lambda x: x * 2\n".
REAL_04_LAMBDA = "04\ngASVJQAAAAAAAACMCDxsYW1iZGE+lIwUZiA9IGxhbWJkYSB4OiB4ICogMgqUhpQu\n"
# A lambda whose source line holds two lambdas:
# "print(repr(fx.serialize(max(1, 2, key=lambda v: -v) and (lambda y: y - 1))))\n"
REAL_04_TWO_LAMBDAS = (
    "04\ngASVXgAAAAAAAACMCDxsYW1iZGE+lIxNcHJpbnQocmVwcihmeC5zZXJpYWxpemUobWF4KDEsIDIs\n"
    "IGtleT1sYW1iZGEgdjogLXYpIGFuZCAobGFtYmRhIHk6IHkgLSAxKSkpKQqUhpQu\n"
)
# The real SDK with dill 0.3.6 installed (so that "01" works on 3.11), ``add`` in __main__.
REAL_01_ADD_BODY = (
    "gASV1wAAAAAAAACMCmRpbGwuX2RpbGyUjBBfY3JlYXRlX2Z1bmN0aW9ulJOUKGgAjAxfY3JlYXRl\n"
    "X2NvZGWUk5QoQwICAZRLAksASwBLAksCSwNDDJcAfAB8AXoAAABTAJROhZQpjAFhlIwBYpSGlIwQ\n"
    "L3RtcC9wYy9jb21iMi5weZSMA2FkZJRoDEsCQwuAANgLDIhxiTWATJRDAJQpKXSUUpRjX19idWls\n"
    "dGluX18KX19tYWluX18KaAxLAYWUTnSUUpR9lH2UjA9fX2Fubm90YXRpb25zX1+UfZRzhpRiLg==\n"
)
REAL_01_ADD = "01\n" + REAL_01_ADD_BODY
# Its CombinedCode().serialize(add): note the inner ids keep their newline.
REAL_10_ADD = "10\n04\n:" + REAL_04_ADD[3:] + ":01\n:" + REAL_01_ADD_BODY


def add(a, b=1):
    return a + b


def closure_maker(n):
    def add_n(x):
        return x + n

    return add_n


def registering(fn):
    return fn


@registering
def decorated(x):
    return x * 10


def annotated(x: UndefinedType) -> AlsoUndefined:  # type: ignore[name-defined] # noqa: F821
    return x - 1


def defines_helper(x):
    import math

    return math.floor(x)


double = lambda x: x * 2  # noqa: E731


class Unpicklable:
    """Callable, but neither dill nor source methods can serialize it."""

    def __init__(self) -> None:
        self.gen = (i for i in range(3))

    def __call__(self) -> int:
        return 1


def _b64(raw: bytes) -> str:
    return base64.encodebytes(raw).decode("ascii")


class RealSDKVectorTests(SynchronousTestCase):
    """Our reader loads what funcx 1.0.13 writes, and our writer matches it."""

    def test_real_function_loads(self) -> None:
        fn = deserialize(REAL_04_ADD)
        self.assertEqual(fn.__name__, "add")
        self.assertEqual(fn(3), 4)
        self.assertEqual(fn(3, b=4), 7)

    def test_function_written_like_real(self) -> None:
        self.assertEqual(serialize(add), REAL_04_ADD)
        self.assertEqual(pack_function(add), REAL_FUNCTION_CODE)

    def test_real_data_loads(self) -> None:
        self.assertEqual(deserialize(REAL_ARGS), (3,))
        self.assertEqual(deserialize(REAL_KWARGS), {"b": 4})
        self.assertEqual(deserialize(REAL_EMPTY_KWARGS), {})
        self.assertEqual(deserialize(REAL_42), 42)

    def test_data_written_like_real(self) -> None:
        self.assertEqual(serialize((3,)), REAL_ARGS)
        self.assertEqual(serialize({"b": 4}), REAL_KWARGS)
        self.assertEqual(serialize({}), REAL_EMPTY_KWARGS)
        self.assertEqual(serialize(42), REAL_42)

    def test_real_payload(self) -> None:
        self.assertEqual(unpack_buffers(REAL_PAYLOAD), [REAL_ARGS, REAL_KWARGS])
        self.assertEqual(pack_payload((3,), {"b": 4}), REAL_PAYLOAD)
        self.assertEqual(pack_buffers([REAL_ARGS, REAL_KWARGS]), REAL_PAYLOAD)

    def test_real_task_buffer(self) -> None:
        """The service's task buffer is function_code + payload."""
        fn, args, kwargs = unpack_task_buffer(REAL_FUNCTION_CODE + REAL_PAYLOAD)
        self.assertEqual((args, kwargs), ((3,), {"b": 4}))
        self.assertEqual(fn(*args, **kwargs), 7)

    def test_real_lambda_loads(self) -> None:
        """The real endpoint fails these with KeyError '<lambda>'; we do not."""
        self.assertEqual(deserialize(REAL_04_LAMBDA)(21), 42)

    def test_real_ambiguous_lambda(self) -> None:
        with self.assertRaises(DeserializationError) as cm:
            deserialize(REAL_04_TWO_LAMBDAS)
        self.assertIn("2 lambda expressions", str(cm.exception))
        self.assertIn("'04'", str(cm.exception))

    def test_real_dill_code_loads(self) -> None:
        if sys.version_info[:2] != (3, 11):
            raise SkipTest("the vector holds Python 3.11 bytecode")
        self.assertEqual(deserialize(REAL_01_ADD)(2), 3)

    def test_real_combined_loads(self) -> None:
        self.assertEqual(deserialize(REAL_10_ADD)(5, 5), 10)


class DataTests(SynchronousTestCase):
    def test_round_trips(self) -> None:
        values: list[Any] = [
            None,
            True,
            0,
            -(2**70),
            1.5,
            float("inf"),
            1 + 2j,
            "",
            "héllo \ud800 surrogate",
            b"\x00\xff",
            (1, (2, [3, {"a": {4, 5}}])),
            frozenset({1}),
            list(range(1000)),
            {"nested": {"k": [None, b"x"]}},
            ValueError("boom"),
            functools.partial(int, base=2),
        ]
        for value in values:
            payload = serialize(value, method="00")
            self.assertTrue(payload.startswith("00\n"), payload)
            loaded = deserialize(payload)
            if isinstance(value, ValueError):
                self.assertEqual(loaded.args, value.args)
            elif isinstance(value, functools.partial):
                self.assertEqual(loaded("101"), 5)
            else:
                self.assertEqual(loaded, value)

    def test_shared_and_cyclic(self) -> None:
        shared = [1]
        value = [shared, shared]
        loaded = deserialize(serialize(value))
        self.assertIs(loaded[0], loaded[1])
        cyclic: list[Any] = [1]
        cyclic.append(cyclic)
        loaded = deserialize(serialize(cyclic))
        self.assertIs(loaded[1], loaded)

    def test_instance_of_main_class_by_value(self) -> None:
        """Non-plain data goes through dill (what the body is must not matter)."""

        class Point:
            def __init__(self, x: int) -> None:
                self.x = x

        payload = serialize(Point(3))
        self.assertEqual(payload[:3], "00\n")
        self.assertEqual(deserialize(payload).x, 3)

    def test_mime_base64(self) -> None:
        """Like funcX: 76-character lines and a trailing newline."""
        payload = serialize(bytes(range(256)) * 2)
        body = payload[3:]
        self.assertTrue(body.endswith("\n"))
        lines = body[:-1].split("\n")
        self.assertGreater(len(lines), 3)
        self.assertTrue(all(len(line) == 76 for line in lines[:-1]), lines)
        self.assertLessEqual(len(lines[-1]), 76)
        self.assertEqual(body, base64.encodebytes(dill.dumps(bytes(range(256)) * 2)).decode())

    def test_reads_any_base64_layout(self) -> None:
        value = {"x": "y" * 200}
        body = serialize(value)[3:]
        flat = body.replace("\n", "")
        self.assertEqual(deserialize("00\n" + flat), value)
        self.assertEqual(deserialize("00\n" + body.replace("\n", "\r\n")), value)
        spaced = "\n".join(flat[i : i + 10] for i in range(0, len(flat), 10))
        self.assertEqual(deserialize("00\n" + spaced), value)

    def test_data_error(self) -> None:
        with self.assertRaises(SerializationError) as cm:
            serialize(i for i in range(3))
        self.assertIn("could not serialize a generator", str(cm.exception))
        self.assertEqual(cm.exception.error_code, ErrorCode.REMOTE_EXECUTION_ERROR)


class CodeTests(SynchronousTestCase):
    def test_04_round_trip(self) -> None:
        payload = serialize(add, method="04")
        self.assertEqual(payload, REAL_04_ADD)
        self.assertEqual(deserialize(payload)(1, 2), 3)

    def test_03_round_trip(self) -> None:
        payload = serialize(add, method="03")
        self.assertEqual(payload[:3], "03\n")
        self.assertEqual(
            dill.loads(base64.b64decode(payload[3:])),
            ("add", "def add(a, b=1):\n    return a + b\n"),
        )
        self.assertEqual(deserialize(payload)(1, 2), 3)

    def test_01_round_trip(self) -> None:
        payload = serialize(add, method="01")
        self.assertEqual(payload[:3], "01\n")
        self.assertEqual(deserialize(payload)(1, 2), 3)

    def test_10_round_trip(self) -> None:
        payload = serialize(add, method="10")
        self.assertTrue(payload.startswith("10\n04\n:" + REAL_04_ADD[3:] + ":01\n:"), payload)
        self.assertEqual(deserialize(payload)(1, 2), 3)

    def test_10_read_without_inner_newlines(self) -> None:
        """The form PROTOCOL.md describes (ids without newline) reads too."""
        payload = "10\n04:" + REAL_04_ADD[3:] + ":01:" + serialize(add, method="01")[3:]
        self.assertEqual(deserialize(payload)(4), 5)

    def test_10_falls_back_to_second_part(self) -> None:
        broken_04 = _b64(dill.dumps(("nothere", "x = 1\n")))
        payload = "10\n04\n:" + broken_04 + ":01\n:" + serialize(add, method="01")[3:]
        self.assertEqual(deserialize(payload)(4), 5)

    def test_10_all_parts_fail(self) -> None:
        broken_04 = _b64(dill.dumps(("nothere", "x = 1\n")))
        payload = "10\n04\n:" + broken_04 + ":01\n:AAAA"
        with self.assertRaises(DeserializationError) as cm:
            deserialize(payload)
        message = str(cm.exception)
        self.assertIn("no part of the combined", message)
        self.assertIn("does not define 'nothere'", message)
        self.assertIn("UnpicklingError", message)

    def test_10_odd_fields(self) -> None:
        with self.assertRaises(DeserializationError) as cm:
            deserialize("10\n04\n:abc:01\n")
        self.assertIn("found 3 fields", str(cm.exception))

    def test_02_read_only(self) -> None:
        payload = "02\n" + _b64(pickle.dumps(add))
        self.assertIs(deserialize(payload), add)
        with self.assertRaises(SerializationError):
            serialize(add, method="02")

    def test_default_order_prefers_source(self) -> None:
        self.assertEqual(serialize(add)[:3], "04\n")
        self.assertEqual(serialize(defines_helper)[:3], "04\n")
        self.assertEqual(deserialize(serialize(defines_helper))(2.7), 2)

    def test_closure_uses_dill(self) -> None:
        """Source would lose the closed-over value, so 01 is chosen."""
        add_5 = closure_maker(5)
        payload = serialize(add_5)
        self.assertEqual(payload[:3], "01\n")
        self.assertEqual(deserialize(payload)(1), 6)
        with self.assertRaises(SerializationError) as cm:
            serialize(add_5, method="04")
        self.assertIn("enclosing function (n)", str(cm.exception))

    def test_decorators_dropped(self) -> None:
        payload = serialize(decorated)
        self.assertEqual(payload[:3], "04\n")
        name, source = dill.loads(base64.b64decode(payload[3:]))
        self.assertEqual((name, source), ("decorated", "def decorated(x):\n    return x * 10\n"))
        self.assertEqual(deserialize(payload)(2), 20)

    def test_nested_function_dedented(self) -> None:
        def nested(x):
            return x + 100

        payload = serialize(nested)
        self.assertEqual(payload[:3], "04\n")
        self.assertEqual(deserialize(payload)(1), 101)

    def test_annotations_not_evaluated(self) -> None:
        self.assertEqual(deserialize(serialize(annotated))(3), 2)

    def test_lambda_as_source(self) -> None:
        """A lambda is written as 04 that binds it to a name the real endpoint can find."""
        payload = serialize(double)
        self.assertEqual(payload[:3], "04\n")
        self.assertEqual(
            dill.loads(base64.b64decode(payload[3:])),
            (LAMBDA_NAME, f"{LAMBDA_NAME} = lambda x: x * 2\n"),
        )
        loaded = deserialize(payload)
        self.assertEqual(loaded.__name__, "<lambda>")
        self.assertEqual(loaded(4), 8)

    def test_lambda_picked_among_several(self) -> None:
        first, second = (lambda x: x + 1), (lambda x: x - 1)
        self.assertEqual(deserialize(serialize(second))(10), 9)
        self.assertEqual(deserialize(serialize(first))(10), 11)

    def test_lambda_spanning_lines(self) -> None:
        fn = lambda a, b: (  # noqa: E731
            a * b
        )
        self.assertEqual(deserialize(serialize(fn))(3, 4), 12)

    def test_identical_lambdas_use_dill(self) -> None:
        _same_a, same_b = (lambda x: x), (lambda x: x)
        payload = serialize(same_b)
        self.assertEqual(payload[:3], "01\n")
        self.assertEqual(deserialize(payload)(7), 7)

    def test_other_callables(self) -> None:
        for obj, check in [
            (len, lambda fn: fn("abc") == 3),
            (int, lambda fn: fn("7") == 7),
            (functools.partial(add, 10), lambda fn: fn(1) == 11),
        ]:
            payload = serialize(obj)
            self.assertEqual(payload[:3], "01\n")
            self.assertTrue(check(deserialize(payload)))

    def test_nothing_works(self) -> None:
        with self.assertRaises(SerializationError) as cm:
            serialize(Unpicklable())
        message = str(cm.exception)
        self.assertIn("with any code method", message)
        self.assertIn("04: Unpicklable objects have no standalone source", message)
        self.assertIn("01: dill could not pickle", message)

    def test_custom_order(self) -> None:
        serializer = Serializer(code_methods=("01", "04"))
        self.assertEqual(serializer.serialize(add)[:3], "01\n")
        self.assertEqual(serializer.deserialize(REAL_04_ADD)(1), 2)
        with self.assertRaises(ValueError):
            Serializer(code_methods=("02",))
        with self.assertRaises(ValueError):
            Serializer(code_methods=())
        with self.assertRaises(SerializationError):
            serialize(add, method="99")

    def test_pack_function_needs_callable(self) -> None:
        with self.assertRaises(SerializationError):
            pack_function(42)  # type: ignore[arg-type]


class DeserializationErrorTests(SynchronousTestCase):
    def assertFails(self, payload: Any, *fragments: str) -> DeserializationError:
        with self.assertRaises(DeserializationError) as cm:
            deserialize(payload)
        for fragment in fragments:
            self.assertIn(fragment, str(cm.exception))
        self.assertEqual(cm.exception.error_code, ErrorCode.DESERIALIZATION_ERROR)
        return cm.exception

    def test_unknown_header(self) -> None:
        self.assertFails("99\nabc", "unknown serialization method header '99\\n'", "'04\\n'")

    def test_missing_header(self) -> None:
        self.assertFails("", "no method header")
        self.assertFails("0", "no method header")
        self.assertFails("gASVBQAAAAAAAABLA4WULg==", "no method header", "gASV")

    def test_not_a_string(self) -> None:
        self.assertFails(b"00\ngARLKi4=\n", "must be a str, got bytes")

    def test_bad_base64(self) -> None:
        self.assertFails("00\n!!!!", "header '00'", "not valid base64")
        self.assertFails("00\ngARLKi4", "not valid base64")  # bad padding
        self.assertFails("00\ngARLKi4=\u00e9", "not valid base64")

    def test_bad_pickle(self) -> None:
        error = self.assertFails(
            "00\nAAAA",
            "could not load the data in a payload with header '00'",
            "UnpicklingError",
            "serialized with a different Python or dill version?",
        )
        self.assertIsNotNone(error.__cause__)

    def test_truncated_pickle(self) -> None:
        self.assertFails("00\n" + _b64(dill.dumps(list(range(100)))[:-20]), "truncated?")

    def test_missing_module(self) -> None:
        raw = b"cno_such_module_for_funcx\nthing\n."
        self.assertFails("00\n" + _b64(raw), "ModuleNotFoundError", "installed here?")

    def test_source_does_not_define_name(self) -> None:
        payload = "04\n" + _b64(dill.dumps(("wanted", "def other():\n    pass\n")))
        self.assertFails(payload, "header '04'", "does not define 'wanted'")

    def test_source_defines_non_callable(self) -> None:
        payload = "03\n" + _b64(dill.dumps(("wanted", "wanted = 3\n")))
        self.assertFails(payload, "defines 'wanted' as a int, not a function")

    def test_source_fails_to_run(self) -> None:
        payload = "04\n" + _b64(dill.dumps(("f", "def f(:\n")))
        self.assertFails(payload, "source of function 'f'", "SyntaxError")
        payload = "04\n" + _b64(dill.dumps(("f", "@missing\ndef f():\n    pass\n")))
        self.assertFails(payload, "NameError", "missing")

    def test_source_body_not_a_pair(self) -> None:
        self.assertFails("04\n" + _b64(dill.dumps("just text")), "(name, source) pair")
        self.assertFails("04\n" + _b64(dill.dumps((1, 2))), "pair of strings, got (int, int)")

    def test_source_lambda_not_parsable(self) -> None:
        payload = "04\n" + _b64(dill.dumps(("<lambda>", "f = lambda x:\n")))
        self.assertFails(payload, "source of a lambda", "does not parse")


class PackedBufferTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        parts = ["", "a", "é\n12\nx", "3\nabc", "x" * 1000]
        packed = pack_buffers(parts)
        self.assertEqual(packed[:6], "0\n1\na6")
        self.assertEqual(unpack_buffers(packed), parts)
        self.assertEqual(unpack_buffers(""), [])

    def test_length_in_characters(self) -> None:
        self.assertEqual(pack_buffers(["é€"]), "2\né€")
        self.assertEqual(unpack_buffers("2\né€1\nx"), ["é€", "x"])

    def test_pack_rejects_non_strings(self) -> None:
        with self.assertRaises(SerializationError):
            pack_buffers([b"bytes"])  # type: ignore[list-item]

    def test_truncated(self) -> None:
        with self.assertRaises(DeserializationError) as cm:
            unpack_buffers("3\nabc10\nshort")
        self.assertIn(
            "truncated: part 2 should have 10 characters, only 5 are left", str(cm.exception)
        )

    def test_bad_length_line(self) -> None:
        with self.assertRaises(DeserializationError) as cm:
            unpack_buffers("3\nabcxy\nz")
        self.assertIn(
            "part 2 at offset 5: the length line 'xy' is not a decimal number", str(cm.exception)
        )
        for garbage in ["-1\nx", " 1\nx", "\u0661\nx", "\nx"]:
            with self.assertRaises(DeserializationError):
                unpack_buffers(garbage)

    def test_garbage(self) -> None:
        with self.assertRaises(DeserializationError) as cm:
            unpack_buffers("no newline here at all, just text")
        self.assertIn("expected a length line", str(cm.exception))
        with self.assertRaises(DeserializationError) as cm:
            unpack_buffers("3\nabc7")
        self.assertIn("part 2", str(cm.exception))
        with self.assertRaises(DeserializationError):
            unpack_buffers(b"3\nabc")  # type: ignore[arg-type]

    def test_linear_time(self) -> None:
        """Many parts unpack quickly: no re-slicing of the remaining string."""
        parts = ["abcdefgh"] * 200_000
        packed = pack_buffers(parts)
        start = time.perf_counter()
        self.assertEqual(len(unpack_buffers(packed)), 200_000)
        self.assertLess(time.perf_counter() - start, 5.0)


class TaskBufferTests(SynchronousTestCase):
    def test_pack_payload(self) -> None:
        packed = pack_payload([1, 2], {"k": "v"})
        self.assertEqual(unpack_buffers(packed), [serialize((1, 2)), serialize({"k": "v"})])
        self.assertEqual(unpack_buffers(pack_payload()), [serialize(()), REAL_EMPTY_KWARGS])
        with self.assertRaises(SerializationError):
            pack_payload("abc")

    def test_round_trip(self) -> None:
        buffer = pack_function(add) + pack_payload((1,), {"b": 2})
        fn, args, kwargs = unpack_task_buffer(buffer)
        self.assertEqual((args, kwargs), ((1,), {"b": 2}))
        self.assertEqual(fn(*args, **kwargs), 3)

    def test_pack_task_buffer(self) -> None:
        """What the service sends: the stored function_code, then the payload."""
        buffer = pack_task_buffer(REAL_FUNCTION_CODE, REAL_PAYLOAD)
        self.assertEqual(buffer, REAL_FUNCTION_CODE + REAL_PAYLOAD)
        with self.assertRaises(DeserializationError) as cm:
            pack_task_buffer(REAL_PAYLOAD, REAL_PAYLOAD)
        self.assertEqual(cm.exception.part, "function")
        self.assertIn("function_code must be 1 packed part", str(cm.exception))
        with self.assertRaises(DeserializationError) as cm:
            pack_task_buffer(REAL_FUNCTION_CODE, REAL_FUNCTION_CODE)
        self.assertIn("2 packed parts (args, kwargs), it holds 1", str(cm.exception))
        with self.assertRaises(DeserializationError) as cm:
            pack_task_buffer(REAL_FUNCTION_CODE, REAL_PAYLOAD[:-3])
        self.assertIn("truncated", str(cm.exception))

    def test_split(self) -> None:
        buffer = REAL_FUNCTION_CODE + REAL_PAYLOAD
        self.assertEqual(split_task_buffer(buffer), (REAL_04_ADD, REAL_ARGS, REAL_KWARGS))

    def test_function_cache(self) -> None:
        cache: dict[str, Any] = {}
        buffer = REAL_FUNCTION_CODE + REAL_PAYLOAD
        fn, _, _ = unpack_task_buffer(buffer, cache)
        self.assertEqual(list(cache), [REAL_04_ADD])
        self.assertIs(cache[REAL_04_ADD], fn)
        cache[REAL_04_ADD] = max
        fn2, args, kwargs = unpack_task_buffer(buffer, cache)
        self.assertIs(fn2, max)

    def test_list_args_accepted(self) -> None:
        buffer = pack_function(add) + pack_buffers([serialize([5]), serialize({})])
        _, args, _ = unpack_task_buffer(buffer)
        self.assertEqual(args, (5,))

    def assertBadBuffer(self, buffer: str, part: Any, *fragments: str) -> None:
        with self.assertRaises(DeserializationError) as cm:
            unpack_task_buffer(buffer)
        self.assertEqual(cm.exception.part, part)
        for fragment in fragments:
            self.assertIn(fragment, str(cm.exception))

    def test_wrong_number_of_parts(self) -> None:
        self.assertBadBuffer(REAL_PAYLOAD, None, "3 packed parts", "holds 2")
        self.assertBadBuffer(REAL_FUNCTION_CODE + REAL_PAYLOAD + "1\nx", None, "holds 4")
        self.assertBadBuffer("", None, "holds 0")

    def test_truncated(self) -> None:
        self.assertBadBuffer((REAL_FUNCTION_CODE + REAL_PAYLOAD)[:-5], None, "truncated")

    def test_args_not_tuple(self) -> None:
        buffer = REAL_FUNCTION_CODE + pack_buffers([serialize({"a": 1}), REAL_KWARGS])
        self.assertBadBuffer(buffer, "args", "args part", "must hold a tuple", "a dict")

    def test_kwargs_not_dict(self) -> None:
        buffer = REAL_FUNCTION_CODE + pack_buffers([REAL_ARGS, serialize([1])])
        self.assertBadBuffer(buffer, "kwargs", "kwargs part", "must hold a dict", "a list")
        buffer = REAL_FUNCTION_CODE + pack_buffers([REAL_ARGS, serialize({1: 2})])
        self.assertBadBuffer(buffer, "kwargs", "non-string key 1")

    def test_function_not_callable(self) -> None:
        buffer = pack_buffers([serialize(3)]) + REAL_PAYLOAD
        self.assertBadBuffer(buffer, "function", "function part", "not callable")

    def test_function_bad_header(self) -> None:
        buffer = pack_buffers(["77\nxyz"]) + REAL_PAYLOAD
        self.assertBadBuffer(buffer, "function", "function part", "unknown serialization method")

    def test_args_bad_pickle(self) -> None:
        buffer = REAL_FUNCTION_CODE + pack_buffers(["00\nAAAA", REAL_KWARGS])
        self.assertBadBuffer(buffer, "args", "args part", "different Python or dill version")
