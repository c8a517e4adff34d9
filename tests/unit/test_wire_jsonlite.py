"""The guest-friendly JSON codec used for every wire message.

It drives CPython's C scanner directly, which reports errors differently
depending on whether `json.decoder` happens to be imported; the guest never
imports it, so the fuzz runs both in this process (json imported) and in a
fresh interpreter that must not import json at all.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import pytest

from matchlock.wire import jsonlite

VALID = [
    {},
    [],
    {"type": "exit", "code": 0, "signal": None},
    {"a": [1, 2.5, -3e10, True, False, None, "x\u00e9\u4e2d\U0001f600"]},
    {"nested": {"deep": [[[{"k": "v"}]]]}},
    "just a string",
    12345678901234567890,
    -0.0,
]


@pytest.mark.parametrize("value", VALID)
def test_round_trip_matches_json(value):
    encoded = jsonlite.dumps(value)
    assert isinstance(encoded, bytes)
    encoded.decode("ascii")  # always ASCII on the wire
    assert json.loads(encoded) == value
    assert jsonlite.loads(encoded) == value
    assert jsonlite.loads(json.dumps(value, ensure_ascii=False).encode("utf-8")) == value


def test_dumps_is_compact():
    assert jsonlite.dumps({"a": 1, "b": [1, 2]}) == b'{"a":1,"b":[1,2]}'


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {"x": float("-inf")}])
def test_dumps_rejects_non_finite(value):
    with pytest.raises(ValueError):
        jsonlite.dumps(value)


def test_dumps_rejects_unserialisable():
    with pytest.raises(TypeError, match="bytes is not JSON serialisable"):
        jsonlite.dumps({"a": b"x"})


@pytest.mark.parametrize(
    "text, match",
    [
        (b"NaN", "invalid JSON constant NaN"),
        (b'{"cpus": Infinity}', "invalid JSON constant Infinity"),
        (b"[-Infinity]", "invalid JSON constant -Infinity"),
        (b"", "no JSON value at offset 0"),
        (b" \n\t", "no JSON value at offset 3"),
        (b'{"a":1} x', "extra data after the JSON value at offset 8"),
        (b"1 2", "extra data"),
        (b"\xff", ""),
        (b"\xef\xbb\xbf{}", ""),  # a BOM is not whitespace
        (b'"\x01"', ""),  # control characters are not allowed in strings
        (b"[1,", ""),
        (b"{'a': 1}", ""),
        (b"1" * 5000, ""),  # above the int-string conversion limit
    ],
)
def test_loads_rejects_with_value_error(text, match):
    with pytest.raises(ValueError, match=match or None):
        jsonlite.loads(text)


@pytest.mark.parametrize("text", [b"[" * 100_000, b'{"a":' * 100_000, b"[" * 5000 + b"]" * 5000])
def test_deep_nesting_is_a_recursion_error_not_a_crash(text):
    with pytest.raises(RecursionError):
        jsonlite.loads(text)


def _mutations(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    seeds = [json.dumps(v).encode() for v in VALID] + [b'{"a":[1,{"b":"c\\n"}],"d":-1.5e3}']
    alphabet = b'{}[]",:0123456789.eE+-tfnrul \\\x00\xff\xc3aN'
    out = []
    for _ in range(count):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 5)):
            op = rng.random()
            pos = rng.randrange(len(data) + 1)
            if op < 0.4 and data:
                del data[min(pos, len(data) - 1)]
            elif op < 0.8:
                data.insert(pos, rng.choice(alphabet))
            else:
                data[pos:pos] = bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 8)))
        out.append(bytes(data))
    return out


def _reference(data: bytes):
    """What the stdlib says: ('ok', value) or ('error', None)."""
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=lambda name: 1 / 0)
    except (ValueError, RecursionError, ZeroDivisionError):
        return ("error", None)
    return ("ok", value)


def test_fuzz_in_process_agrees_with_json():
    for data in _mutations(7, 1500):
        expected = _reference(data)
        try:
            got = ("ok", jsonlite.loads(data))
        except (ValueError, RecursionError):
            got = ("error", None)
        assert got == expected, data


def test_fuzz_in_a_fresh_interpreter_without_json_imported():
    cases = _mutations(11, 1500) + [b"[1,2", b'{"a" 1}', b'"\\x"', b"[" * 100_000, b"tru", b"[1,]"]
    expected = [_reference(c)[0] for c in cases]
    script = textwrap.dedent(
        """
        import sys
        from matchlock.wire import jsonlite, mux
        assert "json" not in sys.modules, "the wire package imported json"
        cases = [bytes.fromhex(line[1:]) for line in sys.stdin.read().split()]
        results = []
        for data in cases:
            try:
                jsonlite.loads(data)
                results.append("ok")
            except (ValueError, RecursionError):
                results.append("error")
            except BaseException as exc:
                results.append("CRASH " + type(exc).__name__ + ": " + str(exc)[:80])
        assert "json" not in sys.modules
        print("\\n".join(results))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        input="\n".join("x" + c.hex() for c in cases),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    results = proc.stdout.split("\n")[: len(cases)]
    assert len(results) == len(cases)
    crashes = [r for r in results if r.startswith("CRASH")]
    assert crashes == []
    mismatches = [(c, r, e) for c, r, e in zip(cases, results, expected) if r != e]
    assert mismatches == []
