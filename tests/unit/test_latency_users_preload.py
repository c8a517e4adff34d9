"""The users database parsed before a rooted template's snapshot serves exec children until the file changes."""

from __future__ import annotations

import os
import time

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


def test_a_changed_database_is_parsed_again_even_with_its_size_and_mtime_put_back(tmp_path):
    root = _root(tmp_path, "root:x:0:0:root:/root:/bin/sh\n")
    passwd = tmp_path / "etc" / "passwd"
    before = passwd.stat()
    users.preload(root)
    for _ in range(1000):  # bounded: until the clock's tick moves the ctime on
        passwd.write_text("root:x:0:0:root:/rOOt:/bin/sh\n")  # same size, same inode
        os.utime(passwd, ns=(before.st_atime_ns, before.st_mtime_ns))  # what a workload can put back
        if passwd.stat().st_ctime_ns != before.st_ctime_ns:
            break
        time.sleep(0.001)
    assert passwd.stat().st_size == before.st_size
    assert users.resolve_user("0", root).home == "/rOOt"  # only the ctime told


def test_a_database_swapped_for_a_symlink_is_parsed_again(tmp_path):
    root = _root(tmp_path, "root:x:0:0:root:/root:/bin/sh\n")
    users.preload(root)
    (tmp_path / "other").write_text("root:x:0:0:root:/home/r:/bin/sh\n")
    (tmp_path / "etc" / "passwd").unlink()
    (tmp_path / "etc" / "passwd").symlink_to(tmp_path / "other")
    assert users.resolve_user("0", root).home == "/home/r"


def test_a_missing_database_preloads_nothing(tmp_path):
    users.preload(str(tmp_path))
    assert users._preloaded == {}
    with pytest.raises(LookupError, match="not found"):
        users.resolve_user("nobody", str(tmp_path))
