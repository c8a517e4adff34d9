"""Tiny immutable record classes without `dataclasses`, `enum` or `collections`.

The wire package runs in the guest, where Python executes under CPU
emulation when there is no KVM: importing `dataclasses` (which pulls in
`inspect`, `ast`, `re` and `enum`) cost about 0.4 s of every boot there.
These records give the same ergonomics (keyword/positional construction,
equality, repr, immutability) for a few microseconds of import time.
"""

from __future__ import annotations


class Record:
    __slots__: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs) -> None:
        names = self.__slots__
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes {len(names)} arguments")
        values = dict(zip(names, args))
        for key, value in kwargs.items():
            if key not in names or key in values:
                raise TypeError(f"{type(self).__name__}: unexpected or repeated argument {key!r}")
            values[key] = value
        defaults = getattr(type(self), "_defaults", {})
        for name in names:
            if name not in values:
                if name not in defaults:
                    raise TypeError(f"{type(self).__name__}: missing argument {name!r}")
                default = defaults[name]
                values[name] = default() if callable(default) else default
            object.__setattr__(self, name, values[name])

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
