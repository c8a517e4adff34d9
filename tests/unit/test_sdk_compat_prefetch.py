"""Which pytest command lines prefetch the published SDK before the session enters its namespace."""

from __future__ import annotations

import pytest

from support.sdk_compat import wanted


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], True),
        (["-q"], True),
        (["tests"], True),
        (["tests/vm"], True),
        (["tests/vm/test_sdk_compat.py"], True),
        (["tests/vm/test_vfs.py::test_published_sdk_mounts_block_rule_and_after_hook"], True),
        (["tests/unit"], False),
        (["tests/vm/test_snapshots.py", "-x"], False),
    ],
)
def test_the_published_sdk_is_prefetched_for_the_tests_that_run_it(argv, expected):
    assert wanted(argv) is expected
