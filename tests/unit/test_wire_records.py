"""The tiny immutable records that replaced dataclasses on the wire."""

from __future__ import annotations

import pytest

from matchlock.guest.users import ResolvedUser
from matchlock.wire._records import Record
from matchlock.wire.agent import ExecRequest, GuestConfig, TerminalSize
from matchlock.wire.frames import Frame
from matchlock.wire.mux import StreamClosed, WindowOpened


class Point(Record):
    __slots__ = ("x", "y", "tags")
    _defaults = {"y": 0, "tags": list}


def test_positional_keyword_and_defaults():
    assert Point(1, 2, ["a"]).tags == ["a"]
    p = Point(x=1)
    assert (p.x, p.y, p.tags) == (1, 0, [])
    assert Point(1, y=5).y == 5


def test_callable_defaults_are_fresh_per_instance():
    a, b = Point(1), Point(2)
    assert a.tags == [] and a.tags is not b.tags
    r1, r2 = ExecRequest("ls"), ExecRequest("ls")
    assert r1.env == {} and r1.env is not r2.env


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((1, 2, 3, 4), {}, r"Point.__init__\(\) takes from 2 to 4 positional arguments but 5"),
        ((), {}, r"Point.__init__\(\) missing 1 required positional argument: 'x'"),
        ((1,), {"x": 2}, r"Point.__init__\(\) got multiple values for argument 'x'"),
        ((1,), {"z": 2}, r"Point.__init__\(\) got an unexpected keyword argument 'z'"),
    ],
)
def test_bad_construction(args, kwargs, match):
    with pytest.raises(TypeError, match=match):
        Point(*args, **kwargs)


def test_equality_hash_and_repr():
    assert Frame(3, 1, b"x") == Frame(3, 1, b"x")
    assert Frame(3, 1, b"x") != Frame(3, 1, b"y")
    assert Frame(3, 1) == Frame(3, 1, b"")
    assert hash(Frame(3, 1, b"x")) == hash(Frame(3, 1, b"x"))
    assert len({TerminalSize(1, 2), TerminalSize(1, 2), TerminalSize(2, 1)}) == 2
    # same values, different record types are not equal
    assert StreamClosed(1) != WindowOpened(1)
    assert StreamClosed(1) != (1,)
    assert repr(TerminalSize(24, 80)) == "TerminalSize(rows=24, cols=80)"
    assert repr(ResolvedUser(0, 0, (0,), None)) == "ResolvedUser(uid=0, gid=0, groups=(0,), home=None)"


def test_setattr_is_refused():
    cfg = GuestConfig("box", 1)
    with pytest.raises(AttributeError, match="GuestConfig is immutable"):
        cfg.hostname = "other"
    with pytest.raises(AttributeError):
        cfg.new_field = 1
    assert cfg.hostname == "box"


def test_no_instance_dict():
    assert not hasattr(Frame(1, 0), "__dict__")


def test_delattr_is_refused():
    info = TerminalSize(24, 80)
    with pytest.raises(AttributeError, match="immutable"):
        del info.rows
