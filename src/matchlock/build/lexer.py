"""Docker's word processing for Dockerfile arguments: quotes, escapes and `$VAR` expansion.

Follows BuildKit's shell lexer (frontend/dockerfile/shell): single quotes are
literal; inside double quotes the escape character only escapes `"`, `$` and
itself; `$VAR`, `${VAR}`, `${VAR:-word}`, `${VAR-word}`, `${VAR:+word}`,
`${VAR+word}`, `${VAR:?msg}` and `${VAR?msg}` expand (the colon forms treat an
empty value as unset). Sans-IO: strings in, strings out.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..api.errors import UsageError

_NAME_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_CHARS = _NAME_START | frozenset("0123456789")
_SPECIAL = frozenset("0123456789*#?@$!-")  # positional and special parameters: always empty in a Dockerfile


class _Words:
    """Collects output characters, splitting on whitespace that came from outside quotes."""

    def __init__(self, split: bool) -> None:
        self.split = split
        self.words: list[str] = []
        self.current: list[str] = []
        self.in_word = False

    def add(self, text: str, quoted: bool) -> None:
        for char in text:
            if self.split and not quoted and char in " \t\r\n":
                self.flush()
            else:
                self.current.append(char)
                self.in_word = True
        if quoted:
            self.in_word = True  # "" is still a word

    def flush(self) -> None:
        if self.in_word:
            self.words.append("".join(self.current))
        self.current, self.in_word = [], False

    def joined(self) -> str:
        return "".join(self.current)


class _Lexer:
    def __init__(self, text: str, env: Mapping[str, str], escape: str) -> None:
        self.text, self.env, self.escape, self.pos = text, env, escape, 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def take(self) -> str:
        char = self.peek()
        self.pos += 1
        return char

    def run(self, out: _Words, stop: str = "") -> None:
        """Process until `stop` (consumed) or the end."""
        while self.pos < len(self.text):
            char = self.peek()
            if stop and char == stop:
                self.pos += 1
                return
            if char == "'":
                self.pos += 1
                out.add(self._single_quoted(), True)
            elif char == '"':
                self.pos += 1
                self._double_quoted(out)
            elif char == "$":
                self.pos += 1
                out.add(self._dollar(), False)
            elif char == self.escape:
                self.pos += 1
                if self.pos >= len(self.text):
                    out.add(char, True)  # a trailing escape stays
                else:
                    out.add(self.take(), True)
            else:
                self.pos += 1
                out.add(char, False)
        if stop:
            raise UsageError(f"missing '{stop}' in {self.text!r}")

    def _single_quoted(self) -> str:
        end = self.text.find("'", self.pos)
        if end < 0:
            raise UsageError(f"unexpected end of statement while looking for matching single-quote in {self.text!r}")
        value, self.pos = self.text[self.pos : end], end + 1
        return value

    def _double_quoted(self, out: _Words) -> None:
        while True:
            if self.pos >= len(self.text):
                raise UsageError(
                    f"unexpected end of statement while looking for matching double-quote in {self.text!r}"
                )
            char = self.take()
            if char == '"':
                out.add("", True)
                return
            if char == "$":
                out.add(self._dollar(), True)
            elif char == self.escape and self.peek() in ('"', "$", self.escape):
                out.add(self.take(), True)
            else:
                out.add(char, True)

    def _name(self) -> str:
        start = self.pos
        while self.peek() and self.peek() in _NAME_CHARS:
            self.pos += 1
        return self.text[start : self.pos]

    def _dollar(self) -> str:
        char = self.peek()
        if char == "{":
            self.pos += 1
            return self._braced()
        if char and char in _NAME_START:
            return self.env.get(self._name(), "")
        if char and char in _SPECIAL:
            self.pos += 1
            return ""
        return "$"

    def _braced(self) -> str:
        name = self._name()
        if not name:
            if self.peek() and self.peek() in _SPECIAL:
                self.pos += 1
                name = "\0"  # never set
            else:
                raise UsageError(f"bad substitution in {self.text!r}: a variable name must follow '${{'")
        char = self.take()
        if not char:
            raise UsageError(f"missing '}}' in {self.text!r}")
        if char == "}":
            return self.env.get(name, "")
        colon = char == ":"
        if colon:
            char = self.take()
        if char not in ("-", "+", "?"):
            raise UsageError(f"unsupported modifier {char!r} in ${{{name}...}} of {self.text!r}")
        word_out = _Words(split=False)
        self.run(word_out, stop="}")
        word = word_out.joined()
        value = self.env.get(name)
        is_set = value is not None and (value != "" or not colon)
        if char == "-":
            return value if is_set and value is not None else word
        if char == "+":
            return word if is_set else ""
        if not is_set:
            raise UsageError(f"{name}: {word or 'is not allowed to be unset'}")
        return value or ""


def process_word(text: str, env: Mapping[str, str], escape: str = "\\") -> str:
    """One argument, quotes removed and variables expanded (whitespace kept)."""
    out = _Words(split=False)
    _Lexer(text, env, escape).run(out)
    return out.joined()


def process_words(text: str, env: Mapping[str, str], escape: str = "\\") -> list[str]:
    """Expand, then split on whitespace outside quotes (EXPOSE, VOLUME, shell-form argument lists)."""
    out = _Words(split=True)
    _Lexer(text, env, escape).run(out)
    out.flush()
    return out.words
