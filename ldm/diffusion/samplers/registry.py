"""Name -> sampler class registry, so a config line (``sampler: ddim``) picks the sampler."""

from __future__ import annotations

from typing import Callable, Dict, Type

SAMPLERS: Dict[str, type] = {}


def register_sampler(name: str) -> Callable[[Type], Type]:
    """Class decorator: make ``build_sampler(name, ...)`` build this class. Names are unique."""

    def decorator(cls: Type) -> Type:
        if name in SAMPLERS and SAMPLERS[name] is not cls:
            raise ValueError(f"sampler name {name!r} is already registered to {SAMPLERS[name].__name__}")
        SAMPLERS[name] = cls
        cls.name = name
        return cls

    return decorator


def available_samplers() -> list:
    return sorted(SAMPLERS)


def build_sampler(name: str, schedule, **kwargs):
    """``SAMPLERS[name](schedule, **kwargs)``; unknown names raise ``ValueError`` listing the valid ones."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(available_samplers())}")
    return SAMPLERS[name](schedule, **kwargs)
