"""`matchlock build`: a Dockerfile's stages, step by step, into the image store.

Each stage is a list of layer tars plus an OCI config. FROM starts it from
scratch, an earlier stage, or an image (local or pulled; its filesystem is
read back from its erofs disk as one base layer). RUN boots a sandbox from
the layers so far (run_step.py), with its --mount specs served as VFS mounts
(mounts.py); COPY, ADD and WORKDIR write layers on the host; the rest edits
the config. COPY --from= and RUN --mount from= read an earlier stage, or an
image found as FROM finds one (BuildKit's implicit stage).

Cache, as BuildKit keys it: every step's key is sha256 of the previous key,
the instruction, the environment and build args in scope, and for COPY/ADD
the digest of what it reads. A layer-producing step whose key is in
`<cache>/build/cache/` reuses that layer, so an unchanged rebuild runs no VM
and gives the same image digest (the config's `created` is fixed:
SOURCE_DATE_EPOCH, else the epoch). Nothing reaches the image store until
the last step has passed; scratch files live in a per-build directory that is
removed on every exit, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shlex
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ..api.config import Resources
from ..api.errors import MatchlockError, UsageError
from ..api.network import NetworkConfig
from ..api.paths import cache_dir
from ..image import layers as image_layers
from ..image.archive import host_arch
from ..image.export import LAYER_MEDIA_TYPE, flatten_lower
from ..image.store import ImageInfo, ImageStore, LayerRecord
from . import dockerfile as df
from . import mounts, steps
from .context import BuildContext
from .lexer import process_word, process_words
from .run_step import RunRequest, StepFailed, run_step
from .secrets import BuildSecret
from .tree import LayerWriter, Tree, clamp_epoch

DEFAULT_SHELL = ["/bin/sh", "-c"]


@dataclass
class BuildOptions:
    context: Path
    tag: str
    dockerfile: Path | None = None
    build_args: dict[str, str] = field(default_factory=dict)
    target: str = ""
    no_cache: bool = False
    platform: str = ""
    network: NetworkConfig = field(default_factory=lambda: NetworkConfig(no_network=True))
    resources: Resources = field(default_factory=Resources)
    secrets: dict[str, BuildSecret] = field(default_factory=dict)  # --secret id=...: RUN --mount=type=secret


@dataclass
class StageState:
    layers: list[tuple[str, Path]]
    config: dict
    tree: Tree
    key: str
    args: dict[str, str] = field(default_factory=dict)
    shell: list[str] = field(default_factory=lambda: list(DEFAULT_SHELL))
    cmd_from_base: bool = True
    history: list[dict] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for entry in self.config.get("Env") or []:
            key, _, value = str(entry).partition("=")
            out[key] = value
        return out

    def set_env(self, key: str, value: str) -> None:
        env = self.env
        env[key] = value
        self.config["Env"] = [f"{k}={v}" for k, v in env.items()]


def _h(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class Builder:
    def __init__(self, options: BuildOptions, out: Callable[[str], None], output: Callable[[bytes], None]) -> None:
        self.options = options
        self.say = out
        self.output = output  # a RUN step's own output, streamed
        self.root = cache_dir() / "build"
        self.layers_dir = self.root / "layers"
        self.cache_dir = self.root / "cache"
        self.epoch = clamp_epoch() or 0
        self.platform = f"linux/{host_arch()}"
        if options.platform and options.platform != self.platform:
            raise UsageError(
                f"--platform {options.platform} is not this host's {self.platform}; cross-platform builds are not "
                "supported (each RUN step boots a VM of the host's architecture)"
            )
        context = options.context
        path = options.dockerfile or context / "Dockerfile"
        self.file = df.read(path, str(path))
        self.context = BuildContext(context)
        self.stages: dict[int, StageState] = {}
        self.images: dict[str, tuple[Tree, str]] = {}  # COPY --from / RUN --mount from= an image: read once
        self.consumed: set[str] = set()
        self.step = 0
        self.total = 0

    # -- top level ----------------------------------------------------------------

    async def build(self) -> ImageInfo:
        target = self._target()
        needed = self._needed(target)
        self.total = sum(1 + len(s.instructions) for s in self.file.stages if s.index in needed)
        self.root.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix=f"build-{os.getpid()}-", dir=self.root))
        try:
            for stage in self.file.stages:
                if stage.index in needed:
                    self.stages[stage.index] = await self._stage(stage)
            unused = sorted(set(self.options.build_args) - self.consumed)
            if unused:
                self.say(f"[warning] build args not consumed by any ARG: {', '.join(unused)}")
            return self._save(self.stages[target.index])
        finally:
            for state in self.stages.values():
                state.tree.close()
            for tree, _ in self.images.values():
                tree.close()
            shutil.rmtree(self.work, ignore_errors=True)

    def _target(self) -> df.Stage:
        if not self.options.target:
            return self.file.stages[-1]
        stage = self.file.stage(self.options.target)
        if stage is None:
            names = ", ".join(s.name for s in self.file.stages if s.name) or "none"
            raise UsageError(f"--target {self.options.target!r}: no such stage (stages: {names})")
        return stage

    def _needed(self, target: df.Stage) -> set[int]:
        """The target and every stage it copies from or builds on."""
        needed, pending = set(), [target]
        while pending:
            stage = pending.pop()
            if stage.index in needed:
                continue
            needed.add(stage.index)
            refs = [stage.base] + [i.flags["from"] for i in stage.instructions if "from" in i.flags]
            refs += [ref for i in stage.instructions for m in i.mounts if (ref := mounts.from_value(m))]
            for ref in refs:
                dep = self.file.stage(process_word(ref, self._global_args(), self.file.escape))
                if dep is not None and dep.index < stage.index:
                    pending.append(dep)
        return needed

    def _global_args(self) -> dict[str, str]:
        arch = host_arch()
        scope = {"TARGETPLATFORM": self.platform, "TARGETOS": "linux", "TARGETARCH": arch,
                 "BUILDPLATFORM": self.platform, "BUILDOS": "linux", "BUILDARCH": arch}  # fmt: skip
        for inst in self.file.global_args:
            for word in inst.args:
                name, sep, default = word.partition("=")
                if name in self.options.build_args:
                    self.consumed.add(name)
                    scope[name] = self.options.build_args[name]
                elif sep:
                    scope[name] = process_word(default, scope, self.file.escape)
        return scope

    def _progress(self, text: str) -> str:
        self.step += 1
        line = " ".join(text.split())
        return f"[{self.step}/{self.total}] {line[:100] + '...' if len(line) > 100 else line}"

    # -- stages -------------------------------------------------------------------

    async def _stage(self, stage: df.Stage) -> StageState:
        where = f"{self.file.path}:{stage.line}"
        base = process_word(stage.base, self._global_args(), self.file.escape)
        platform = process_word(stage.platform, self._global_args(), self.file.escape)
        if platform and platform != self.platform:
            raise UsageError(f"{where}: FROM --platform={platform} is not this host's {self.platform}")
        self.say(self._progress(f"FROM {base}" + (f" AS {stage.name}" if stage.name else "")))
        state = self._base(base, where, stage.index)
        for inst in stage.instructions:
            where = f"{self.file.path}:{inst.line}"
            header = self._progress(inst.original.split("\n", 1)[0])
            try:
                await self._instruction(state, inst, header, where)
            except StepFailed as exc:
                raise StepFailed(f"{where}: {inst.cmd} failed: {exc}") from None
        return state

    def _base(self, ref: str, where: str, index: int) -> StageState:
        if ref == "scratch":
            return StageState([], {}, Tree(), _h("scratch"))
        earlier = self.file.stage(ref)
        if earlier is not None and earlier.index < index:
            done = self.stages[earlier.index]
            copied = json.loads(json.dumps(done.config))
            return StageState(
                list(done.layers),
                copied,
                done.tree.copy(),
                done.key,
                shell=list(done.shell),
                history=list(done.history),
            )
        info = self._resolve_image(ref)
        diff_id, tar_path = self._flat_base(info)
        tree = Tree()
        tree.apply(tar_path)
        config = dict(ImageStore().meta(info).get("config") or {})
        history = [{"created_by": f"FROM {ref} (flattened)"}]
        return StageState([(diff_id, tar_path)], config, tree, _h("image", diff_id, config), history=history)

    def _resolve_image(self, ref: str) -> ImageInfo:
        """An image as FROM finds it: the local store first, else a pull."""
        from ..image import progress
        from ..image.pull import resolve_or_pull

        with progress.for_stderr() as bars:
            return resolve_or_pull(ref, progress=bars)

    def _source(self, ref: str, where: str, label: str) -> tuple[Tree, str]:
        """What COPY --from= and RUN --mount from= read: an earlier stage, else an image (BuildKit's implicit
        `FROM <image>` stage), read once per build. (tree, cache key part)."""
        stage = self.file.stage(ref)
        if stage is not None:
            if stage.index not in self.stages:
                raise UsageError(f"{where}: {label}: stage {ref!r} is not an earlier stage; fix: move it above")
            done = self.stages[stage.index]
            return done.tree, _h("stage", done.key)
        if ref not in self.images:
            try:
                info = self._resolve_image(ref)
                diff_id, tar_path = self._flat_base(info)
            except MatchlockError as exc:
                stages = ", ".join(s.name for s in self.file.stages if s.name) or "none named"
                raise UsageError(
                    f"{where}: {label}: {ref!r} is neither an earlier stage (stages: {stages}) nor an image found "
                    f"locally or pulled: {' '.join(str(exc).split())}; fix: name an earlier stage, or an image "
                    f"that `matchlock image ls` shows or a registry serves (e.g. matchlock pull {ref})"
                ) from None
            tree = Tree()
            tree.apply(tar_path)
            self.images[ref] = (tree, _h("image", info.digest, diff_id))
        return self.images[ref]

    def _flat_base(self, info: ImageInfo) -> tuple[str, Path]:
        """The image's filesystem as one layer tar, cached by its (content-named) lower disk."""
        marker = self.root / "bases" / (info.lower_path.name + ".diffid")
        if marker.is_file():
            diff_id = marker.read_text().strip()
            path = self.layers_dir / f"{diff_id.split(':', 1)[1]}.tar"
            if path.is_file():
                return diff_id, path
        diff_id, flat = flatten_lower(info.lower_path, self.work)
        self.layers_dir.mkdir(parents=True, exist_ok=True)
        path = self.layers_dir / f"{diff_id.split(':', 1)[1]}.tar"
        os.replace(flat, path)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(diff_id + "\n")
        return diff_id, path

    # -- instructions -------------------------------------------------------------

    def _scope(self, state: StageState) -> dict[str, str]:
        return {**state.args, **state.env}  # ENV wins over ARG of the same name, as in Docker

    def _word(self, state: StageState, text: str) -> str:
        return process_word(text, self._scope(state), self.file.escape)

    async def _instruction(self, state: StageState, inst: df.Instruction, header: str, where: str) -> None:
        cmd = inst.cmd
        state.history.append({"created_by": " ".join(inst.original.split())[:1000], "empty_layer": True})
        if cmd in ("RUN", "COPY", "ADD"):
            await self._layer_step(state, inst, header, where)
            return
        self.say(header)
        state.key = _h(state.key, df.canonical(inst), sorted(self._scope(state).items()))
        config = state.config
        if cmd == "ARG":
            globals_ = self._global_args()
            for word in inst.args:
                name, sep, default = word.partition("=")
                if name in self.options.build_args:
                    self.consumed.add(name)
                    state.args[name] = self.options.build_args[name]
                elif sep:
                    state.args[name] = self._word(state, default)
                elif name in globals_:
                    state.args[name] = globals_[name]
            state.key = _h(state.key, sorted(state.args.items()))
        elif cmd == "ENV":
            pairs = [(inst.args[i], inst.args[i + 1]) for i in range(0, len(inst.args) - 1, 2)]
            scope = self._scope(state)
            for key, value in pairs:
                state.set_env(key, process_word(value, scope, self.file.escape))
        elif cmd == "LABEL":
            labels = config.setdefault("Labels", {})
            for i in range(0, len(inst.args) - 1, 2):
                labels[self._word(state, inst.args[i])] = self._word(state, inst.args[i + 1])
        elif cmd == "WORKDIR":
            path = os.path.normpath(os.path.join(config.get("WorkingDir") or "/", self._word(state, inst.args[0])))
            config["WorkingDir"] = path
            parts = state.tree.resolve(path)
            if state.tree.get(parts) is None:
                writer = LayerWriter()
                steps.ensure_dirs(writer, state.tree, parts, self.epoch)
                self._commit(state, writer.write(self.layers_dir))
        elif cmd == "USER":
            config["User"] = self._word(state, inst.args[0])
        elif cmd == "EXPOSE":
            ports = config.setdefault("ExposedPorts", {})
            for word in inst.args:
                for port in process_words(word, self._scope(state), self.file.escape):
                    ports[port if "/" in port else f"{port}/tcp"] = {}
        elif cmd == "VOLUME":
            volumes = config.setdefault("Volumes", {})
            words = (
                list(inst.args) if inst.json else [w for a in inst.args for w in process_words(a, self._scope(state))]
            )
            for volume in words:
                volumes[volume] = {}
        elif cmd == "STOPSIGNAL":
            config["StopSignal"] = self._word(state, inst.args[0])
        elif cmd == "SHELL":
            state.shell = list(inst.args)
            config["Shell"] = list(inst.args)
        elif cmd in ("CMD", "ENTRYPOINT"):
            argv = list(inst.args) if inst.json else [*state.shell, inst.text]
            if cmd == "ENTRYPOINT":
                config["Entrypoint"] = argv
                if state.cmd_from_base:
                    config["Cmd"] = None  # Docker: a new ENTRYPOINT drops the base image's CMD
            else:
                config["Cmd"] = argv
                state.cmd_from_base = False
        elif cmd == "HEALTHCHECK":
            config["Healthcheck"] = _healthcheck(inst, where)
        elif cmd == "ONBUILD":
            config.setdefault("OnBuild", []).append(inst.original.split(None, 1)[1])
        elif cmd == "MAINTAINER":
            config.setdefault("Labels", {})["maintainer"] = " ".join(inst.args)

    def _commit(self, state: StageState, layer: tuple[str, Path]) -> None:
        state.layers.append(layer)
        state.tree.apply(layer[1])
        state.history[-1]["empty_layer"] = False

    def _cached(self, key: str) -> tuple[str, Path] | None:
        if self.options.no_cache:
            return None
        try:
            diff_id = json.loads((self.cache_dir / f"{key}.json").read_text())["diff_id"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        path = self.layers_dir / f"{str(diff_id).split(':', 1)[-1]}.tar"
        return (diff_id, path) if path.is_file() else None

    def _remember(self, key: str, layer: tuple[str, Path]) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_dir / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"diff_id": layer[0]}))
        os.replace(tmp, self.cache_dir / f"{key}.json")

    async def _layer_step(self, state: StageState, inst: df.Instruction, header: str, where: str) -> None:
        scope = self._scope(state)
        extra: list[object] = [sorted(scope.items()), state.config.get("WorkingDir"), state.config.get("User")]
        prepare: Callable[[], LayerWriter] | None = None
        planned: list[mounts.Planned] = []
        if inst.cmd == "RUN":
            extra.append(bool(self.options.network.allowed_hosts or self.options.network.secrets))
            planned = self._plan_mounts(state, inst, where)
            if planned:
                extra.append([[p.spec.key(), p.guest, p.digest] for p in planned])
        else:
            digest, prepare = self._copy(state, inst, where)
            extra.append(digest)
        key = _h(state.key, df.canonical(inst), extra)
        state.key = key
        cached = self._cached(key)
        if cached is not None:
            self.say(f"{header} CACHED")
            self._commit(state, cached)
            return
        self.say(header)
        started = time.monotonic()
        if prepare is not None:
            layer = prepare().write(self.layers_dir)
        else:
            layer = await self._run(state, inst, scope, planned)
        self._remember(key, layer)
        self._commit(state, layer)
        self.say(f"[{header.split(']', 1)[0][1:]}] DONE {time.monotonic() - started:.1f}s")

    def _plan_mounts(self, state: StageState, inst: df.Instruction, where: str) -> list[mounts.Planned]:
        """RUN --mount specs, checked, with their sources found and digested (before the cache lookup)."""
        workdir = state.config.get("WorkingDir") or "/"
        specs = mounts.parse_all([self._word(state, m) for m in inst.mounts], workdir, where)
        planned: list[mounts.Planned] = []
        guests: set[str] = set()
        for spec in specs:
            shown = f"{where}: RUN --mount target={spec.target}"
            guest = "/" + "/".join(state.tree.resolve(spec.target))  # mounted where the stage's symlinks lead
            mounts.check_target(guest, shown)
            if guest in guests:
                raise UsageError(f"{shown}: another --mount of this RUN lands at {guest}; fix: use other targets")
            guests.add(guest)
            if spec.type == "secret":
                secret = self.options.secrets.get(spec.id)
                if secret is None and spec.required:
                    raise UsageError(
                        f"{where}: RUN --mount=type=secret,id={spec.id} is required but the build was not given it; "
                        f"fix: matchlock build --secret id={spec.id},src=PATH (or env=VAR)"
                    )
                # The cache key holds whether it was given, never its value: a new value reuses the cached step.
                planned.append(mounts.Planned(spec, guest, digest="given" if secret else "absent", secret=secret))
                if secret is None:
                    continue  # not mounted: the step sees no file there
            elif spec.type != "bind":
                planned.append(mounts.Planned(spec, guest))
            elif spec.source_from:
                label = f"RUN --mount from={spec.source_from}"
                tree, key = self._source(spec.source_from, where, label)
                parts = tree.resolve(spec.source)
                if parts and tree.get(parts) is None:
                    raise UsageError(f"{where}: {label}: source /{spec.source} not found there")
                planned.append(mounts.Planned(spec, guest, tree=tree, tree_parts=parts, digest=_h(key, parts)))
            else:
                source = self.context.locate(spec.source, f"{where}: RUN --mount source")
                digest = self.context.digest([source])
                planned.append(mounts.Planned(spec, guest, context=source, digest=digest))
            _check_mount_point(state.tree, planned[-1], shown)
        return planned

    async def _run(
        self, state: StageState, inst: df.Instruction, scope: dict[str, str], planned: list[mounts.Planned]
    ) -> tuple[str, Path]:
        if inst.json:
            command = shlex.join(inst.args)
        elif state.shell == DEFAULT_SHELL:
            command = inst.text
        else:
            command = shlex.join([*state.shell, inst.text])
        step_dir = Path(tempfile.mkdtemp(prefix="step-", dir=self.work))
        try:
            lower = image_layers.build_lower(
                [tarfile.open(p, "r:") for _, p in state.layers], [d for d, _ in state.layers], step_dir, step_dir
            )
            with contextlib.ExitStack() as locks:  # cache mounts stay locked while the step runs
                served = {
                    p.guest: await mounts.serve(
                        p, self.context, self.root / "mounts", step_dir / f"mount-{index}", locks, self.say
                    )
                    for index, p in enumerate(planned)
                    if p.spec.type != "secret" or p.secret is not None
                }
                request = RunRequest(
                    command=command, env=scope, workdir=state.config.get("WorkingDir") or "/",
                    user=state.config.get("User") or "", network=self.options.network,
                    resources=self.options.resources, label=f"build {self.options.tag} step {self.step}",
                    mounts=served,
                )  # fmt: skip
                return await run_step(
                    request, lower, state.tree, step_dir / "capture.tar", self.layers_dir, self.output
                )
        finally:
            shutil.rmtree(step_dir, ignore_errors=True)

    def _copy(self, state: StageState, inst: df.Instruction, where: str) -> tuple[str, Callable[[], LayerWriter]]:
        words = [self._word(state, a) for a in inst.args if a]
        heredocs = dict(inst.heredocs)
        sources, dest = words[:-1], words[-1]
        own = steps.parse_ownership(
            self._word(state, inst.flags.get("chown", "")), inst.flags.get("chmod", ""), state.tree, where
        )
        several = len(sources) > 1 or any(c in s for s in sources for c in "*?[")
        plan = steps.plan_destination(dest, state.config.get("WorkingDir") or "/", state.tree, several)
        docs = [s for s in sources if s.startswith("<<") and s.lstrip("<-") in heredocs]
        if docs:
            return self._copy_heredocs(state, docs, heredocs, plan, own)
        source_ref = inst.flags.get("from")
        if source_ref:
            ref = self._word(state, source_ref)
            source_tree, source_key = self._source(ref, where, f"COPY --from={ref}")
            digest = _h(source_key, sources)

            def from_stage() -> LayerWriter:
                writer = LayerWriter()
                steps.copy_tree(writer, state.tree, source_tree, sources, plan, own, self.epoch, where)
                return writer

            return digest, from_stage
        if inst.cmd == "ADD" and any("://" in s for s in sources):
            raise UsageError(f"{where}: ADD from a URL is not supported; fetch it in a RUN step (with --allow-host)")
        resolved = [item for s in sources for item in self.context.resolve(s)]
        digest = self.context.digest(resolved)

        def from_context() -> LayerWriter:
            writer = LayerWriter()
            steps.copy_context(writer, state.tree, self.context, resolved, plan, own, self.epoch, inst.cmd == "ADD")
            return writer

        return digest, from_context

    def _copy_heredocs(self, state, docs, heredocs, plan, own) -> tuple[str, Callable[[], LayerWriter]]:
        contents = {name.lstrip("<-"): heredocs[name.lstrip("<-")].encode() for name in docs}

        def write() -> LayerWriter:
            writer = LayerWriter()
            for name, data in contents.items():
                parts = plan.dest + (name,) if plan.into_dir else plan.dest
                steps.ensure_dirs(writer, state.tree, parts[:-1], self.epoch)
                member = tarfile.TarInfo("/".join(parts))
                member.size, member.mode, member.mtime = len(data), 0o644, self.epoch
                writer.add(parts, own.apply(member), functools.partial(io.BytesIO, data))
            return writer

        return _h(sorted(contents.items(), key=lambda kv: kv[0])), write

    # -- output -------------------------------------------------------------------

    def _save(self, state: StageState) -> ImageInfo:
        diff_ids = [d for d, _ in state.layers]
        created = datetime.fromtimestamp(self.epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        config = {k: v for k, v in state.config.items() if v is not None}
        oci = {
            "architecture": host_arch(), "os": "linux", "created": created, "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids}, "history": state.history,
        }  # fmt: skip
        blob = json.dumps(oci, sort_keys=True, separators=(",", ":")).encode()
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        meta = {"config": config, "diff_ids": diff_ids, "os": "linux", "architecture": host_arch(),
                "created": created, "history": state.history}  # fmt: skip
        store = ImageStore()
        records = []
        with store.pulling() as work:  # its shared lock keeps gc off the layer blobs until the row exists
            for diff_id, path in state.layers:
                blob_path = store.layer_path(diff_id)
                blob_path.parent.mkdir(parents=True, exist_ok=True)
                if not blob_path.is_file():
                    _link_or_copy(path, blob_path)
                records.append(LayerRecord(diff_id, LAYER_MEDIA_TYPE, path.stat().st_size, diff_id))
            tars = [tarfile.open(p, "r:") for _, p in state.layers]
            try:
                return store.save_built(self.options.tag, tars, diff_ids, digest, meta, records, work)
            finally:
                for tar in tars:
                    tar.close()


def _check_mount_point(tree: Tree, planned: mounts.Planned, shown: str) -> None:
    """A directory mounts on a directory (or a new path), a file on a file, as the guest's daemon insists."""
    existing = tree.get(tree.resolve(planned.guest))
    if existing is None:
        return
    if planned.context is not None:
        is_dir = stat.S_ISDIR(planned.context.st.st_mode)
    elif planned.tree is not None:
        source = planned.tree.get(planned.tree_parts) if planned.tree_parts else None
        is_dir = source is None or source.isdir()
    else:
        is_dir = planned.spec.type != "secret"  # cache and tmpfs are directories, a secret one file
    if existing.isdir() != is_dir:
        kind, other = ("a file", "a directory") if is_dir else ("a directory", "a file")
        raise UsageError(
            f"{shown}: {planned.guest} is {kind} in the image but the mount is {other}; fix: mount elsewhere"
        )


def _link_or_copy(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def _duration_ns(text: str, where: str) -> int:
    units = {"ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000, "h": 3_600_000_000_000}
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit) and text[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * units[unit])
    raise UsageError(f"{where}: invalid duration {text!r}: use e.g. 30s, 1m, 500ms")


def _healthcheck(inst: df.Instruction, where: str) -> dict:
    if inst.args and inst.args[0].upper() == "NONE":
        return {"Test": ["NONE"]}
    if not inst.args or inst.args[0].upper() != "CMD":
        raise UsageError(f"{where}: HEALTHCHECK takes NONE or CMD ...")
    rest = list(inst.args[1:])
    test = ["CMD", *rest] if inst.json else ["CMD-SHELL", inst.text.split(None, 1)[1] if " " in inst.text else ""]
    check: dict = {"Test": test}
    names = {"interval": "Interval", "timeout": "Timeout", "start-period": "StartPeriod",
             "start-interval": "StartInterval"}  # fmt: skip
    for flag, key in names.items():
        if flag in inst.flags:
            check[key] = _duration_ns(inst.flags[flag], where)
    if "retries" in inst.flags:
        if not inst.flags["retries"].isdigit():
            raise UsageError(f"{where}: invalid --retries={inst.flags['retries']!r}: use a whole number")
        check["Retries"] = int(inst.flags["retries"])
    return check
