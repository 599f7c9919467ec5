"""Precomputed autoencoder latents (and frozen text contexts), so diffusion training need not run the encoders.

A cache folder (written by ``ldm cache-latents``, :func:`write_latent_cache`)::

    DIR/
      latent_cache.json             the manifest, written last (see below)
      chunk-000000.safetensors      mean, std [n,C,h,w]; with flips also mean_flipped, std_flipped [n,C,h,w];
                                    with a text encoder context [n,L,D]; the n captions (JSON) in its metadata
      chunk-000001.safetensors
      empty_context.safetensors     the empty prompt's context [1,L,D] (only with contexts; checks the encoder)

Each image keeps its posterior ``q(z|x) = N(mean, diag(std^2))``, not one latent, so training still draws a fresh
``z = mean + std * eps`` every time it sees the image, as CompVis does when encoding on the fly
(``DiffusionTrainer.batch_loss``). ``--flip`` caches the posterior of the mirrored image too, and the dataset picks
one of the two per item: a flip of the latent grid is not the latent of the flipped image.

The manifest records what the latents depend on: the autoencoder's :func:`autoencoder_fingerprint`, the scale
factor, the image size, crop and flips, the latent shape and, with contexts, the text encoder's fingerprint.
:meth:`LatentCacheDataset.check_compatible` refuses a model these do not fit. Every file is written to a temp name
and renamed, the manifest after all chunks: an interrupted run leaves no manifest, and a folder without one is not a
cache. Reading uses only JSON and safetensors (nothing is unpickled).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from ldm.checkpoint import atomic_write
from ldm.data.sources import CACHE_MANIFEST

log = logging.getLogger(__name__)

FORMAT = "ldm-latent-cache"
VERSION = 1
FLIPS = ("none", "both")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CROPS = ("center", "random")

# batch / item keys (what DiffusionTrainer reads)
LATENT_MEAN = "latent_mean"
LATENT_STD = "latent_std"
CONTEXT = "context"
CAPTION = "caption"

# tensors inside a chunk file, and the metadata key of its captions
MEAN, STD, MEAN_FLIPPED, STD_FLIPPED = "mean", "std", "mean_flipped", "std_flipped"
CAPTIONS = "captions"
CHUNK_NAME = "chunk-{:06d}.safetensors"
EMPTY_CONTEXT_FILE = "empty_context.safetensors"
MANIFEST_KEYS = ("format", "version", "num_samples", "latent_shape", "dtype", "image_size", "crop", "flips",
                 "scale_factor", "autoencoder", "text_encoder", "source", "chunks")


# ---------------------------------------------------------------- fingerprints
def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor in row-major order (bf16 too, which numpy cannot hold)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def weights_fingerprint(weights: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) of a module's ``state_dict()`` or a state dict: over the sorted keys and, per key, the dtype,
    the shape and the bytes of the tensor. Equal weights in equal dtypes give equal fingerprints wherever the
    module lives (CPU or GPU); a single changed value, a cast or a renamed key changes it."""
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key]
        data = _tensor_bytes(tensor)
        # each field framed with its length, so that no two different state dicts hash the same byte stream
        header = json.dumps([key, str(tensor.dtype), list(tensor.shape), len(data)]).encode()
        digest.update(len(header).to_bytes(8, "little") + header)
        digest.update(data)
    return digest.hexdigest()


def autoencoder_fingerprint(autoencoder: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """:func:`weights_fingerprint` of an autoencoder (module or state dict): what the cached latents depend on."""
    return weights_fingerprint(autoencoder)


# ---------------------------------------------------------------- writing
def posterior_moments(autoencoder: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[B,3,H,W]`` in [-1, 1] -> the posterior's ``(mean, std)``, each ``[B,C,H/f,W/f]`` float32 on the CPU,
    with ``std = exp(logvar / 2)`` of the clamped logvar (``DiagonalGaussianDistribution``), unscaled."""
    parameter = next(autoencoder.parameters())
    with torch.no_grad():
        posterior = autoencoder.encode(images.to(parameter.device, parameter.dtype))
    return posterior.mean.float().cpu(), posterior.std.float().cpu()


def encode_batch(autoencoder: torch.nn.Module, images: torch.Tensor, captions: Sequence[str],
                 text_encoder: torch.nn.Module | None = None, flips: str = "none") -> dict[str, torch.Tensor]:
    """One batch's chunk tensors: ``mean``, ``std`` ``[B,C,h,w]``; with ``flips="both"`` also ``mean_flipped``,
    ``std_flipped``, the posterior of the horizontally mirrored image ``x[..., ::-1]`` (what the image folder's flip
    gives after its crop); with a text encoder ``context`` ``[B,L,D]``. float32, CPU."""
    tensors = dict(zip((MEAN, STD), posterior_moments(autoencoder, images)))
    if flips == "both":
        tensors.update(zip((MEAN_FLIPPED, STD_FLIPPED), posterior_moments(autoencoder, images.flip(-1))))
    if text_encoder is not None:
        with torch.no_grad():
            tensors[CONTEXT] = text_encoder.encode(list(captions)).float().cpu()
    return tensors


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                       dtype: torch.dtype | None = None) -> None:
    """Atomically write ``tensors`` (cast to ``dtype`` when given) with string ``metadata``."""
    tensors = {key: (value.to(dtype) if dtype is not None else value).contiguous() for key, value in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=dict(metadata or {})))


def _write_chunk(root: Path, index: int, parts: list[dict[str, torch.Tensor]], captions: list[str],
                 dtype: torch.dtype) -> dict:
    """Concatenate buffered batches into chunk ``index``; returns its manifest entry ``{file, num_samples}``."""
    name = CHUNK_NAME.format(index)
    tensors = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    _write_safetensors(root / name, tensors, {CAPTIONS: json.dumps(captions, ensure_ascii=False)}, dtype)
    return {"file": name, "num_samples": len(captions)}


def _batch_images_and_captions(batch: Any, image_key: str, caption_key: str, where: int) -> tuple[torch.Tensor, list]:
    if not isinstance(batch, Mapping) or image_key not in batch or caption_key not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"batch {where}: expected a mapping with {image_key!r} and {caption_key!r}, got {keys}")
    images, captions = batch[image_key], batch[caption_key]
    captions = [captions] if isinstance(captions, str) else list(captions)
    if images.ndim != 4 or images.shape[0] != len(captions):
        raise ValueError(f"batch {where}: images {tuple(images.shape)} do not match {len(captions)} captions")
    return images, captions


def write_latent_cache(
    out: str | os.PathLike,
    autoencoder: torch.nn.Module,
    scale_factor: float,
    batches: Iterable[Mapping[str, Any]],
    image_size: int,
    crop: str = "center",
    flips: str = "none",
    text_encoder: torch.nn.Module | None = None,
    dtype: str | torch.dtype = "float32",
    source: str | None = None,
    autoencoder_path: str | None = None,
    text_encoder_path: str | None = None,
    chunk_size: int = 1024,
    image_key: str = "image",
    caption_key: str = "caption",
) -> dict:
    """Encode every batch ``{image_key: [B,3,H,W] in [-1, 1], caption_key: list[str]}`` of ``batches`` (a
    ``DataLoader``) and write the cache to ``out``; returns the manifest.

    ``scale_factor`` is the autoencoder's (``z = scale_factor * E(x)``); it is recorded, not applied: the cache holds
    the unscaled posterior. ``image_size``, ``crop``: how the images were made (recorded, and the images are
    checked to be ``image_size`` square). ``flips``: ``"none"`` or ``"both"`` (also the mirrored images).
    ``text_encoder``: a frozen encoder whose contexts are cached. ``dtype``: storage dtype of the tensors
    (``float32``, ``bfloat16``, ``float16``; bfloat16 halves the disk for a relative rounding error of at most 2^-8).
    ``chunk_size``: samples per chunk file (chunks end on batch boundaries). Refuses a folder holding a cache.
    """
    root = Path(out)
    if (root / CACHE_MANIFEST).exists():
        raise ValueError(f"{root} already holds a latent cache ({CACHE_MANIFEST}); choose another --out folder "
                         f"or delete it first")
    if flips not in FLIPS:
        raise ValueError(f"flips must be one of {FLIPS}, got {flips!r}")
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    storage = _storage_dtype(dtype)
    root.mkdir(parents=True, exist_ok=True)
    with _eval_mode(autoencoder, text_encoder):
        chunks, latent_shape, context_shape = _write_chunks(
            root, autoencoder, batches, image_size, flips, text_encoder, storage, chunk_size, image_key, caption_key)
        text = None
        if text_encoder is not None:
            text = _write_empty_context(root, text_encoder, text_encoder_path, context_shape)
    manifest = {
        "format": FORMAT, "version": VERSION,
        "num_samples": sum(chunk["num_samples"] for chunk in chunks),
        "latent_shape": latent_shape, "dtype": str(storage).replace("torch.", ""),
        "image_size": int(image_size), "crop": crop, "flips": flips, "scale_factor": float(scale_factor),
        "autoencoder": {"fingerprint": autoencoder_fingerprint(autoencoder), "path": autoencoder_path},
        "text_encoder": text, "source": source, "chunks": chunks,
    }
    # last, so that a manifest always names chunks that exist
    atomic_write(root / CACHE_MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1) + "\n"))
    return manifest


@contextlib.contextmanager
def _eval_mode(*modules: torch.nn.Module | None):
    """Run ``modules`` (``None`` skipped) in eval mode, each one's own mode restored after: what is cached must not
    depend on dropout or on whether the caller was training."""
    modes = [(module, module.training) for module in modules if module is not None]
    for module, _ in modes:
        module.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.train(mode)


def _storage_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _write_chunks(root, autoencoder, batches, image_size, flips, text_encoder, storage, chunk_size, image_key,
                  caption_key) -> tuple[list[dict], list[int], list[int] | None]:
    """Encode and write the chunks; ``(chunk entries, latent shape [C,h,w], context shape [L,D] or None)``."""
    chunks: list[dict] = []
    parts: list[dict[str, torch.Tensor]] = []
    captions: list[str] = []
    latent_shape = context_shape = None
    for number, batch in enumerate(batches):
        images, batch_captions = _batch_images_and_captions(batch, image_key, caption_key, number)
        if tuple(images.shape[-2:]) != (image_size, image_size):
            raise ValueError(f"batch {number}: images are {tuple(images.shape[-2:])}, the cache's image_size is "
                             f"{image_size}")
        part = encode_batch(autoencoder, images, batch_captions, text_encoder, flips)
        latent_shape = list(part[MEAN].shape[1:])
        context_shape = list(part[CONTEXT].shape[1:]) if CONTEXT in part else None
        parts.append(part)
        captions += batch_captions
        if len(captions) >= chunk_size:
            chunks.append(_write_chunk(root, len(chunks), parts, captions, storage))
            parts, captions = [], []
    if captions:
        chunks.append(_write_chunk(root, len(chunks), parts, captions, storage))
    if not chunks:
        raise ValueError(f"no images to cache into {root}: the data source yielded no batches")
    return chunks, latent_shape, context_shape


def _write_empty_context(root: Path, text_encoder, path: str | None, context_shape: list[int]) -> dict:
    """Store the empty prompt's context (float32) beside the chunks: :meth:`LatentCacheDataset.check_compatible`
    compares it with the training model's, which catches what the weights alone do not (layer, max_length)."""
    with torch.no_grad():
        empty = text_encoder.encode([""]).float().cpu()
    _write_safetensors(root / EMPTY_CONTEXT_FILE, {CONTEXT: empty})
    return {"fingerprint": weights_fingerprint(text_encoder), "path": path, "context_shape": context_shape,
            "empty_context": EMPTY_CONTEXT_FILE}


# ---------------------------------------------------------------- reading
def _fail(where: Path, message: str) -> ValueError:
    return ValueError(f"{where}: {message}; re-create the cache with `ldm cache-latents`")


def read_manifest(root: str | os.PathLike) -> dict:
    """The manifest of the cache in ``root``, checked for the keys and value kinds this reader needs;
    ``FileNotFoundError``/``ValueError`` naming the file otherwise."""
    path = Path(root) / CACHE_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {root} is not a latent cache (write one with ldm cache-latents; "
                                f"an interrupted run leaves no manifest)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _fail(path, f"not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail(path, f"not a latent cache manifest (no \"format\": \"{FORMAT}\")")
    if manifest.get("version") != VERSION:
        raise _fail(path, f"cache version {manifest.get('version')!r}; this code reads version {VERSION}")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise _fail(path, f"missing key(s) {missing}")
    _check_manifest_values(path, manifest)
    return manifest


def _check_manifest_values(path: Path, manifest: dict) -> None:
    shape = manifest["latent_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(n, int) and n > 0 for n in shape)):
        raise _fail(path, f"latent_shape must be [C, h, w], got {shape!r}")
    if not isinstance(manifest["image_size"], int) or manifest["image_size"] < 1:
        raise _fail(path, f"image_size must be a positive integer, got {manifest['image_size']!r}")
    autoencoder = manifest["autoencoder"]
    if not isinstance(autoencoder, dict) or not isinstance(autoencoder.get("fingerprint"), str):
        raise _fail(path, f"autoencoder must be {{\"fingerprint\": sha256, ...}}, got {autoencoder!r}")
    if manifest["flips"] not in FLIPS:
        raise _fail(path, f"flips must be one of {FLIPS}, got {manifest['flips']!r}")
    if not isinstance(manifest["scale_factor"], (int, float)) or not manifest["scale_factor"] > 0:
        raise _fail(path, f"scale_factor must be a positive number, got {manifest['scale_factor']!r}")
    chunks = manifest["chunks"]
    if not isinstance(chunks, list) or not chunks or not all(
            isinstance(c, dict) and isinstance(c.get("file"), str) and isinstance(c.get("num_samples"), int)
            and c["num_samples"] > 0 for c in chunks):
        raise _fail(path, "chunks must be a non-empty list of {\"file\": name, \"num_samples\": n > 0}")
    for chunk in chunks:
        name = chunk["file"]
        if Path(name).name != name or name in ("", ".", ".."):  # a manifest must not reach outside its folder
            raise _fail(path, f"chunk file {name!r} is not a plain file name")
    if sum(c["num_samples"] for c in chunks) != manifest["num_samples"]:
        raise _fail(path, f"num_samples {manifest['num_samples']} is not the sum of the chunks' sizes")
    text = manifest["text_encoder"]
    if text is not None and not (isinstance(text, dict) and isinstance(text.get("fingerprint"), str)
                                 and isinstance(text.get("context_shape"), list)):
        raise _fail(path, f"text_encoder must be null or {{fingerprint, context_shape, ...}}, got {text!r}")


def _chunk_keys(manifest: dict) -> dict[str, list[int]]:
    """Tensor name -> per-sample shape, as the manifest says every chunk holds them."""
    keys = {MEAN: manifest["latent_shape"], STD: manifest["latent_shape"]}
    if manifest["flips"] == "both":
        keys.update({MEAN_FLIPPED: manifest["latent_shape"], STD_FLIPPED: manifest["latent_shape"]})
    if manifest["text_encoder"] is not None:
        keys[CONTEXT] = manifest["text_encoder"]["context_shape"]
    return keys


def read_chunk_captions(path: Path, num_samples: int, keys: Mapping[str, list[int]]) -> list[str]:
    """Check chunk ``path`` (header only: its tensors and their shapes ``[num_samples, *shape]``) and return its
    captions; ``FileNotFoundError``/``ValueError`` naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: chunk named by {path.parent / CACHE_MANIFEST} is missing; the cache is "
                                f"incomplete, re-create it with `ldm cache-latents`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise _fail(path, f"not a readable safetensors chunk ({error})") from None
    for key, shape in keys.items():
        if key not in shapes:
            raise _fail(path, f"no tensor {key!r} (holds {sorted(shapes)})")
        if list(shapes[key]) != [num_samples, *shape]:
            raise _fail(path, f"tensor {key!r} has shape {shapes[key]}, the manifest says {[num_samples, *shape]}")
    try:
        captions = json.loads(metadata[CAPTIONS])
    except (KeyError, json.JSONDecodeError):
        raise _fail(path, f"metadata {CAPTIONS!r} is missing or not JSON") from None
    if not isinstance(captions, list) or len(captions) != num_samples or not all(isinstance(c, str) for c in captions):
        raise _fail(path, f"metadata {CAPTIONS!r} must be a list of {num_samples} strings")
    return captions


class LatentCacheDataset(Dataset):
    """The cache in ``root`` as a dataset: ``item = {"latent_mean": [C,h,w], "latent_std": [C,h,w], "caption": str}``
    (float32, the unscaled posterior) plus ``"context": [L,D]`` (float32) when contexts were cached.

    Args:
        root: the cache folder (holding ``latent_cache.json``).
        flip: ``None`` (default): a cache made with ``--flip`` gives the original or the mirrored image's posterior
            with probability 1/2 each (torch's RNG, which a ``DataLoader`` seeds per worker), a cache without
            flips gives the originals. ``True``: the same random choice, and ``ValueError`` for a cache without
            flips. ``False``: always the originals.

    Every chunk's header is checked at construction (a missing or damaged chunk names its file); tensors are read
    per item from the memory-mapped chunk files.
    """

    MAX_OPEN_CHUNKS = 16  # open handles per process (each DataLoader worker has its own)

    def __init__(self, root: str | os.PathLike, flip: bool | None = None):
        self.root = Path(root).resolve()
        self.manifest = read_manifest(self.root)
        cached_flips = self.manifest["flips"] == "both"
        if flip and not cached_flips:
            raise ValueError(f"{self.root}: flip=True but this latent cache holds no flipped latents; re-cache with "
                             f"--flip (ldm cache-latents ... --flip) or train without flips")
        self.flip = cached_flips if flip is None else bool(flip)
        self.has_context = self.manifest["text_encoder"] is not None
        keys = _chunk_keys(self.manifest)
        self.files = [self.root / chunk["file"] for chunk in self.manifest["chunks"]]
        self.captions = [read_chunk_captions(path, chunk["num_samples"], keys)
                         for path, chunk in zip(self.files, self.manifest["chunks"])]
        self._starts = [0]
        for captions in self.captions:
            self._starts.append(self._starts[-1] + len(captions))
        self._handles: OrderedDict[int, Any] = OrderedDict()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()  # open files do not travel to DataLoader workers
        return state

    def __len__(self) -> int:
        return self._starts[-1]

    def _handle(self, chunk: int):
        if chunk in self._handles:
            self._handles.move_to_end(chunk)
            return self._handles[chunk]
        handle = safe_open(str(self.files[chunk]), framework="pt")
        self._handles[chunk] = handle
        if len(self._handles) > self.MAX_OPEN_CHUNKS:
            self._handles.popitem(last=False)
        return handle

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for the latent cache {self.root} of {n} samples")
        index %= n
        chunk = bisect.bisect_right(self._starts, index) - 1
        row = index - self._starts[chunk]
        handle = self._handle(chunk)
        mirrored = self.flip and bool(torch.rand(()) < 0.5)
        mean_key, std_key = (MEAN_FLIPPED, STD_FLIPPED) if mirrored else (MEAN, STD)
        item = {LATENT_MEAN: handle.get_slice(mean_key)[row].float(),
                LATENT_STD: handle.get_slice(std_key)[row].float(),
                CAPTION: self.captions[chunk][row]}
        if self.has_context:
            item[CONTEXT] = handle.get_slice(CONTEXT)[row].float()
        return item

    # ---------------------------------------------------------------- compatibility
    def check_compatible(self, model, text_encoder: bool = True) -> None:
        """``ValueError`` naming this cache and every difference when ``model`` (a ``LatentDiffusion``) cannot train
        on it: another autoencoder (fingerprint), scale factor or latent shape, an inpainting model (it needs
        pixels) and, when contexts are cached and ``text_encoder`` is true, another text encoder (fingerprint and
        the empty prompt's context). Pass ``text_encoder=False`` when the text encoder trains
        (``cond_stage_trainable``): the trainer then ignores the cached contexts."""
        problems = compatibility_problems(self.manifest, self.root, model, text_encoder and self.has_context)
        if problems:
            raise ValueError(f"the latent cache {self.root} does not fit this model: " + "; ".join(problems)
                             + "; re-cache with `ldm cache-latents` for this model")
        image_size = (getattr(model, "config", None) or {}).get("image_size")
        if image_size is not None and int(image_size) != self.manifest["image_size"]:
            log.warning("the latent cache %s holds %dpx images, the model's config says image_size %s",
                        self.root, self.manifest["image_size"], image_size)

    def __repr__(self) -> str:
        return (f"LatentCacheDataset(root={str(self.root)!r}, n={len(self)}, flip={self.flip}, "
                f"context={self.has_context})")


def compatibility_problems(manifest: dict, root: Path, model, check_text: bool) -> list[str]:
    """What differs between the cache described by ``manifest`` and ``model`` (empty when it fits)."""
    problems = []
    if (getattr(model, "config", None) or {}).get("inpainting"):
        problems.append("the model is an inpainting model (9-channel UNet), which trains on masked pixels a latent "
                        "cache does not hold; train it from images")
    cached = manifest["autoencoder"]["fingerprint"]
    actual = autoencoder_fingerprint(model.first_stage_model)
    if cached != actual:
        made_with = manifest["autoencoder"].get("path") or "another autoencoder"
        problems.append(f"autoencoder fingerprint {actual[:16]} differs from the cache's {cached[:16]} "
                        f"(made with {made_with})")
    if not math.isclose(float(model.scale_factor), manifest["scale_factor"], rel_tol=1e-6):
        problems.append(f"scale factor {model.scale_factor!r} differs from the cache's {manifest['scale_factor']!r}")
    size = manifest["image_size"]
    try:
        shape = list(model.latent_shape(size, size))
    except ValueError as error:
        problems.append(f"its {size}px images do not fit the model ({error})")
    else:
        if shape != manifest["latent_shape"]:
            problems.append(f"latent shape [C, h, w] {shape} (latent channels {shape[0]}) differs from the cache's "
                            f"{manifest['latent_shape']}")
    if check_text:
        problems += _text_encoder_problems(manifest, root, model)
    return problems


def _text_encoder_problems(manifest: dict, root: Path, model) -> list[str]:
    text = manifest["text_encoder"]
    actual = weights_fingerprint(model.cond_stage_model)
    if actual != text["fingerprint"]:
        made_with = text.get("path") or "another text encoder"
        return [f"text encoder fingerprint {actual[:16]} differs from the one the contexts were cached with "
                f"{text['fingerprint'][:16]} ({made_with})"]
    path = root / text.get("empty_context", EMPTY_CONTEXT_FILE)
    try:
        with safe_open(str(path), framework="pt") as handle:
            cached = handle.get_tensor(CONTEXT)
    except Exception as error:  # a missing or damaged file: say which
        raise _fail(path, f"cannot read the cached empty-prompt context ({error})") from None
    with torch.no_grad():
        empty = model.encode_text([""]).float().cpu()
    if empty.shape != cached.shape:
        return [f"text context shape {list(empty.shape[1:])} differs from the cache's {list(cached.shape[1:])}"]
    # same weights, other settings (layer, max_length) give other contexts; device numerics (TF32) stay well inside
    tolerance = 1e-2 * (1.0 + float(cached.abs().max()))
    if float((empty - cached).abs().max()) > tolerance:
        return ["the text encoder has the cache's weights but encodes the empty prompt differently (another layer "
                "or max_length in its config?)"]
    return []
