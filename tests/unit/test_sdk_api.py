"""The public surface matches the published SDK 0.2.17, and the CLI never imports the SDK.

sdk_published_api.json was produced by running `describe` (below) over every name in the published
package's `__all__`, in a throwaway venv with `pip install matchlock==0.2.17`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

import matchlock
from matchlock import sdk

PUBLISHED = json.loads((Path(__file__).parent / "sdk_published_api.json").read_text())
ADDED_NAMES = {"AsyncClient", "AllowListUpdate"}


def _params(function) -> list:
    return [
        [p.name, p.kind.name, None if p.default is inspect.Parameter.empty else repr(p.default)]
        for p in inspect.signature(function).parameters.values()
    ]


def describe(obj) -> list:
    if isinstance(obj, str):
        return ["const", obj]
    if dataclasses.is_dataclass(obj):
        fields = []
        for f in dataclasses.fields(obj):
            if f.default is not dataclasses.MISSING:
                default = repr(f.default)
            else:
                default = "factory" if f.default_factory is not dataclasses.MISSING else None
            fields.append([f.name, default, f.kw_only])
        return ["dataclass", fields]
    if inspect.isclass(obj):
        members: dict = {}
        for name, member in inspect.getmembers(obj):
            if name.startswith("_") and name not in ("__init__", "__enter__", "__exit__"):
                continue
            own = any(name in c.__dict__ for c in obj.__mro__ if c.__module__.startswith("matchlock"))
            if callable(member) and not inspect.isclass(member) and own:
                members[name] = _params(member)
            elif isinstance(inspect.getattr_static(obj, name), property):
                members[name] = "property"
            elif isinstance(member, int):
                members[name] = ["int", member]
        return ["class", members]
    return ["other", repr(obj)]


def test_every_published_name_is_exported_lazily_from_matchlock():
    assert set(PUBLISHED) | ADDED_NAMES == set(sdk.__all__) == set(matchlock.__all__)
    for name in sdk.__all__:
        assert getattr(matchlock, name) is getattr(sdk, name)


def test_the_sdk_package_binds_exactly_the_listed_names():
    # `sdk.__all__` is derived from `matchlock._SDK_NAMES`, so compare the names the package really binds.
    public = {name for name in vars(sdk) if not name.startswith("_")}
    submodules = {name for name, value in vars(sdk).items() if inspect.ismodule(value)}
    assert public - submodules == set(matchlock._SDK_NAMES)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_same_fields_signatures_and_constants(name):
    published, ours = PUBLISHED[name], describe(getattr(matchlock, name))
    if published[0] == "dataclass" and ours[0] == "dataclass":
        # Our additions are fields with defaults after the published ones: positional use is unchanged.
        assert ours[1][: len(published[1])] == published[1]
        assert all(default is not None for _, default, _ in ours[1][len(published[1]) :])
        return
    if published[0] != "class":
        assert ours == published
        return
    assert ours[0] == "class"
    for member, expected in published[1].items():
        actual = ours[1].get(member)
        if isinstance(expected, list) and expected and isinstance(expected[0], list):
            # Our additions are keyword-only with defaults, after the published parameters.
            assert actual[: len(expected)] == expected, member
            assert all(kind == "KEYWORD_ONLY" and default is not None for _, kind, default in actual[len(expected) :])
        else:
            assert actual == expected, member


def test_async_client_mirrors_client_as_coroutines():
    sync_api = describe(matchlock.Client)[1]
    async_api = describe(matchlock.AsyncClient)[1]
    for name, params in sync_api.items():
        if name in ("__enter__", "__exit__"):
            assert "__aenter__" in dir(matchlock.AsyncClient) and "__aexit__" in dir(matchlock.AsyncClient)
            continue
        assert async_api[name] == params, name
        if params != "property" and name != "__init__":
            assert inspect.iscoroutinefunction(getattr(matchlock.AsyncClient, name)), name


def test_importing_matchlock_and_its_cli_does_not_import_the_sdk():
    probe = (
        "import sys, matchlock, matchlock.cli.main; from matchlock import __version__; "
        "print(sorted(m for m in sys.modules if m.startswith('matchlock.sdk')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
    timing = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "matchlock", "--version"], check=True, capture_output=True, text=True
    )
    assert "matchlock version" in timing.stdout
    assert "matchlock.sdk" not in timing.stderr and "matchlock.cli" in timing.stderr


def test_unknown_names_still_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
        _ = matchlock.NotAThing


# The published names each submodule of the published package binds (read from its `vars()`); user code
# imports them from there too (`from matchlock.client import Client`, `from matchlock.types import ...`).
PUBLISHED_MODULES = {
    "matchlock.builder": {"CreateOptions", "HostIPMapping", "ImageConfig", "MountConfig", "NetworkInterceptionConfig",
                          "PortForward", "Sandbox", "Secret", "VFSInterceptionConfig"},
    "matchlock.client": {"Client", "Config", "CreateOptions", "ExecInteractiveResult", "ExecPipeResult", "ExecResult",
                         "ExecStreamResult", "FileInfo", "MatchlockError", "NETWORK_HOOK_ACTION_ALLOW",
                         "NetworkHookPhase", "NetworkHookRequest", "NetworkHookResult", "NetworkInterceptionConfig",
                         "PortForward", "PortForwardBinding", "RPCError", "Sandbox", "VFSActionRequest",
                         "VFSHookEvent", "VFSInterceptionConfig", "VFSMutateRequest", "VFS_HOOK_ACTION_ALLOW",
                         "VFS_HOOK_ACTION_BLOCK", "VFS_HOOK_PHASE_AFTER", "VFS_HOOK_PHASE_BEFORE", "VolumeInfo"},
    "matchlock.types": set(PUBLISHED) - {"Client", "Sandbox"},
}  # fmt: skip


@pytest.mark.parametrize("module", sorted(PUBLISHED_MODULES))
def test_published_submodules_import_the_same_objects(module):
    code = f"from {module} import {', '.join(sorted(PUBLISHED_MODULES[module]))}"
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 - the statement user code writes, names and all
    for name in PUBLISHED_MODULES[module]:
        assert namespace[name] is getattr(sdk, name), name
