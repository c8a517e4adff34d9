"""Dockerfile parsing, Docker's word expansion and .dockerignore (matchlock build)."""

from __future__ import annotations

import pytest

from matchlock.api.errors import UsageError
from matchlock.build import dockerfile as df
from matchlock.build.ignore import IgnoreRules
from matchlock.build.lexer import process_word, process_words

ENV = {"A": "x y", "E": "", "N": "1"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$A", "x y"),
        ("${A}b", "x yb"),
        ("${E:-d}", "d"),
        ("${E-d}", ""),
        ("${U-d}", "d"),
        ("${A:+alt}", "alt"),
        ("${E+alt}", "alt"),
        ("${E:+alt}", ""),
        ("${U:-${N}}", "1"),
        ("'$A'", "$A"),
        ('"$A\\$"', "x y$"),
        ("a\\ b", "a b"),
        ("\\$A", "$A"),
        ("$", "$"),
        ("cost: $N$", "cost: 1$"),
    ],
)
def test_process_word_expands_like_docker(text, expected):
    assert process_word(text, ENV) == expected


def test_process_words_splits_expansions_outside_quotes_only():
    assert process_words('$A "$A" z', ENV) == ["x", "y", "x y", "z"]
    assert process_words("${U}", ENV) == []


def test_escape_directive_changes_the_escape_character():
    assert process_word("a`$N", ENV, escape="`") == "a$N"
    parsed = df.parse("# escape=`\nFROM scratch\nRUN echo a `\n  b\n")
    assert parsed.escape == "`"
    assert parsed.stages[0].instructions[0].text == "echo a   b"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("${U:?must be set}", "U: must be set"),
        ("${A", "missing '}'"),
        ("'open", "single-quote"),
        ("${A%x}", "unsupported modifier"),
    ],
)
def test_bad_substitutions_are_errors(text, message):
    with pytest.raises(UsageError, match=message):
        process_word(text, ENV)


def test_stages_flags_heredocs_and_continuations():
    parsed = df.parse(
        "ARG V=1\nFROM scratch AS First\nCOPY --chown=1:2 --from=x a b\nRUN <<EOF\necho hi\nEOF\n"
        'RUN echo a \\\n  && echo b\nFROM first\nCMD ["sh"]\n',
        "ctx/Dockerfile",
    )
    assert [a.args for a in parsed.global_args] == [("V=1",)]
    first, second = parsed.stages
    assert (first.name, first.base, second.base) == ("first", "scratch", "first")
    copy, heredoc, joined = first.instructions
    assert copy.flags == {"chown": "1:2", "from": "x"} and copy.args == ("a", "b")
    assert heredoc.text == "<<EOF\necho hi\nEOF\n"
    assert joined.text == "echo a   && echo b" and joined.line == 7
    assert second.instructions[0].json and second.instructions[0].args == ("sh",)
    assert parsed.stage("FIRST") is first and parsed.stage("1") is second


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("FROM scratch\nBOGUS x\n", "Dockerfile:2: unknown instruction BOGUS"),
        ("RUN x\n", "Dockerfile:1: RUN before the first FROM"),
        ("FROM scratch\n\nENV A\n", "Dockerfile:3: ENV must have two arguments"),
        ("FROM scratch\nLABEL\n", "Dockerfile:2: LABEL needs an argument"),
        ("FROM scratch\nRUN <<EOF\necho\n", "Dockerfile:2: unterminated heredoc"),
        ("FROM scratch\nRUN --network=none make\n", "Dockerfile:2: unsupported flag '--network'"),
        ("FROM scratch\nCOPY a\n", "Dockerfile:2: COPY needs at least one source"),
        ("FROM scratch\nSHELL sh -c\n", "Dockerfile:2: SHELL requires the JSON form"),
        ("FROM a AS x\nFROM b AS x\n", "Dockerfile:2: duplicate stage name 'x'"),
        ("# just a comment\n", "Dockerfile:1: file with no instructions"),
        ("ARG A=1\n", "no FROM instruction"),
    ],
)
def test_syntax_errors_name_file_and_line(text, message):
    with pytest.raises(UsageError) as caught:
        df.parse(text, "Dockerfile")
    assert message in str(caught.value)


def test_canonical_text_ignores_nothing_that_matters():
    a = df.parse("FROM scratch\nCOPY --chown=1 a /b\n").stages[0].instructions[0]
    b = df.parse("FROM scratch\nCOPY --chown=2 a /b\n").stages[0].instructions[0]
    assert df.canonical(a) != df.canonical(b)
    assert df.canonical(a) == df.canonical(df.parse("FROM scratch\nCOPY   --chown=1 a /b\n").stages[0].instructions[0])


def test_dockerignore_rules():
    rules = IgnoreRules(["# comment", "*.log", "!keep.log", "secret/", "**/*.tmp", "/node_modules", "[ab].txt"])
    assert rules.ignored("a.log") and not rules.ignored("keep.log")
    assert not rules.ignored("d/a.log")  # `*` stays within one component
    assert rules.ignored("secret/x/y")  # a matched directory takes its contents along
    assert rules.ignored("x/y/z.tmp") and rules.ignored("z.tmp")
    assert rules.ignored("node_modules/a") and not rules.ignored("src/node_modules")
    assert rules.ignored("a.txt") and not rules.ignored("c.txt")
    assert rules.may_contain_included("secret") is False
    assert IgnoreRules(["dir", "!dir/keep"]).may_contain_included("dir")
