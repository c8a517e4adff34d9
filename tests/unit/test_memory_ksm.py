"""bench_density's KSM switch (host-wide, so it must always be put back): against a stand-in sysfs directory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_density  # noqa: E402


@pytest.fixture
def ksm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name, value in (("run", "0"), ("pages_to_scan", "100"), ("use_zero_pages", "0")):
        (tmp_path / name).write_text(value)
    monkeypatch.setattr(bench_density, "KSM", tmp_path)
    return tmp_path


def _values(ksm: Path) -> dict[str, str]:
    return {name: (ksm / name).read_text() for name in ("run", "pages_to_scan", "use_zero_pages")}


def test_ksm_runs_with_zero_pages_inside_the_block_and_its_settings_come_back_after(ksm: Path) -> None:
    with bench_density.ksm_on(pages_to_scan=500):
        assert _values(ksm) == {"run": "1", "pages_to_scan": "500", "use_zero_pages": "1"}
    assert _values(ksm) == {"run": "0", "pages_to_scan": "100", "use_zero_pages": "0"}


def test_a_failed_measurement_still_unmerges_and_restores(ksm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[tuple[str, str]] = []
    real_write = Path.write_text

    def record(self: Path, text: str, *args, **kwargs) -> int:
        written.append((self.name, text))
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", record)
    with pytest.raises(RuntimeError, match="measuring failed"):
        with bench_density.ksm_on():
            raise RuntimeError("measuring failed")
    assert ("run", "2") in written  # every merged page unmerged before KSM is set back
    assert written.index(("run", "2")) < written.index(("run", "0"))
    assert _values(ksm) == {"run": "0", "pages_to_scan": "100", "use_zero_pages": "0"}
