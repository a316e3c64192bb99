"""Name → object registries, filled where the objects are defined (detectron2's ``Registry``).

::

    TASKS = Registry("task", "What a registered task provides: ...")

    @TASKS.register()                # under the class's ``name`` attribute
    class CaptionTask(Task):
        name = "caption"

    TASKS.get("caption")             # -> CaptionTask; an unknown name lists the registered ones

The second argument is the registry's docstring: the contract every registered object meets.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["Registry", "RegistryError"]

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown or duplicate registry name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Objects by name.

    Args:
        name: What the registry holds, for messages (``task``, ``loss``).
        doc: The contract of the registered objects (becomes the registry's ``__doc__``).
    """

    def __init__(self, name: str, doc: str = ""):
        self._name = name
        self._objects: dict[str, T] = {}
        if doc:
            self.__doc__ = doc

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator adding an object under ``name`` (default: its ``name`` attribute)."""
        def deco(obj: T) -> T:
            key = name or getattr(obj, "name", "")
            if not key:
                raise RegistryError(f"{self._name} registry: {obj!r} has no name; pass one "
                                    "to register(name) or set its name attribute")
            if key in self._objects:
                raise RegistryError(f"{self._name} registry: {key!r} is already registered by "
                                    f"{self._objects[key]!r}")
            self._objects[key] = obj
            return obj
        return deco

    def get(self, name: str) -> T:
        """The object registered as ``name``."""
        try:
            return self._objects[name]
        except KeyError:
            raise RegistryError(f"unknown {self._name} {name!r}; registered: "
                                f"{self.names()}") from None

    __getitem__ = get

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._objects)

    def __contains__(self, name: object) -> bool:
        return name in self._objects

    def __iter__(self) -> Iterator[str]:
        return iter(self._objects)

    def __len__(self) -> int:
        return len(self._objects)

    def __repr__(self) -> str:
        return f"Registry({self._name!r}, {self.names()})"
