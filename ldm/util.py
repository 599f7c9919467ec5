"""Config plumbing shared by every stage: build objects from ``{target, params}`` dicts and load YAML.

A config node names what is built::

    target: ldm.diffusion.NoiseSchedule
    params: {kind: scaled_linear, num_timesteps: 1000}

``instantiate_from_config`` imports ``target`` and calls it with ``params``. Errors name the config key
(``path``) and the offending name, so a typo in a YAML file is reported where it was made.
"""

from __future__ import annotations

import importlib
import inspect
import os
from typing import Any, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A config node that cannot be built: unknown target, unknown or missing parameter."""


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> DictConfig:
    """Read a YAML config with OmegaConf; ``overrides`` are dotlist items such as ``model.params.lr=1e-4``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    config = OmegaConf.load(path)
    if overrides:
        config = OmegaConf.merge(config, OmegaConf.from_dotlist(list(overrides)))
    return config


def to_container(config: Any) -> Any:
    """Plain dicts and lists (resolved interpolations) from an OmegaConf node; anything else unchanged."""
    if isinstance(config, (DictConfig, ListConfig)):
        return OmegaConf.to_container(config, resolve=True)
    return config


def get_obj_from_str(target: str, path: str = "target") -> Any:
    """Import ``package.module.Name``; a clear ``ConfigError`` naming ``path`` when it does not exist."""
    if not isinstance(target, str) or "." not in target:
        raise ConfigError(f"{path}: expected a dotted import path like 'package.module.Name', got {target!r}")
    module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ConfigError(f"{path}: cannot import module {module_name!r} for target {target!r} ({error})") from error
    if not hasattr(module, attr):
        raise ConfigError(f"{path}: module {module_name!r} has no attribute {attr!r} (target {target!r})")
    return getattr(module, attr)


def _check_params(factory: Any, params: Mapping[str, Any], path: str, target: str) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    parameters = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ConfigError(
            f"{path}.params: unknown parameter(s) {unknown} for {target}; accepted: {sorted(accepted)}"
        )
    missing = [
        p.name
        for p in parameters
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty and p.name not in params
        and p.name != "self"
    ]
    if missing:
        raise ConfigError(f"{path}.params: missing required parameter(s) {missing} for {target}")


def instantiate_from_config(config: Mapping[str, Any] | DictConfig, path: str = "config", **extra: Any) -> Any:
    """Build ``target(**params, **extra)`` from a config node.

    ``path`` is the node's location in the whole config (for error messages), e.g. ``model.params.unet_config``.
    Raises ``ConfigError`` (a ``ValueError``) naming ``path`` for a missing or unknown target, unknown
    parameters, or missing required parameters.
    """
    config = to_container(config)
    if not isinstance(config, Mapping):
        raise ConfigError(f"{path}: expected a mapping with 'target' and 'params', got {type(config).__name__}")
    unknown_keys = sorted(set(config) - {"target", "params"})
    if unknown_keys:
        raise ConfigError(f"{path}: unknown key(s) {unknown_keys}; a node has only 'target' and 'params'")
    if "target" not in config:
        raise ConfigError(f"{path}: no 'target' key (keys present: {sorted(config)})")
    target = config["target"]
    factory = get_obj_from_str(target, f"{path}.target")
    params = dict(config.get("params") or {})
    params.update(extra)
    _check_params(factory, params, path, target)
    return factory(**params)
