"""Config plumbing shared by every stage: build objects from ``{target, params}`` dicts and load YAML.

A config node names what is built::

    target: ldm.diffusion.NoiseSchedule
    params: {kind: scaled_linear, num_timesteps: 1000}

``instantiate_from_config`` imports ``target`` and calls it with ``params``. Errors name the config key
(``path``) and the offending name, so a typo in a YAML file is reported where it was made.

Building a config imports and calls code, so a config is trusted only when it is the user's own (a YAML given
with ``--config``, a dict built in code). A config read from a file someone else may have written (weights
metadata, a run folder's ``config.yaml``, a Stable Diffusion YAML) goes through :func:`check_targets` first: every
``target`` must be on the allow-list (:data:`DEFAULT_ALLOWED_TARGETS` plus names added on purpose with
:func:`allow_target` or ``--allow-target``), compared as whole names before anything is imported.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import os
import re
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A config node that cannot be built: unknown target, unknown or missing parameter."""


class UntrustedTargetError(ConfigError):
    """A config from a file names a ``target`` that is not on the allow-list (nothing was imported)."""


# Whole dotted names, never prefixes: ``ldm.`` as a prefix would let ``ldm.util.os.system`` through.
DEFAULT_ALLOWED_TARGETS = frozenset({
    "autoencoder.AutoencoderKL",
    "autoencoder.autoencoder_kl.AutoencoderKL",
    "autoencoder.lightning.AutoencoderKLTraining",
    "autoencoder.losses.LPIPSWithDiscriminator",
    "ldm.data.image_folder.CaptionedImageFolder",
    "ldm.data.latent_cache.LatentCacheDataset",
    "ldm.data.shards.ShardDataset",
    "ldm.data.split.HeldOutSplit",
    "ldm.data.shapes.ShapesDataset",
    "ldm.diffusion.NoiseSchedule",
    "ldm.diffusion.noise_schedule.NoiseSchedule",
    "ldm.models.diffusion_trainer.DiffusionTrainer",
    "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
    "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
})
_extra_allowed_targets: set[str] = set()


def allow_target(*targets: str) -> None:
    """Let configs read from files name ``targets`` (whole dotted names, e.g. ``mypkg.models.MyUNet``).

    Do this only for code you trust: whoever wrote the file then decides which arguments it is called with.
    """
    for target in targets:
        if not isinstance(target, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", target):
            raise ValueError(f"allow_target: expected a dotted name like 'package.module.Class', got {target!r}")
        _extra_allowed_targets.add(target)


class _AllowTargetAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        try:
            allow_target(values)
        except ValueError as error:
            parser.error(str(error))
        getattr(namespace, self.dest).append(values)


def add_allow_target_argument(parser: argparse.ArgumentParser) -> None:
    """``--allow-target PKG.CLASS`` (repeatable): :func:`allow_target` for the configs this command reads from files."""
    parser.add_argument(
        "--allow-target", action=_AllowTargetAction, default=[], metavar="PKG.CLASS",
        help="let configs inside weights files or run folders build this class too (repeatable); only for code you "
             "trust, since the file decides its arguments",
    )


def allowed_targets() -> frozenset[str]:
    return DEFAULT_ALLOWED_TARGETS | frozenset(_extra_allowed_targets)


def iter_targets(config: Any, path: str = "config") -> Iterable[tuple[str, Any]]:
    """``(path, target)`` for every mapping with a ``target`` key anywhere inside ``config`` (lists included)."""
    config = to_container(config)
    if isinstance(config, Mapping):
        if "target" in config:
            yield f"{path}.target", config["target"]
        for key, value in config.items():
            yield from iter_targets(value, f"{path}.{key}")
    elif isinstance(config, (list, tuple)):
        for index, value in enumerate(config):
            yield from iter_targets(value, f"{path}[{index}]")


def check_targets(config: Any, source: str | os.PathLike, path: str = "config") -> None:
    """Refuse a config from ``source`` (a file we did not write) that names a target off the allow-list.

    Raises :class:`UntrustedTargetError` with one line naming the target, where it sits and the file; nothing
    is imported.
    """
    allowed = allowed_targets()
    for where, target in iter_targets(config, path):
        if target not in allowed:
            raise UntrustedTargetError(
                f"{os.fspath(source)}: {where} names {target!r}, which is not on the allow-list of buildable "
                f"targets; if you trust this file and that code, pass --allow-target {target} "
                f"(ldm.util.allow_target in Python)"
            )


def configs_dir() -> str:
    """The shipped configs: ``ldm/configs/`` inside an installed wheel, else the checkout's top-level ``configs/``
    (the one source: the wheel's copy is made from it at build time)."""
    here = os.path.dirname(os.path.abspath(__file__))
    packaged = os.path.join(here, "configs")
    return packaged if os.path.isdir(packaged) else os.path.join(os.path.dirname(here), "configs")


def find_config(name: str | os.PathLike) -> str:
    """A config file by path, or by the name of a shipped one (``demo/diffusion``, ``autoencoder/kl-f8.yaml``,
    ``stable-diffusion/v2-inference``); ``FileNotFoundError`` listing the shipped names otherwise."""
    name = os.fspath(name)
    if os.path.isfile(name):
        return name
    root = configs_dir()
    for candidate in (name, name + ".yaml"):
        path = os.path.join(root, candidate)
        if os.path.isfile(path):
            return path
    shipped = sorted(os.path.relpath(os.path.join(folder, f), root)[: -len(".yaml")]
                     for folder, _, files in os.walk(root) for f in files if f.endswith(".yaml"))
    raise FileNotFoundError(f"config file not found: {name} (neither a file nor a shipped config: "
                            f"{', '.join(shipped)})")


def load_config(path: str | os.PathLike, overrides: list[str] | None = None, trusted: bool = True) -> DictConfig:
    """Read a YAML config with OmegaConf; ``overrides`` are dotlist items such as ``model.params.lr=1e-4``.

    ``path`` may also name a shipped config (:func:`find_config`: ``demo/diffusion``). ``trusted=False`` for a file
    the user did not write themselves (a run folder, a downloaded YAML): its targets must then be on the allow-list
    (:func:`check_targets`).
    """
    path = find_config(path)
    config = OmegaConf.load(path)
    if not trusted:
        check_targets(config, path)
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


def check_keys(node: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    """``ConfigError`` for keys of ``node`` that nothing reads, each with the nearest known key (a typo such as
    ``precison`` is otherwise ignored without a word)."""
    known = sorted(known)
    unknown = sorted(set(node) - set(known))
    if not unknown:
        return
    described = []
    for key in unknown:
        near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        described.append(f"{where}.{key}" + (f" (did you mean {where}.{near[0]}?)" if near else ""))
    raise ConfigError(f"unknown config key(s): {', '.join(described)}; {where} takes: {', '.join(known)}")


def _check_params(factory: Any, params: Mapping[str, Any], path: str, target: str) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    parameters = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
    check_keys(params, accepted, f"{path}.params")
    missing = [
        p.name
        for p in parameters
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty and p.name not in params
        and p.name != "self"
    ]
    if missing:
        raise ConfigError(f"{path}.params: missing required parameter(s) {missing} for {target}")
    for p in parameters:
        if p.name in params:
            _check_type(params[p.name], p.default, f"{path}.params.{p.name}")


def _check_type(value: Any, default: Any, where: str) -> None:
    """A value whose kind contradicts the parameter's default (a string where the default is a number, ...): a
    ``ConfigError`` naming the key, instead of a ``TypeError`` deep inside the constructor."""
    if value is None or default is None or default is inspect.Parameter.empty:
        return
    # Only the clear contradictions: a parameter may accept more than its default's type (a sampler name or mapping).
    if isinstance(default, bool):
        wrong, expected = isinstance(value, (str, int, float)) and not isinstance(value, bool), "true or false"
    elif isinstance(default, (int, float)):
        wrong, expected = isinstance(value, (str, bool)), "a number"
    else:
        return
    if wrong:
        raise ConfigError(f"{where}: expected {expected}, got {value!r} ({type(value).__name__})")


def instantiate_from_config(config: Mapping[str, Any] | DictConfig, path: str = "config", **extra: Any) -> Any:
    """Build ``target(**params, **extra)`` from a config node.

    ``path`` is the node's location in the whole config (for error messages), e.g. ``model.params.unet_config``.
    Raises ``ConfigError`` (a ``ValueError``) naming ``path`` for a missing or unknown target, unknown
    parameters, or missing required parameters.
    """
    config = to_container(config)
    if not isinstance(config, Mapping):
        raise ConfigError(f"{path}: expected a mapping with 'target' and 'params', got {type(config).__name__}")
    check_keys(config, ("target", "params"), path)
    if "target" not in config:
        raise ConfigError(f"{path}: no 'target' key (keys present: {sorted(config)})")
    target = config["target"]
    factory = get_obj_from_str(target, f"{path}.target")
    params = dict(config.get("params") or {})
    params.update(extra)
    _check_params(factory, params, path, target)
    return factory(**params)
