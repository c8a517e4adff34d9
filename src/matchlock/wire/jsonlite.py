"""JSON for wire messages through CPython's C accelerator (`_json`) directly.

`import json` pulls in `re` (and with it `enum` and `collections`), about
0.3 s of guest boot under CPU emulation. The C scanner and encoder it wraps
are all the wire needs. Decoding errors surface as ValueError either way
(with details when `json` happens to be imported, as on the host).
"""

from __future__ import annotations

try:
    from _json import encode_basestring_ascii as _encode_string
    from _json import make_encoder as _make_encoder
    from _json import make_scanner as _make_scanner
except ImportError:  # pragma: no cover - other interpreters
    import json as _json_module

    def dumps(value) -> bytes:
        return _json_module.dumps(value, separators=(",", ":")).encode()

    def loads(data: bytes):
        return _json_module.loads(data.decode("utf-8"))

else:

    class _ScannerContext:
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        parse_constant: object = None
        memo: dict = {}

    def _reject_constant(name: str):
        raise ValueError(f"invalid JSON constant {name}")

    _ScannerContext.parse_constant = staticmethod(_reject_constant)
    _scan = _make_scanner(_ScannerContext())  # type: ignore[arg-type]  # any object with the decoder's attributes works

    def _not_serialisable(value):
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")

    _encode = _make_encoder(None, _not_serialisable, _encode_string, None, ":", ",", False, False, False)

    def dumps(value) -> bytes:
        return "".join(_encode(value, 0)).encode("ascii")

    def loads(data: bytes):
        text = data.decode("utf-8")
        end = len(text)
        index = _skip_space(text, 0) if text[:1] in _SPACE else 0
        try:
            value, index = _scan(text, index)
        except StopIteration as exc:
            raise ValueError(f"no JSON value at offset {exc.value}") from None
        except SystemError:
            # The C scanner reports errors through json.decoder.JSONDecodeError
            # and fails without an exception when that module is not loaded.
            raise ValueError("malformed JSON") from None
        if index != end:
            index = _skip_space(text, index)
        if index != end:
            raise ValueError(f"extra data after the JSON value at offset {index}")
        return value

    _SPACE = (" ", "\t", "\n", "\r")

    def _skip_space(text: str, index: int) -> int:
        while index < len(text) and text[index] in " \t\n\r":
            index += 1
        return index
