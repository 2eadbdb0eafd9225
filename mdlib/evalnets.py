"""The evaluation networks of the eight-metric table (docs/evaluation.md; taught in lesson 06).

Five networks give the table's feature metrics, each read at the layer the field uses:

===============  =====================================  ===========  =====================================
metric           network, layer                         input (px)   compared by
===============  =====================================  ===========  =====================================
AlexNet(2)       AlexNet ``features.4`` (ReLU, conv2)   256          two-way identification (%)
AlexNet(5)       AlexNet ``features.11`` (ReLU, conv5)  256          two-way identification (%)
InceptionV3      Inception v3 ``avgpool`` (2048)        342          two-way identification (%)
CLIP             CLIP ViT-L/14 image embedding (768)    224          two-way identification (%)
EffNet-B         EfficientNet-B1 ``avgpool`` (1280)     255          correlation distance (1 - r)
SwAV             SwAV ResNet-50 ``avgpool`` (2048)      224          correlation distance (1 - r)
===============  =====================================  ===========  =====================================

The input sizes are MindEye's; Brain-Diffuser gave every network 224 px (``sizes=``). Images are resized
once, bilinear with antialiasing (the "mdlib" protocol: MindEye's pinned torchvision did not antialias and went
through 256 px first; docs/evaluation.md and :mod:`mdlib.protocols`), and normalised with ImageNet's mean/std,
CLIP with CLIP's own.

Weights (``weights=``): ``"pretrained"`` loads the published weights (torchvision's ImageNet weights for
AlexNet, Inception v3 and EfficientNet-B1 ``IMAGENET1K_V2``; Facebook's SwAV 800-epoch ResNet-50; OpenAI's
ViT-L/14 from the Hugging Face hub) and downloads what is missing; ``"auto"`` (default) uses each file that is
already on this machine (torch hub's ``checkpoints/`` folder, the Hugging Face cache) and builds the same
network with seeded random weights where it is not, never downloading; ``"random"`` uses random weights
throughout. Every network states its weight source (:meth:`EvalNetworks.header`), and a table built on any
random-weight network says so in its header: such numbers compare rows of one table, never published ones.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mdlib.device import resolve_device
from mdlib.models import WeightsNotFoundError

WEIGHT_POLICIES = ("auto", "pretrained", "random")
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
#: Facebook's SwAV ResNet-50 (800 epochs), the file torch.hub's ``facebookresearch/swav:main`` loads.
SWAV_URL = "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar"


@dataclass(frozen=True)
class FeatureMetric:
    """One feature column of the eight-metric table: ``network``'s output at ``node``, compared by ``kind``
    (``"identification"``: two-way identification in percent, higher is better; ``"distance"``: mean
    correlation distance 1 - r of matched images, lower is better)."""

    name: str
    network: str
    node: str
    kind: str


FEATURE_METRICS: tuple[FeatureMetric, ...] = (
    FeatureMetric("AlexNet(2)", "alexnet", "features.4", "identification"),
    FeatureMetric("AlexNet(5)", "alexnet", "features.11", "identification"),
    FeatureMetric("InceptionV3", "inception", "avgpool", "identification"),
    FeatureMetric("CLIP", "clip", "embedding", "identification"),
    FeatureMetric("EffNet-B", "effnet", "avgpool", "distance"),
    FeatureMetric("SwAV", "swav", "avgpool", "distance"),
)
METRICS_BY_NAME = {m.name: m for m in FEATURE_METRICS}


@dataclass(frozen=True)
class NetworkSpec:
    """An evaluation network: its title, input size (px, MindEye's) and input normalisation."""

    key: str
    title: str
    size: int
    normalization: str


NETWORKS: dict[str, NetworkSpec] = {
    "alexnet": NetworkSpec("alexnet", "AlexNet", 256, "imagenet"),
    "inception": NetworkSpec("inception", "Inception v3", 342, "imagenet"),
    "clip": NetworkSpec("clip", "CLIP ViT-L/14", 224, "clip"),
    "effnet": NetworkSpec("effnet", "EfficientNet-B1", 255, "imagenet"),
    "swav": NetworkSpec("swav", "SwAV ResNet-50", 224, "imagenet"),
}


def _torchvision_weights(key: str):
    from torchvision import models as tvm

    return {"alexnet": tvm.AlexNet_Weights.IMAGENET1K_V1, "inception": tvm.Inception_V3_Weights.IMAGENET1K_V1,
            "effnet": tvm.EfficientNet_B1_Weights.IMAGENET1K_V2}.get(key)


def weights_url(key: str) -> str | None:
    """Where a network's published weights are downloaded from (None for CLIP, which comes from the hub)."""
    if key == "swav":
        return SWAV_URL
    w = _torchvision_weights(key)
    return None if w is None else w.url


def checkpoints_dir() -> Path:
    """torch hub's download folder (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/hub/...``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_weights_file(key: str) -> Path | None:
    """The local file of a torchvision/SwAV network's weights, where torch hub keeps downloads."""
    url = weights_url(key)
    return None if url is None else checkpoints_dir() / os.path.basename(url)


def _architecture(key: str, clip_name: str) -> torch.nn.Module:
    """The network with freshly initialised weights (the caller seeds torch's generator)."""
    from torchvision import models as tvm

    if key == "alexnet":
        return tvm.alexnet(weights=None)
    if key == "inception":
        # As torchvision builds it for the Google weights: the aux head exists, and transform_input maps
        # ImageNet-normalised input to the [-1, 1] scaling those weights were trained with.
        return tvm.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=True)
    if key == "effnet":
        return tvm.efficientnet_b1(weights=None)
    if key == "swav":
        return tvm.resnet50(weights=None)
    if key == "clip":
        import logging

        import open_clip

        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # open_clip logs that no weights were loaded: we know
        try:
            return open_clip.create_model(clip_name, pretrained=None).visual
        finally:
            logging.getLogger().setLevel(quiet)
    raise KeyError(f"unknown evaluation network {key!r}; known: {sorted(NETWORKS)}")


def _load_state_dict(key: str, download: bool, progress: bool) -> dict[str, torch.Tensor]:
    url = weights_url(key)
    assert url is not None
    target = cached_weights_file(key)
    if not download and not target.is_file():
        raise FileNotFoundError(target)
    try:
        # torchvision's own file names carry a hash prefix, checked on download; weights_only: tensors only.
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=progress,
                                                   check_hash=key != "swav", weights_only=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a hash mismatch a RuntimeError
        raise RuntimeError(
            f"could not load the {NETWORKS[key].title} weights from {url} ({type(err).__name__}: {err}).\n"
            f"Download the file on a connected machine into {target}, or evaluate with weights='auto' or "
            f"'random' (random-weight networks, flagged in every table).") from None
    if key == "swav":
        # The SwAV checkpoint was saved from DistributedDataParallel and holds the projection head and
        # prototypes too: keep the ResNet-50 trunk, which has no classifier (fc) in SwAV.
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith(("projection_head", "prototypes"))}
    return state


def _clip_weights(download: bool, cache_dir) -> Path:
    from mdlib import models

    return models.resolve_clip_weights("clip_eval", local_files_only=None if download else True,
                                       cache_dir=cache_dir)


class EvalNetworks:
    """The evaluation networks, loaded on first use, with their features cached per image set.

    Args:
        weights: ``"auto"`` (default: pretrained where the file is on this machine, else random, never
            downloading), ``"pretrained"`` (download what is missing; fail if that is impossible) or
            ``"random"`` (random weights everywhere). See the module docstring.
        device, dtype: where the networks run (None: CUDA when available; float32).
        seed: random weights are drawn from ``seed`` (plus a fixed offset per network): reproducible.
        batch_size: images per forward pass.
        sizes: input size per network key, overriding :data:`NETWORKS` (e.g. Brain-Diffuser's 224).
        cache_dir: the Hugging Face cache for CLIP's weights (default: the library's).
        progress: tqdm bars while extracting features.

    >>> nets = EvalNetworks(weights="random")                                     # doctest: +SKIP
    >>> feats = nets.features(stimuli)  # {"AlexNet(2)": (n, 43200), ..., "SwAV": (n, 2048)}
    """

    def __init__(self, weights: str = "auto", device: str | torch.device | None = None,
                 dtype: torch.dtype | str | None = None, seed: int = 0, batch_size: int = 16,
                 sizes: Mapping[str, int] | None = None, cache_dir: str | os.PathLike | None = None,
                 progress: bool = True) -> None:
        if weights not in WEIGHT_POLICIES:
            raise ValueError(f"weights must be one of {WEIGHT_POLICIES}, got {weights!r}")
        unknown = set(sizes or {}) - set(NETWORKS)
        if unknown:
            raise ValueError(f"sizes for unknown networks {sorted(unknown)}; known: {sorted(NETWORKS)}")
        from mdlib.models import _resolve_dtype, model_manifest

        self.weights = weights
        self.device = resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.sizes = {k: int((sizes or {}).get(k, spec.size)) for k, spec in NETWORKS.items()}
        self.cache_dir = cache_dir
        self.progress = progress
        self.clip_name = model_manifest()["clip_eval"].get("open_clip_name", "ViT-L-14-quickgelu")
        self.sources: dict[str, str] = {}
        self.pretrained: dict[str, bool] = {}
        self.models: dict[str, torch.nn.Module] = {}
        self._extractors: dict[str, Callable[[torch.Tensor], dict[str, torch.Tensor]]] = {}
        self._cache: dict[str, dict[str, np.ndarray]] = {}

    # ------------------------------------------------------------------------------------------ loading
    def load(self, key: str) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
        """Build network ``key`` (with the weight policy) and return its feature extractor."""
        if key in self._extractors:
            return self._extractors[key]
        if key not in NETWORKS:
            raise KeyError(f"unknown evaluation network {key!r}; known: {sorted(NETWORKS)}")
        state, source = None, ""
        if self.weights != "random":
            download = self.weights == "pretrained"
            try:
                if key == "clip":
                    state = _clip_weights(download, self.cache_dir)
                    source = f"pretrained: OpenAI {self.clip_name} ({state})"
                else:
                    state = _load_state_dict(key, download, self.progress)
                    source = f"pretrained: {weights_url(key)}"
            except (FileNotFoundError, WeightsNotFoundError):  # no local file: "auto" draws random weights
                if download:
                    raise
                state = None
        offset = list(NETWORKS).index(key)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 101 + offset)
            if key == "clip" and state is not None:
                import open_clip

                model = open_clip.create_model(self.clip_name, pretrained=str(state)).visual
            else:
                model = _architecture(key, self.clip_name)
                if state is not None:
                    missing, unexpected = model.load_state_dict(state, strict=key != "swav")
                    if key == "swav" and (unexpected or set(missing) - {"fc.weight", "fc.bias"}):
                        raise RuntimeError(f"the SwAV checkpoint does not fit ResNet-50: missing {missing}, "
                                           f"unexpected {unexpected}")
        if state is None:
            where = "the Hugging Face cache" if key == "clip" else str(cached_weights_file(key))
            source = f"RANDOM weights (seed {self.seed}; no pretrained file in {where})"
        model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.sources[key] = source
        self.pretrained[key] = state is not None
        self.models[key] = model
        self._extractors[key] = self._extractor(key, model)
        return self._extractors[key]

    @staticmethod
    def _extractor(key: str, model: torch.nn.Module) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
        if key == "clip":
            return lambda x: {"embedding": model(x)}
        import warnings

        from torchvision.models.feature_extraction import create_feature_extractor

        nodes = [m.node for m in FEATURE_METRICS if m.network == key]
        with warnings.catch_warnings():
            # Inception's aux head runs in train mode only; the nodes read here exist in eval mode.
            warnings.filterwarnings("ignore", message=".*eval mode are a subsequence.*")
            return create_feature_extractor(model, return_nodes=nodes)

    def release(self) -> None:
        """Free the networks (the cached features stay)."""
        self._extractors.clear()
        self.models.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ----------------------------------------------------------------------------------------- features
    def preprocess(self, key: str, images) -> torch.Tensor:
        """(n, H, W, 3) uint8 or (n, 3, H, W) float in [0, 1] -> the network's normalised input batch."""
        from mdlib.features import resize_images, to_unit_images
        from mdlib.models import normalization_stats

        x = to_unit_images(images, device=self.device).float()
        x = resize_images(x, self.sizes[key], mode="bilinear-aa").clamp(0.0, 1.0)
        mean, std = IMAGENET_STATS if NETWORKS[key].normalization == "imagenet" else \
            normalization_stats("clip")
        mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    def features(self, images, metrics: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Features of ``images`` for each metric name (default: all six), (n, d) float32 each, flattened.

        Cached by the images' content: the stimuli, evaluated against every condition, are computed once.
        """
        names = list(metrics) if metrics is not None else [m.name for m in FEATURE_METRICS]
        for name in names:
            if name not in METRICS_BY_NAME:
                raise KeyError(f"unknown feature metric {name!r}; known: {list(METRICS_BY_NAME)}")
        arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        key = _content_key(arr)
        have = self._cache.setdefault(key, {})
        todo = [k for k in NETWORKS if any(METRICS_BY_NAME[n].network == k and n not in have for n in names)]
        if todo:
            from tqdm import tqdm  # the plain bar: tqdm.auto needs ipywidgets in Jupyter

            batches = [slice(s, min(s + self.batch_size, len(arr))) for s in range(0, len(arr), self.batch_size)]
            bar = tqdm(total=len(todo) * len(batches), desc="evaluation features", unit="batch",
                       disable=not self.progress)
            for k in todo:
                bar.set_postfix_str(NETWORKS[k].title)
                extract = self.load(k)
                parts: dict[str, list[np.ndarray]] = {}
                with torch.inference_mode():
                    for b in batches:
                        out = extract(self.preprocess(k, arr[b]))
                        for node, value in out.items():
                            parts.setdefault(node, []).append(value.float().flatten(1).cpu().numpy())
                        bar.update(1)
                for m in FEATURE_METRICS:
                    if m.network == k:
                        have[m.name] = np.concatenate(parts[m.node])
            bar.close()
        return {n: have[n] for n in names}

    # ----------------------------------------------------------------------------------------- header
    def header(self, metrics: Iterable[str] | None = None) -> str:
        """Which weights the networks behind ``metrics`` carry; loud when any are random."""
        names = list(metrics) if metrics is not None else [m.name for m in FEATURE_METRICS]
        keys = [k for k in NETWORKS if any(METRICS_BY_NAME[n].network == k for n in names if n in METRICS_BY_NAME)]
        for k in keys:
            self.load(k)
        random = [NETWORKS[k].title for k in keys if not self.pretrained[k]]
        lines = []
        if random:
            lines.append(f"RANDOM-WEIGHT NETWORKS: {', '.join(random)}. Their columns measure untrained networks "
                         "(no pretrained file on this machine): compare rows of this table with each other, "
                         "never with published numbers.")
        lines += [f"{NETWORKS[k].title} ({self.sizes[k]} px): {self.sources[k]}" for k in keys]
        return "\n".join(lines)


def fetch_weights(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> dict[str, str]:
    """Download every evaluation network's published weights (needs the network; run once, at home).

    The torchvision and SwAV files go to torch hub's ``checkpoints/``; CLIP ViT-L/14 to the Hugging Face
    cache. Returns each network's weight source. Afterwards ``weights="auto"`` finds them offline.
    """
    nets = EvalNetworks(weights="pretrained", device="cpu", cache_dir=cache_dir, progress=progress)
    for key in NETWORKS:
        nets.load(key)
    return dict(nets.sources)


def _content_key(arr: np.ndarray) -> str:
    h = hashlib.sha1(np.ascontiguousarray(arr).view(np.uint8).reshape(-1).data)
    h.update(f"{arr.shape}{arr.dtype}".encode())
    return h.hexdigest()
