"""The guest's FUSE daemon in a real VM: POSIX operations, both sides' view, read-only, hiding."""

from __future__ import annotations

import os
import stat
import time

import pytest
from vfs_support import SEEN, sh

from matchlock.sandbox.sandbox import ExecSpec

pytestmark = [pytest.mark.vm]


@pytest.fixture(scope="module")
def host_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vfs")
    (root / "rw").mkdir()
    (root / "ro").mkdir()
    (root / "ro" / "kept.txt").write_text("read-only data\n")
    (root / "single.conf").write_text("key = 1\n")
    os.chmod(root / "ro" / "kept.txt", 0o640)
    return root


@pytest.fixture(scope="module")
def box(vm_prerequisites, loop_thread, module_state_dir, host_dirs):
    from matchlock.api.config import SandboxConfig
    from matchlock.api.vfs import MountConfig, VFSConfig
    from matchlock.sandbox.sandbox import Sandbox

    mounts = {
        "/mem": MountConfig("memory"),
        "/work": MountConfig("host_fs", str(host_dirs / "rw")),
        "/opt/deep/ro": MountConfig("host_fs", str(host_dirs / "ro"), readonly=True),
        "/etc/app/single.conf": MountConfig("host_fs", str(host_dirs / "single.conf")),
    }
    config = SandboxConfig(image="matchlock/busybox:builtin", vfs=VFSConfig(mounts=mounts))
    sandbox = loop_thread.run(Sandbox.create(config))
    yield sandbox
    loop_thread.run(sandbox.aclose())


POSIX_SCRIPT = r"""
set -e
cd {dir}
printf hello > f
ln -s f link
[ "$(readlink link)" = f ]
[ "$(cat link)" = hello ]
mv f g
[ ! -e f ] && [ "$(cat g)" = hello ]
printf ' more' >> g
printf ' again' >> g
[ "$(cat g)" = "hello more again" ]
truncate -s 100000 g
[ "$(stat -c %s g)" = 100000 ]
truncate -s 5 g
[ "$(cat g)" = hello ]
chmod 751 g
[ "$(stat -c %a g)" = 751 ]
mkdir -p d/e/f
rmdir d/e/f
mv g d/e/moved
[ "$(cat d/e/moved)" = hello ]
dd if=/dev/zero of=synced bs=4096 count=3 conv=fsync 2>/dev/null
[ "$(stat -c %s synced)" = 12288 ]
touch -d '2001-02-03 04:05:06' synced
stat -c %y synced
rm synced link
mkfifo fifo && [ -p fifo ] && rm fifo
# pjdfstest's findings: the guest's umask alone decides new modes (the host's 022 used to strip g+w too),
(umask 0; : > f666; mkdir d777; mkfifo p666)
[ "$(stat -c %a f666 d777 p666 | tr '\n' ' ')" = "666 777 666 " ]
# a chmod through one name of a hard-linked FIFO shows through the other at once,
ln p666 p-again && chmod 600 p-again
[ "$(stat -c %a.%h p666)" = 600.2 ]
# and fstat of an open file after its unlink answers (nlink 0), not ENOENT.
exec 3< f666
rm -r f666 d777 p666 p-again
[ "$(stat -L -c %h /proc/self/fd/3)" = 0 ]
exec 3<&-
ls -a
"""


@pytest.mark.parametrize("mount", ["/mem", "/work"])
def test_posix_operations(box, loop_thread, mount):
    out = sh(box, loop_thread, POSIX_SCRIPT.format(dir=mount))
    assert "2001-02-03 04:05:06.000000000" in out
    assert out.split()[-1] == "d"


def test_hard_links_on_host_fs(box, loop_thread, host_dirs):
    sh(box, loop_thread, "cd /work && echo x > one && ln one two && stat -c %h one")
    host = host_dirs / "rw"
    assert os.stat(host / "one").st_ino == os.stat(host / "two").st_ino
    assert os.stat(host / "one").st_nlink == 2


@pytest.mark.parametrize("mount", ["/mem", "/work"])
def test_both_names_of_a_hard_link_agree_in_the_guest(box, loop_thread, mount):
    # Each name is its own guest inode: a write through one must show through the other at once.
    script = f"cd {mount} && echo y > p2 && ln p2 h2 && stat -c %h p2 h2 && echo more >> h2 && cat p2 && rm h2"
    assert sh(box, loop_thread, script) == "2\n2\ny\nmore\n"


def test_owner_mode_and_mtime_agree_on_both_sides(box, loop_thread, host_dirs):
    out = sh(box, loop_thread, "cd /work && echo data > owned && chown 1234:567 owned && chmod 604 owned && "
                               "stat -c '%u %g %a %Y' owned")  # fmt: skip
    uid, gid, mode, mtime = out.split()
    st = os.stat(host_dirs / "rw" / "owned")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 567, 0o604)
    assert (uid, gid, mode, int(mtime)) == ("1234", "567", "604", int(st.st_mtime))
    (host_dirs / "rw" / "from-host").write_bytes(b"host bytes")
    os.utime(host_dirs / "rw" / "from-host", ns=(1, 1_234_567_890_123_456_789))
    shown = "\"$(cat /work/from-host; stat -c ' %y' /work/from-host)\""
    seen = f"[ {shown} = 'host bytes 2009-02-13 23:31:30.123456789 +0000' ]"
    sh(box, loop_thread, SEEN.format(test=seen))


def test_a_chown_or_chmod_that_changes_nothing_still_moves_the_ctime_on_both_sides(box, loop_thread, host_dirs):
    # The guest's daemon answers them from its cache and sends them to the host as notices (SETATTR_NOTICE).
    # %z: nanoseconds, in a fixed-width form, so the strings order as the times do.
    made = "cd /work && echo data > same && chown 0:0 same && chmod 640 same && stat -c %z same"
    guest_before = sh(box, loop_thread, made).strip()
    path = host_dirs / "rw" / "same"
    before = os.stat(path).st_ctime_ns
    out = sh(box, loop_thread, "cd /work && chown 0:0 same && chmod 640 same && stat -c '%u %g %a|%z' same")
    owner, ctime = out.strip().split("|")
    # Each side against itself: the guest answers with its own clock, which may lag the host's a little.
    assert owner == "0 0 640" and ctime > guest_before, (guest_before, out)
    deadline = time.monotonic() + 5
    while os.stat(path).st_ctime_ns == before and time.monotonic() < deadline:
        time.sleep(0.05)
    st = os.stat(path)
    assert st.st_ctime_ns > before and (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o640)


def test_read_only_mount_refuses_every_write(box, loop_thread, host_dirs):
    assert sh(box, loop_thread, "cat /opt/deep/ro/kept.txt") == "read-only data\n"
    for command in ("echo x > /opt/deep/ro/new", "echo x >> /opt/deep/ro/kept.txt", "chmod 777 /opt/deep/ro/kept.txt",
                    "mv /opt/deep/ro/kept.txt /opt/deep/ro/moved", "ln /opt/deep/ro/kept.txt /opt/deep/ro/hard",
                    "truncate -s 0 /opt/deep/ro/kept.txt", "rm /opt/deep/ro/kept.txt", "mkdir /opt/deep/ro/d"):  # fmt: skip
        result = loop_thread.run(box.exec(ExecSpec(command)))
        assert result.exit_code != 0, command
        assert b"Read-only file system" in result.stdout + result.stderr, (command, result)
    assert (host_dirs / "ro" / "kept.txt").read_text() == "read-only data\n"
    assert sorted(os.listdir(host_dirs / "ro")) == ["kept.txt"]


def test_parallel_readers_and_writers_get_their_own_bytes(box, loop_thread):
    script = (
        "cd /mem && for i in 1 2 3 4 5 6 7 8; do (head -c $((i * 300000)) /dev/urandom > p$i; "
        "sha256sum p$i > p$i.sum) & done; wait; "
        "for i in 1 2 3 4 5 6 7 8; do sha256sum -c p$i.sum >/dev/null & done; wait; "
        "for i in 1 2 3 4 5 6 7 8; do sha256sum -c p$i.sum >/dev/null || exit 1; done; echo ok"
    )
    assert sh(box, loop_thread, script).strip() == "ok"


def test_the_daemon_and_its_devices_are_hidden_from_workloads(box, loop_thread):
    processes = sh(box, loop_thread, "ps -o pid,args").splitlines()[1:]
    # Only the command's own namespace (its init, forked from the agent, then sh and ps): neither the
    # agent nor the FUSE daemon is in view, so neither can be signalled or traced.
    assert len(processes) == 2, processes
    assert [line.split()[0] for line in processes][0] == "1"
    devices = sh(box, loop_thread, "ls /dev").split()
    assert "fuse" not in devices and not [d for d in devices if d.startswith("vport")]
    assert sh(box, loop_thread, "ls /opt/deep/ro") == "kept.txt\n"


def test_single_file_mount_is_a_file_both_ways(box, loop_thread, host_dirs):
    out = sh(
        box,
        loop_thread,
        "stat -c %F /etc/app/single.conf; cat /etc/app/single.conf; echo 'key = 2' >> /etc/app/single.conf",
    )
    assert out == "regular file\nkey = 1\n"
    assert (host_dirs / "single.conf").read_text() == "key = 1\nkey = 2\n"


NEGATIVE_SCRIPT = r"""
set -e
cd {dir}
for name in made moved linked dir; do [ ! -e $name ]; done
echo one > made
[ "$(cat made)" = one ]
echo two > tmp-moved && mv tmp-moved moved
[ "$(cat moved)" = two ]
ln made linked
[ "$(stat -c %h linked)" = 2 ]
mkdir dir && [ -d dir ]
ls | tr '\n' ' '
"""


@pytest.mark.parametrize("mount", ["/mem", "/work"])
def test_cached_enoent_never_hides_what_the_guest_itself_makes(box, loop_thread, mount):
    # Each name is looked up (and its absence cached) first, then made by create, rename, link, mkdir.
    out = sh(box, loop_thread, f"mkdir -p {mount}/neg && " + NEGATIVE_SCRIPT.format(dir=f"{mount}/neg"))
    assert out.split() == ["dir", "linked", "made", "moved"]


# A writer renames a fresh file over `cur` again and again while readers open it: on a local filesystem
# every open finds a `cur`. Before ESTALE (vfs/nodes.py) about 1 open in 20 failed with ENOENT: its
# dentry still named the node just renamed over, whose name the host no longer had.
RENAME_RACE = """cd {dir} && echo 0 > cur
( i=0; while [ $i -lt 400 ]; do i=$((i+1)); echo $i > cur.new && mv cur.new cur; done ) &
n=0; for i in $(seq 300); do cat cur >/dev/null 2>&1 || n=$((n+1)); done; wait; echo $n"""


@pytest.mark.parametrize("mount", ["/mem", "/work"])
def test_an_open_racing_a_rename_over_its_name_finds_the_new_file(box, loop_thread, mount):
    out = sh(box, loop_thread, f"mkdir -p {mount}/race && " + RENAME_RACE.format(dir=f"{mount}/race"))
    assert out.strip() == "0", f"{out.strip()} of 300 opens of a file renamed over failed"


def test_the_guest_sees_host_side_changes_after_the_validity_period(box, loop_thread, host_dirs):
    host = host_dirs / "rw"
    (host / "grows.txt").write_text("a")
    # A listing of /work that an earlier test left in the guest may not show it yet: that is the same rule.
    sh(box, loop_thread, SEEN.format(test='[ "$(stat -c %s /work/grows.txt)" = 1 ]'))
    assert sh(box, loop_thread, "[ ! -e /work/appears ] && stat -c %s /work/grows.txt") == "1\n"
    (host / "appears").write_text("new")
    (host / "grows.txt").write_text("abcdef")
    sh(box, loop_thread, SEEN.format(test="[ -e /work/appears ]"))
    sh(box, loop_thread, SEEN.format(test='[ "$(stat -c %s /work/grows.txt)" = 6 ]'))
    assert sh(box, loop_thread, "cat /work/appears /work/grows.txt") == "newabcdef"
    (host / "appears").unlink()
    sh(box, loop_thread, SEEN.format(test="[ ! -e /work/appears ]"))


def test_a_setuid_file_loses_the_bit_when_someone_without_cap_fsetid_writes_it(box, loop_thread):
    # KILLPRIV_V2: the guest kernel leaves dropping set-id bits to the host, on write and on chown.
    assert sh(box, loop_thread, "cd /mem && printf a > su && chmod 4777 su && stat -c %a su") == "4777\n"
    sh(box, loop_thread, "printf b >> /mem/su", user="nobody")
    assert sh(box, loop_thread, "stat -c %a /mem/su && cat /mem/su") == "777\nab"
    out = sh(
        box, loop_thread, "cd /mem && chmod 4755 su && printf c >> su && stat -c %a su && chown 7 su && stat -c %a su"
    )
    assert out == "4755\n755\n"  # root's own write keeps it (CAP_FSETID); any chown drops it


@pytest.mark.parametrize("mount", ["/mem", "/work"])
def test_a_directory_changed_in_the_guest_shows_its_new_attributes_at_once(box, loop_thread, mount):
    # The daemon answers a directory's GETATTR and its mkdir -p revalidation from the attributes the
    # last change in it returned: they must be the new ones (link count, mtime) every time.
    old = "touch -d '2001-02-03 04:05:06'"
    script = (f"cd {mount} && mkdir -p top/a && {old} top && stat -c '%h %Y' top && mkdir -p top/a && mkdir top/b "
              f"&& mkdir -p top/b && stat -c %h top && {old} top/b && mkdir -p top/b && stat -c %Y top/b && "
              "touch top/b/f && mkdir -p top/b && [ \"$(stat -c %Y top/b)\" -gt 981173106 ] && rmdir top/a && "
              "stat -c %h top && ls top")  # fmt: skip
    assert sh(box, loop_thread, script).split() == ["3", "981173106", "4", "981173106", "3", "b"]


def test_with_interception_every_listing_reaches_the_host_and_fires_its_event(vm_prerequisites, loop_thread):
    # Without interception a memory mount's directories are opened in the guest after the first time
    # (no host round trip); with it, each open must reach the host so its rules and events see it.
    from matchlock.api.config import SandboxConfig
    from matchlock.api.vfs import MountConfig, VFSConfig, VFSInterceptionConfig
    from matchlock.sandbox.sandbox import Sandbox

    vfs = VFSConfig(mounts={"/mem": MountConfig("memory")}, interception=VFSInterceptionConfig(emit_events=True))
    sandbox = loop_thread.run(Sandbox.create(SandboxConfig(image="matchlock/busybox:builtin", vfs=vfs)))
    events: list = []
    sandbox.event_listeners.append(events.append)
    try:
        sh(sandbox, loop_thread, "mkdir /mem/d && ls /mem/d && ls /mem/d && ls /mem/d")
        listings = [e for e in events if getattr(e, "op", "") == "readdir" and e.path == "/mem/d"]
        assert len(listings) == 3, events
        assert sandbox.vfs.server.op_counts["OPENDIR"] >= 3
    finally:
        loop_thread.run(sandbox.aclose())


def test_a_non_root_user_goes_on_writing_what_it_made_on_host_fs(box, loop_thread, host_dirs):
    # Its files were the mount root's owner's (root): it could make a file but not append to it.
    sh(box, loop_thread, "mkdir -p /work/shared && chmod 777 /work/shared")
    script = "cd /work/shared && echo a > f && echo b >> f && mkdir d && echo c > d/g && cat f d/g && stat -c %u f d"
    assert sh(box, loop_thread, script, user="nobody").split() == ["a", "b", "c", "65534", "65534"]
    assert os.stat(host_dirs / "rw" / "shared" / "f").st_uid == 65534
