"""Tiny immutable record classes without `dataclasses`, `enum` or `collections`.

The wire package runs in the guest, where Python executes under CPU
emulation when there is no KVM: importing `dataclasses` (which pulls in
`inspect`, `ast`, `re` and `enum`) cost about 0.4 s of every boot there.
These records give the same ergonomics (keyword/positional construction,
defaults, equality, repr, immutability). Each subclass gets an `__init__`
generated for its fields, as namedtuple does, because records are built for
every frame and a generic loop was the largest cost of a guest round trip.
"""

from __future__ import annotations

_set = object.__setattr__


class Record:
    __slots__: tuple[str, ...] = ()
    _defaults: dict = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        names = cls.__slots__
        defaults = cls._defaults
        params: list[str] = []
        body: list[str] = []
        namespace: dict = {"_set": _set}
        for name in names:
            if name in defaults:
                default = defaults[name]
                namespace[f"_default_{name}"] = default
                params.append(f"{name}=_MISSING")
                value = (
                    f"_default_{name}() if {name} is _MISSING else {name}"
                    if callable(default)
                    else (f"_default_{name} if {name} is _MISSING else {name}")
                )
                body.append(f"    _set(self, {name!r}, {value})")
            else:
                params.append(name)
                body.append(f"    _set(self, {name!r}, {name})")
        namespace["_MISSING"] = _MISSING
        source = f"def __init__(self, {', '.join(params)}):\n" + ("\n".join(body) or "    pass") + "\n"
        exec(source, namespace)  # noqa: S102 - source is built from the class's own field names
        init = namespace["__init__"]
        init.__qualname__ = f"{cls.__qualname__}.__init__"
        setattr(cls, "__init__", init)  # noqa: B010 - mypy forbids assigning to a method

    def __init__(self, *args: object, **kwargs: object) -> None:
        """Replaced in each subclass by one generated for its fields (this one only informs type checkers)."""

    def __setattr__(self, name, value) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other._values() == self._values()

    def __hash__(self) -> int:
        return hash((type(self), self._values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


_MISSING = object()
