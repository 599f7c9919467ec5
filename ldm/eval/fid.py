"""FID and KID between generated images and real ones, offline: torchmetrics' metrics on features of a local network.

Both compare feature distributions: images -> features ``[N, D]`` -> a distance between the real and the generated
sets.

* **FID** (Heusel et al. 2017): Gaussians fitted to both feature sets,
  ``FID = |mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2))`` (torchmetrics' ``FrechetInceptionDistance``,
  float64). Biased at small N: compare FIDs only at equal N and equal features.
* **KID** (Binkowski et al. 2018): the unbiased squared MMD with the cubic polynomial kernel
  ``k(x, y) = (x.y / D + 1)^3``, averaged over random subsets (torchmetrics' ``KernelInceptionDistance``); mean
  and std over the subsets. Unbiased, so usable with a few hundred images.

Features, in order of preference:

1. **Inception-v3 pool3** (2048-d), the network every published FID uses, with its weights from a LOCAL file:
   ``--inception-weights PATH`` or ``LDM_INCEPTION_WEIGHTS`` (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``,
   or torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``: the same network, the same keys). Read with
   ``torch.load(weights_only=True)`` or safetensors and loaded into torchmetrics' ``NoTrainInceptionV3``; nothing is
   downloaded and nothing is unpickled. Images are resized to 299 px as the TensorFlow original does
   (torch-fidelity's bilinear resize; torchmetrics' default anti-aliased resize gives other numbers).
2. ``--feature-extractor module.path:callable``: your own network (e.g. a classifier trained on your data). The
   callable is called with no arguments and returns an ``nn.Module`` (or any callable) mapping float images
   ``[N, 3, H, W]`` in ``[0, 1]`` to features ``[N, D]``. On the command line it is your choice, like ``--config``;
   named in a file, it must be on the allow-list of :mod:`ldm.util` (``--allow-target``).
3. Fallbacks for when neither exists (labelled as such wherever a number is reported; not comparable with any
   published FID): :func:`demo_autoencoder_features` (the shipped demo autoencoder's latents, pooled) and
   :func:`random_inception_features` (Inception-v3 with random weights).
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any, Callable, Optional, Sequence
from unittest import mock

import torch
from torch import nn

logger = logging.getLogger(__name__)

INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_ENV = "LDM_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_WEIGHTS_NAME
)
INCEPTION_FEATURES = (64, 192, 768, 2048)
METRICS = ("fid", "kid")


class FeatureExtractorError(ValueError):
    """A feature extractor that cannot be built or gives no ``[N, D]`` features (a user error: exit 2)."""


class InceptionWeightsNotFound(FileNotFoundError):
    """FID's Inception weights are not in a local file (and are never downloaded)."""


# -- the distances (pure functions of two feature sets) -----------------------------------------------------------


class _Given(nn.Module):
    """Identity "feature extractor": the metrics receive features already computed (once per image set)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _check_pair(real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for name, value in (("real", real), ("generated", fake)):
        if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.shape[0] < 2:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} features must be [N >= 2, D], got {shape}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} features hold NaN or inf values")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and generated features differ in width: {real.shape[1]} vs {fake.shape[1]}")
    return real.double(), fake.double()


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID of two feature sets ``[N, D]``: ``|mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2))`` with the sample
    means and unbiased covariances, in float64 (torchmetrics' ``FrechetInceptionDistance``)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _check_pair(real, fake)
    metric = FrechetInceptionDistance(feature=_Given(real.shape[1]))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kernel_distance(
    real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: Optional[int] = None, seed: int = 0
) -> tuple[float, float]:
    """KID of two feature sets ``[N, D]``: mean and std over ``subsets`` random subsets of ``subset_size`` of the
    MMD^2 estimate with ``k(x, y) = (x.y / D + 1)^3`` (torchmetrics' ``KernelInceptionDistance``, Binkowski et al.'s
    estimator)::

        MMD^2 = sum_{i != j} (k(x_i, x_j) + k(y_i, y_j)) / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2

    Default ``subset_size``: :func:`default_kid_subset_size`. The subsets are drawn from ``seed`` (the global RNG is
    left as it was). Note ``KID(x, x) < 0``, not 0: the cross term keeps the pairs ``i = j``; two *independent*
    sets of one distribution give 0 on average."""
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _check_pair(real, fake)
    largest = min(real.shape[0], fake.shape[0])
    subset_size = default_kid_subset_size(real.shape[0], fake.shape[0]) if subset_size is None else int(subset_size)
    if not 2 <= subset_size <= largest:
        raise ValueError(f"KID subset size must be in 2..{largest} (the smaller set's size), got {subset_size}")
    with warnings.catch_warnings():  # "will save all extracted features": that is what is wanted here
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=int(subsets), subset_size=subset_size)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def default_kid_subset_size(n_real: int, n_generated: int) -> int:
    """``min(1000, max(2, min(n_real, n_generated) // 2))``: 1000 as torch-fidelity once the sets are large; half the
    smaller set below that, so the subsets differ and their std says how much the estimate moves."""
    return min(1000, max(2, min(int(n_real), int(n_generated)) // 2))


def distribution_scores(
    real: torch.Tensor, fake: torch.Tensor, metrics: Sequence[str] = METRICS, kid_subsets: int = 100,
    kid_subset_size: Optional[int] = None, seed: int = 0,
) -> dict:
    """``{"fid": float, "kid": {"mean", "std", "subset_size", "subsets"}, "n_real", "n_generated"}`` for the
    metrics asked for."""
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
    scores: dict[str, Any] = {"n_real": int(real.shape[0]), "n_generated": int(fake.shape[0])}
    if "fid" in metrics:
        scores["fid"] = frechet_distance(real, fake)
    if "kid" in metrics:
        size = default_kid_subset_size(real.shape[0], fake.shape[0]) if kid_subset_size is None else int(kid_subset_size)
        mean, std = kernel_distance(real, fake, kid_subsets, size, seed)
        scores["kid"] = {"mean": mean, "std": std, "subset_size": size, "subsets": int(kid_subsets)}
    return scores


# -- images -> features ---------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(extractor: Callable, images: torch.Tensor, batch_size: int = 32,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Features ``[N, D]`` (float64, CPU) of images ``[N, 3, H, W]`` in ``[-1, 1]`` (the project's convention), given
    to ``extractor`` as float32 in ``[0, 1]`` in batches. A ``FeatureExtractorError`` naming the extractor when it
    returns anything but ``[n, D]`` finite features."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    name = getattr(extractor, "description", type(extractor).__name__)
    out = []
    for first in range(0, images.shape[0], batch_size):
        batch = ((images[first:first + batch_size].float().clamp(-1, 1) + 1) / 2).to(device)
        features = extractor(batch)
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != batch.shape[0]:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise FeatureExtractorError(
                f"feature extractor {name} returned {shape} for {batch.shape[0]} images; expected [N, D] features")
        if not bool(torch.isfinite(features).all()):
            raise FeatureExtractorError(f"feature extractor {name} returned NaN or inf features")
        out.append(features.detach().double().cpu())
    return torch.cat(out)


def load_real_images(folder: str | os.PathLike, size: int, limit: Optional[int] = None) -> torch.Tensor:
    """Every image under ``folder`` (recursively: png, jpg, jpeg, webp; captions not needed) as ``[N, 3, size,
    size]`` in ``[-1, 1]``: shorter side resized to ``size``, centre crop, as the training data are read
    (:class:`ldm.data.image_folder.CaptionedImageFolder` with ``caption_source="none"``). ``limit``: the first N in
    file order. Unreadable images are left out with a warning."""
    from ldm.data.image_folder import CaptionedImageFolder

    dataset = CaptionedImageFolder(folder, size=size, caption_source="none")
    count = len(dataset) if limit is None else min(int(limit), len(dataset))
    images = [dataset[index]["image"] for index in range(count)]
    if dataset.num_skipped:
        # an unreadable file is replaced by the next good one (the dataset's wrap-around): drop the repeats
        skipped = set(dataset.skipped_paths)
        images = [image for (path, _), image in zip(dataset.samples[:count], images) if path not in skipped]
        logger.warning("real images under %s: %s", folder, dataset.skip_summary())
    if len(images) < 2:
        raise ValueError(f"--fid {folder}: FID/KID need at least 2 readable images, found {len(images)}")
    return torch.stack(images)


# -- feature extractors ---------------------------------------------------------------------------------------------


def inception_weights_path(path: Optional[str | os.PathLike] = None) -> str:
    """The Inception weights file: ``path``, else ``$LDM_INCEPTION_WEIGHTS``; ``InceptionWeightsNotFound`` (one line
    saying which file and where to put it) when neither names an existing file."""
    given = os.fspath(path) if path else os.environ.get(INCEPTION_WEIGHTS_ENV, "")
    if given and os.path.isfile(given):
        return given
    where = f"{given} does not exist; " if given else ""
    raise InceptionWeightsNotFound(
        f"FID/KID need the FID Inception-v3 weights in a local file ({where}nothing is downloaded): get "
        f"{INCEPTION_WEIGHTS_NAME} ({INCEPTION_WEIGHTS_URL}) on a machine with network, copy it here and pass "
        f"--inception-weights PATH or set {INCEPTION_WEIGHTS_ENV}=PATH; or pass --feature-extractor "
        f"module.path:callable to use another network"
    )


def _inception_module(state_dict: dict, feature: int = 2048) -> nn.Module:
    """torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's FID Inception) holding ``state_dict``.

    torch-fidelity's constructor fetches its weights itself: from the network, or with ``torch.load(...,
    weights_only=False)`` from a file. Both are replaced, for this call only, by a loader that hands over the
    tensors already read safely, so the module is the library's own and no byte is downloaded or unpickled."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception
    from torchmetrics.image.fid import NoTrainInceptionV3

    if feature not in INCEPTION_FEATURES:
        raise ValueError(f"Inception feature layer must be one of {INCEPTION_FEATURES}, got {feature!r}")

    def hand_over(*args, **kwargs):
        return state_dict

    with mock.patch.object(fidelity_inception, "load_state_dict_from_url", hand_over):
        # antialias=False: torch-fidelity's TF1-compatible bilinear resize to 299 px, as the original FID code
        return NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(feature)], antialias=False)


class InceptionFeatures(nn.Module):
    """FID's Inception-v3: float images ``[N, 3, H, W]`` in ``[0, 1]`` -> pool3 features ``[N, 2048]`` (or another
    of :data:`INCEPTION_FEATURES`). Images are quantised to 8 bits first, as FID is defined on image files."""

    def __init__(self, inception: nn.Module, description: str):
        super().__init__()
        self.inception = inception
        self.description = description

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        return self.inception(pixels).float()


def inception_features(weights: Optional[str | os.PathLike] = None, feature: int = 2048) -> InceptionFeatures:
    """The FID Inception network with its weights read from a local file (:func:`inception_weights_path`), safely:
    safetensors, or ``torch.load(weights_only=True)``. Errors name the file."""
    from ldm.checkpoint import load_state_dict

    path = inception_weights_path(weights)
    state_dict = dict(load_state_dict(path))
    try:
        module = _inception_module(state_dict, feature)
    except RuntimeError as error:  # load_state_dict(strict) with missing / unexpected keys or other shapes
        summary = " ".join(str(error).split())[:400]
        raise FeatureExtractorError(
            f"{path}: not the FID Inception-v3 weights ({INCEPTION_WEIGHTS_NAME} expected): {summary}") from None
    return InceptionFeatures(module, f"Inception-v3 {feature}-d ({os.path.basename(path)})")


def random_inception_state_dict(seed: int = 0) -> dict:
    """A randomly initialised FID Inception-v3 state dict (torchvision's ``Inception3`` with 1008 classes and no
    auxiliary head has exactly the FID network's keys and shapes), from ``seed``."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True, num_classes=1008)
    return network.state_dict()


def random_inception_features(seed: int = 0, feature: int = 2048) -> InceptionFeatures:
    """FALLBACK: Inception-v3 with random weights. Its FID/KID measure differences between image sets, but are not
    FID in the usual sense and compare with nothing published; labelled so in every report."""
    module = _inception_module(random_inception_state_dict(seed), feature)
    return InceptionFeatures(module, f"RANDOM-WEIGHT Inception-v3 (seed {seed}), {feature}-d: not a standard FID")


class AutoencoderFeatures(nn.Module):
    """FALLBACK: an autoencoder's scaled latent means ``z = scale E(x)``, average-pooled to ``grid x grid`` cells and
    flattened (``C grid^2`` features): colour and layout at coarse resolution, from a network trained on the data.
    Not comparable with any published FID."""

    def __init__(self, autoencoder: nn.Module, scale_factor: float, grid: int, description: str):
        super().__init__()
        self.autoencoder = autoencoder.eval()
        self.scale_factor = float(scale_factor)
        self.grid = int(grid)
        self.description = description

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.autoencoder.parameters()).dtype
        z = self.autoencoder.encode((images * 2 - 1).to(dtype)).mode().float() * self.scale_factor
        return nn.functional.adaptive_avg_pool2d(z, self.grid).flatten(1)


def demo_autoencoder_features(checkpoint: Optional[str] = None, grid: int = 4) -> AutoencoderFeatures:
    """FALLBACK features from the shipped demo model's autoencoder (or that of ``checkpoint``, one of our model
    files); ``--feature-extractor ldm.eval.fid:demo_autoencoder_features`` on the command line."""
    from ldm.assets import DEMO_CHECKPOINT
    from ldm.models.latent_diffusion import LatentDiffusion

    path = checkpoint or DEMO_CHECKPOINT
    model = LatentDiffusion.from_checkpoint(path)
    channels = int(model.latent_shape(64, 64)[0])
    return AutoencoderFeatures(
        model.first_stage_model.float(), float(model.scale_factor), grid,
        f"AUTOENCODER latents of {os.path.basename(path)}, {grid}x{grid} mean-pooled ({channels * grid * grid}-d): "
        f"not a standard FID",
    )


class _CallableFeatures(nn.Module):
    def __init__(self, function: Callable, description: str):
        super().__init__()
        self.function = function
        self.description = description

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.function(images)


def load_feature_extractor(spec: str, trusted: bool = True, source: Optional[str] = None) -> nn.Module:
    """The network named ``module.path:callable``, called with no arguments; an ``nn.Module`` (or a callable,
    wrapped) mapping images ``[N, 3, H, W]`` in ``[0, 1]`` to ``[N, D]``.

    ``trusted=False`` (a name read from a file, ``source``): ``module.path.callable`` must be on :mod:`ldm.util`'s
    allow-list, checked before anything is imported. Errors name ``--feature-extractor`` and the value."""
    from ldm.util import check_targets

    flag = f"--feature-extractor {spec}"
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise FeatureExtractorError(f"{flag}: expected module.path:callable, e.g. mypkg.features:build_network")
    module_name, attribute = spec.split(":")
    if not module_name or not attribute:
        raise FeatureExtractorError(f"{flag}: expected module.path:callable, e.g. mypkg.features:build_network")
    if not trusted:
        check_targets({"target": f"{module_name}.{attribute}"}, source or "<file>", "feature_extractor")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise FeatureExtractorError(f"{flag}: cannot import module {module_name!r} ({error})") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise FeatureExtractorError(f"{flag}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise FeatureExtractorError(f"{flag}: {attribute!r} is not callable")
    network = target()
    if isinstance(network, nn.Module):
        network.eval()
        if not hasattr(network, "description"):
            network.description = spec
        return network
    if callable(network):
        return _CallableFeatures(network, spec)
    raise FeatureExtractorError(
        f"{flag}: calling it returned {type(network).__name__}; expected an nn.Module or callable giving [N, D]")


def build_feature_extractor(feature_extractor: Optional[str] = None, inception_weights: Optional[str] = None,
                            trusted: bool = True, source: Optional[str] = None) -> nn.Module:
    """``--feature-extractor`` when given, else the Inception network from ``--inception-weights`` /
    ``$LDM_INCEPTION_WEIGHTS`` (an ``InceptionWeightsNotFound`` saying what to do when that file is missing)."""
    if feature_extractor:
        return load_feature_extractor(feature_extractor, trusted=trusted, source=source)
    return inception_features(inception_weights)
