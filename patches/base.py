"""A patch is a small class bound to its target; the original is kept and called."""

from __future__ import annotations

from typing import Any, ClassVar

from vllm_align.patches.version import SUPPORTED_VLLM, check_version


class VllmPatch:
    """Replace attributes of ``target`` with those defined on the subclass.

    Subclasses list the attribute names in ``replaces`` and call the originals
    through ``cls.original(name)``. ``apply()`` checks the vLLM version first.
    """

    target: ClassVar[type]
    replaces: ClassVar[tuple[str, ...]]
    written_for: ClassVar[str] = SUPPORTED_VLLM
    _originals: ClassVar[dict[str, Any]]

    @classmethod
    def apply(cls) -> None:
        check_version(f"{cls.__module__}.{cls.__name__}", cls.written_for)
        if "_originals" in cls.__dict__:  # already applied in this process
            return
        cls._originals = {}
        for name in cls.replaces:
            if name not in cls.target.__dict__:
                raise RuntimeError(f"vllm-align: {cls.target.__qualname__}.{name} "
                                   "not found; this vLLM is not the one the patch targets")
            cls._originals[name] = cls.target.__dict__[name]
            setattr(cls.target, name, cls.__dict__[name])

    @classmethod
    def original(cls, name: str) -> Any:
        """The unpatched attribute (a function; unwrap classmethods with __func__)."""
        return cls._originals[name]
