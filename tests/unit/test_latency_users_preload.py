"""The users database parsed before a rooted template's snapshot serves exec children until the file changes."""

from __future__ import annotations

import os

import pytest

from matchlock.guest import users


@pytest.fixture(autouse=True)
def _no_preload(monkeypatch):
    monkeypatch.setattr(users, "_preloaded", {})


def _root(tmp_path, passwd: str, group: str = "root:x:0:\n"):
    (tmp_path / "etc").mkdir(exist_ok=True)
    (tmp_path / "etc" / "passwd").write_text(passwd)
    (tmp_path / "etc" / "group").write_text(group)
    return str(tmp_path)


def test_a_preloaded_database_is_used_without_reading_the_file_again(tmp_path, monkeypatch):
    root = _root(tmp_path, "root:x:0:0:root:/root:/bin/sh\n")
    users.preload(root)
    assert len(users._preloaded) == 2
    real_open = open

    def counting_open(path, *args, **kwargs):
        handle = real_open(path, *args, **kwargs)
        handle.read = lambda *a: pytest.fail(f"{path} was read again")
        return handle

    monkeypatch.setattr("builtins.open", counting_open)
    assert users.resolve_user("0", root) == users.ResolvedUser(0, 0, (0,), "/root")


def test_a_changed_database_is_parsed_again(tmp_path):
    root = _root(tmp_path, "root:x:0:0:root:/root:/bin/sh\n")
    users.preload(root)
    passwd = tmp_path / "etc" / "passwd"
    passwd.write_text("root:x:0:0:root:/home/r:/bin/sh\n")  # same size: only the times tell
    stat = passwd.stat()
    os.utime(passwd, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert users.resolve_user("0", root).home == "/home/r"


def test_a_missing_database_preloads_nothing(tmp_path):
    users.preload(str(tmp_path))
    assert users._preloaded == {}
    with pytest.raises(LookupError, match="not found"):
        users.resolve_user("nobody", str(tmp_path))
