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

Images reach each network as an evaluation protocol prepares them (``protocol=``: ``"mdlib"``, ``"mindeye"``
or ``"braindiffuser"``; :mod:`mdlib.protocols`, docs/evaluation.md): the sizes above are MindEye's, which the
``"mdlib"`` protocol keeps; Brain-Diffuser gave every network 224 px and loaded EfficientNet-B1's
``IMAGENET1K_V1`` weights; MindEye ran CLIP in float16 on CUDA. Inputs are then normalised with ImageNet's
mean/std, CLIP's with CLIP's own.

Weights (``weights=``): ``"auto"`` (default) uses each network whose published weights are on this machine
(torch hub's ``checkpoints/`` folder, the Hugging Face cache) and *leaves out* the metrics of the others, never
downloading; ``"pretrained"`` downloads what is missing; ``"random"`` gives every network seeded random weights
(to exercise the code; every table then says so loudly: such numbers compare rows of one table, never
published ones). ``clip=`` puts another CLIP in the CLIP column, such as the mini path's trained tiny CLIP:
the table labels it. :func:`fetch_weights` (``mdlib eval-weights``) downloads every file once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mdlib import presets, protocols
from mdlib.cachekey import cache_key
from mdlib.progress import bar as progress_bar
from mdlib.device import resolve_device
from mdlib.models import WeightsNotFoundError

WEIGHT_POLICIES = ("auto", "pretrained", "random")
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
#: How to get the pretrained files (said wherever a metric is left out for want of them).
#: How a source line (:meth:`EvalNetworks.source_lines`) says a network is untrained; tables put such networks
#: first and loudly (:func:`mdlib.evaluation.header_text`), also for reports read back from disk.
RANDOM_SOURCE = "RANDOM weights"
FETCH_HINT = "get them once, online, with `mdlib eval-weights` (about 2.2 GB), as docs/fetch.md says under \"Evaluation weights\""
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


def _torchvision_weights(key: str, protocol: str | protocols.Protocol = "mdlib"):
    from torchvision import models as tvm

    effnet = tvm.EfficientNet_B1_Weights[protocols.get(protocol).effnet_weights]
    return {"alexnet": tvm.AlexNet_Weights.IMAGENET1K_V1, "inception": tvm.Inception_V3_Weights.IMAGENET1K_V1,
            "effnet": effnet}.get(key)


def weights_url(key: str, protocol: str | protocols.Protocol = "mdlib") -> str | None:
    """Where a network's published weights are downloaded from under ``protocol`` (EfficientNet-B1's differ:
    ``IMAGENET1K_V1`` for Brain-Diffuser's); None for CLIP, which comes from the Hugging Face hub."""
    if key == "swav":
        return SWAV_URL
    w = _torchvision_weights(key, protocol)
    return None if w is None else w.url


def checkpoints_dir() -> Path:
    """torch hub's download folder (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/hub/...``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_weights_file(key: str, protocol: str | protocols.Protocol = "mdlib") -> Path | None:
    """The local file of a torchvision/SwAV network's weights, where torch hub keeps downloads."""
    url = weights_url(key, protocol)
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


def _load_state_dict(key: str, download: bool, progress: bool,
                     protocol: str | protocols.Protocol = "mdlib") -> dict[str, torch.Tensor]:
    url = weights_url(key, protocol)
    assert url is not None
    target = cached_weights_file(key, protocol)
    if not download and not target.is_file():
        raise FileNotFoundError(target)
    try:
        # torchvision's own file names carry a hash prefix, checked on download; weights_only: tensors only.
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=progress,
                                                   check_hash=key != "swav", weights_only=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a hash mismatch a RuntimeError
        raise RuntimeError(
            f"could not load the {NETWORKS[key].title} weights from {url} ({type(err).__name__}: {err}).\n"
            f"Run `mdlib eval-weights` on a connected machine (or download the file into {target}), or evaluate "
            f"with weights='auto' (this network's metrics left out) or 'random' (flagged in every table).") from None
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
    """The evaluation networks under one protocol, loaded on first use, with their features cached per image set.

    Args:
        weights: ``"auto"`` (default: pretrained where the file is on this machine; the other networks'
            metrics are left out, never downloading), ``"pretrained"`` (download what is missing; fail if that
            is impossible) or ``"random"`` (seeded random weights everywhere). See the module docstring.
        protocol: how images reach the networks (:data:`mdlib.protocols.PROTOCOLS`; docs/evaluation.md): the
            resize chain and input size per network, EfficientNet-B1's weights and CLIP's precision.
        clip: a :class:`mdlib.models.ClipVision` for the CLIP column instead of OpenAI's ViT-L/14 (the mini
            path's trained tiny CLIP): its image embedding, at its own input size and normalisation, whatever
            ``weights`` says; every header and table labels it.
        device, dtype: where the networks run (None: CUDA when available; float32).
        seed: random weights are drawn from ``seed`` (plus a fixed offset per network): reproducible.
        batch_size: images per forward pass.
        cache_dir: the Hugging Face cache for CLIP's weights (default: the library's).
        progress: tqdm bars while extracting features.

    >>> nets = EvalNetworks(protocol="mindeye")                                 # doctest: +SKIP
    >>> nets.usable()               # the metrics whose networks have weights here
    >>> feats = nets.features(stimuli, nets.usable())  # {"AlexNet(2)": (n, 43200), ..., "SwAV": (n, 2048)}
    """

    def __init__(self, weights: str = "auto", protocol: str = "mdlib", clip=None,
                 device: str | torch.device | None = None, dtype: torch.dtype | str | None = None, seed: int = 0,
                 batch_size: int = 16, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> None:
        if weights not in WEIGHT_POLICIES:
            raise ValueError(f"weights must be one of {WEIGHT_POLICIES}, got {weights!r}")
        from mdlib.models import _resolve_dtype, model_manifest

        self.weights = weights
        self.protocol = protocols.get(protocol)
        self.clip = clip
        self.device = resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        #: Input size per network key (px): the protocol's, the substitute CLIP's own.
        self.sizes = dict(self.protocol.network_sizes)
        if clip is not None:
            self.sizes["clip"] = int(clip.input_size)
        self.cache_dir = cache_dir
        self.progress = progress
        self.clip_name = model_manifest()["clip_eval"].get("open_clip_name", "ViT-L-14-quickgelu")
        self.sources: dict[str, str] = {}
        self.pretrained: dict[str, bool] = {}
        self.models: dict[str, torch.nn.Module] = {}
        self._extractors: dict[str, Callable[[torch.Tensor], dict[str, torch.Tensor]]] = {}
        self._cache: dict[str, dict[str, np.ndarray]] = {}
        self._available: dict[str, bool] = {}

    @classmethod
    def for_preset(cls, preset: str, **kwargs) -> EvalNetworks:
        """The evaluation networks a preset's lessons use (:attr:`mdlib.presets.Preset.eval_clip`): on the mini
        path the trained tiny CLIP takes the CLIP column, since no ViT-L/14 weights can be had there (its numbers
        are labelled); on the real path, OpenAI's ViT-L/14. ``kwargs`` go to the constructor (``device``,
        ``protocol``, ...)."""
        source = presets.get(preset).eval_clip
        if source is not None and kwargs.get("clip") is None:
            from mdlib import models

            device = resolve_device(kwargs.get("device"))
            kwargs["clip"] = models.load_clip_vision(source, device=device, dtype=kwargs.get("dtype"))
        return cls(**kwargs)

    # ------------------------------------------------------------------------------------- availability
    def available(self, key: str) -> bool:
        """Whether network ``key`` can run: always under ``"random"`` and ``"pretrained"`` (which downloads) and
        for a substitute CLIP; under ``"auto"`` when its published weights are on this machine."""
        if key not in NETWORKS:
            raise KeyError(f"unknown evaluation network {key!r}; known: {sorted(NETWORKS)}")
        if self.weights != "auto" or (key == "clip" and self.clip is not None):
            return True
        if key not in self._available:
            if key == "clip":
                try:
                    _clip_weights(False, self.cache_dir)
                    self._available[key] = True
                except (FileNotFoundError, WeightsNotFoundError):
                    self._available[key] = False
            else:
                self._available[key] = cached_weights_file(key, self.protocol).is_file()
        return self._available[key]

    def usable(self, metrics: Iterable[str] | None = None) -> list[str]:
        """The feature metrics among ``metrics`` (default: all six) whose networks can run here."""
        names = _check_metrics(metrics)
        return [n for n in names if self.available(METRICS_BY_NAME[n].network)]

    def left_out(self, metrics: Iterable[str] | None = None) -> list[str]:
        """The feature metrics among ``metrics`` (default: all six) that ``"auto"`` leaves out for want of weights."""
        usable = set(self.usable(metrics))
        return [n for n in _check_metrics(metrics) if n not in usable]

    # ------------------------------------------------------------------------------------------ loading
    def load(self, key: str) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
        """Build network ``key`` (with the weight policy) and return its feature extractor."""
        if key in self._extractors:
            return self._extractors[key]
        if not self.available(key):
            where = "the Hugging Face cache" if key == "clip" else str(cached_weights_file(key, self.protocol))
            raise WeightsNotFoundError(
                f"no pretrained {NETWORKS[key].title} weights in {where}, and weights='auto' never downloads nor "
                f"draws random weights: {FETCH_HINT}; or leave its metrics out (EvalNetworks.usable()).")
        if key == "clip" and self.clip is not None:
            model = self.clip.visual
            dtype = self.clip.dtype
            self.sources[key] = (f"{self.clip.source or 'a CLIP model'!r}, {self.clip.embed_dim}-d embedding, in place "
                                 "of ViT-L/14.")
            self.pretrained[key] = True
        else:
            model, dtype = self._build(key)
        model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.models[key] = model
        self._extractors[key] = self._extractor(key, model)
        return self._extractors[key]

    def _build(self, key: str) -> tuple[torch.nn.Module, torch.dtype]:
        state, source = None, ""
        if self.weights != "random":
            download = self.weights == "pretrained"
            if key == "clip":
                state = _clip_weights(download, self.cache_dir)
                source = f"pretrained: OpenAI {self.clip_name} ({state})"
            else:
                state = _load_state_dict(key, download, self.progress, self.protocol)
                source = f"pretrained: {weights_url(key, self.protocol)}"
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
            source = f"{RANDOM_SOURCE} (seed {self.seed}; weights='random')"
        self.sources[key] = source
        self.pretrained[key] = state is not None
        dtype = self.protocol.clip_dtype(self.device, self.dtype) if key == "clip" else self.dtype
        return model, dtype

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
        """(n, H, W, 3) uint8 or (n, 3, H, W) float in [0, 1] -> the network's normalised input batch: resized as
        the protocol resizes (:func:`mdlib.protocols.network_inputs`), normalised, in the network's dtype."""
        from mdlib.models import normalization_stats

        x = protocols.network_inputs(images, self.protocol, key, size=self.sizes[key]).to(self.device)
        if key == "clip" and self.clip is not None:
            mean, std = self.clip.mean, self.clip.std
        elif NETWORKS[key].normalization == "imagenet":
            mean, std = IMAGENET_STATS
        else:
            mean, std = normalization_stats("clip")
        mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
        model = self.models.get(key)
        dtype = next(model.parameters()).dtype if model is not None else self.dtype
        return ((x - mean) / std).to(dtype)

    def features(self, images, metrics: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Features of ``images`` for each metric name (default: all six), (n, d) float32 each, flattened.

        Cached by the images' content: the stimuli, evaluated against every condition and every subject, are
        computed once. A metric whose network has no weights here (``"auto"``) raises: ask :meth:`usable` first.
        """
        names = _check_metrics(metrics)
        arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        key = cache_key(arr, n=None)   # in memory only: the stimuli are computed once per EvalNetworks
        have = self._cache.setdefault(key, {})
        todo = [k for k in NETWORKS if any(METRICS_BY_NAME[n].network == k and n not in have for n in names)]
        if todo:
            batches = [slice(s, min(s + self.batch_size, len(arr))) for s in range(0, len(arr), self.batch_size)]
            bar = progress_bar(total=len(todo) * len(batches), desc="evaluation features", unit="batch",
                               progress=self.progress)
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
    def source_lines(self, metrics: Iterable[str] | None = None) -> dict[str, str]:
        """Per network behind the usable ``metrics``: ``"<title> (<size> px[, dtype]): <weight source>"``."""
        keys = [k for k in NETWORKS if any(METRICS_BY_NAME[n].network == k for n in self.usable(metrics))]
        lines = {}
        for k in keys:
            self.load(k)
            title = self._clip_tag() if k == "clip" and self.clip is not None else NETWORKS[k].title
            dtype = next(self.models[k].parameters()).dtype
            extra = f", {str(dtype).removeprefix('torch.')}" if dtype != torch.float32 else ""
            lines[k] = f"{title} ({self.sizes[k]} px{extra}): {self.sources[k]}"
        return lines

    def _clip_tag(self) -> str:
        return "tiny CLIP" if "tiny" in str(self.clip.source) else "substitute CLIP"

    def labels(self) -> dict[str, str]:
        """Column labels that differ from the metric names: the substitute CLIP's columns say whose they are."""
        if self.clip is None:
            return {}
        tag = self._clip_tag()
        return {"CLIP": f"CLIP ({tag})", "CLIP-cos": f"CLIP-cos ({tag})"}

    def header(self, metrics: Iterable[str] | None = None) -> str:
        """The protocol, the metrics left out, and which weights the networks behind ``metrics`` carry; loud when
        any are random (the same text as :func:`mdlib.evaluation.table` puts on a table)."""
        from mdlib.evaluation import header_text

        return header_text(self.protocol.name, self.source_lines(metrics), self.left_out(metrics), self.labels())


def _check_metrics(metrics: Iterable[str] | None) -> list[str]:
    names = list(metrics) if metrics is not None else [m.name for m in FEATURE_METRICS]
    for name in names:
        if name not in METRICS_BY_NAME:
            raise KeyError(f"unknown feature metric {name!r}; known: {list(METRICS_BY_NAME)}")
    return names


def fetch_weights(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> dict[str, str]:
    """Download every evaluation network's published weights, for every protocol (needs the network; run once,
    at home; ``mdlib eval-weights``).

    The torchvision and SwAV files go to torch hub's ``checkpoints/`` (EfficientNet-B1's twice: ``IMAGENET1K_V2``
    for the "mdlib" and "mindeye" protocols, ``IMAGENET1K_V1`` for "braindiffuser"); CLIP ViT-L/14 to the
    Hugging Face cache. Returns each file's weight source, keyed ``network`` (``effnet@IMAGENET1K_V1`` for the
    second EfficientNet). Afterwards ``weights="auto"`` finds them offline.
    """
    sources: dict[str, str] = {}
    for proto in ("mdlib", "braindiffuser"):
        nets = EvalNetworks(weights="pretrained", protocol=proto, device="cpu", cache_dir=cache_dir,
                            progress=progress)
        keys = NETWORKS if proto == "mdlib" else ["effnet"]
        for key in keys:
            nets.load(key)
            name = key if proto == "mdlib" else f"effnet@{nets.protocol.effnet_weights}"
            sources[name] = nets.sources[key]
    return sources
