"""Pipeline parameters: `params.yaml`, validated once, before any work starts.

Every tunable lives in `params.yaml`, grouped by stage. Unknown keys, wrong types and out-of-range values stop
the run with a message naming the key (e.g. ``embed.epochs: Input should be greater than or equal to 1``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ParamsError(ValueError):
    """Raised when params.yaml or a ``--set`` override is invalid; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseParams(_Section):
    seed: int = Field(0, ge=0, description="Seed for every random choice (synthesis, training, clustering).")
    threads: int = Field(0, ge=0, description="torch threads; 0 = all cores.")


class VersionParams(_Section):
    remote: str | None = Field(None, description="DVC remote URL; default: <workspace>/dvc-remote (a local dir).")
    push: bool = True
    retries: int = Field(3, ge=0, le=10, description="Retries of the remote's reachability check before any work.")
    backoff: float = Field(1.0, ge=0.0, le=60.0, description="Seconds before the first retry, doubling after each.")
    timeout: float = Field(10.0, gt=0.0, le=600.0, description="Seconds one reachability check may take.")
    push_timeout: float = Field(
        3600.0, gt=0.0, description="Seconds one `dvc push` may take before it is stopped and the run fails."
    )


class ValidateParams(_Section):
    suite: str = Field("image_quality", description="Name of the GX suite file in tasks/suites/ (without .json).")
    max_fail_share: float = Field(0.2, ge=0.0, le=1.0, description="Stop the run if more images than this fail.")
    max_pixels: int = Field(50_000_000, ge=1, description="Images declaring more pixels are refused (bombs).")
    min_side: int = Field(16, ge=1)
    max_side: int = Field(20_000, ge=1)
    max_aspect: float = Field(10.0, ge=1.0, description="Longest side / shortest side.")
    min_contrast: float = Field(2.0, ge=0.0, description="Minimum grey-level std (0-255 scale): below = blank.")
    min_sharpness: float = Field(
        2.0,
        ge=0.0,
        description="Minimum variance of the Laplacian of the grey image (reduced to 128 px when larger, never "
        "enlarged): below = blurred.",
    )
    formats: list[str] = Field(default_factory=lambda: ["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP", "PPM"])
    near_duplicate_similarity: float = Field(
        0.99,
        gt=0.0,
        le=1.0,
        description="Near duplicates: an image whose 32 px thumbnail correlates at least this much with an earlier "
        "image's (among those with a close perceptual hash) is quarantined; 1.0 = only identical thumbnails.",
    )
    batch_size: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _sides(self) -> ValidateParams:
        if self.min_side > self.max_side:
            raise ValueError("min_side must not exceed max_side")
        return self


class StandardizeParams(_Section):
    size: int = Field(64, ge=8, le=1024, description="Output side in pixels (square).")
    lighting: Literal["none", "percentile", "equalize"] = Field(
        "percentile", description="Per-image lighting normalisation."
    )
    percentiles: tuple[float, float] = (1.0, 99.0)

    @model_validator(mode="after")
    def _pct(self) -> StandardizeParams:
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError("percentiles must satisfy 0 <= low < high <= 100")
        return self


EmbedMethod = Literal["simclr", "cnn", "pretrained", "raw", "hog", "lbp", "stats", "morph", "crop", "combo"]


class EmbedParams(_Section):
    method: EmbedMethod = Field(
        "combo", description="What makes the vectors (tasks/embedding.py); combo = weighted blocks (embed.blocks)."
    )
    blocks: dict[str, float] = Field(
        default_factory=lambda: {"morph": 1.0, "stats": 0.5, "lbp": 0.5, "simclr": 0.5},
        description="combo: block → weight (its length in each vector; its share of squared distances goes with "
        "weight²); blocks are any other method.",
    )

    @field_validator("blocks")
    @classmethod
    def _known_blocks(cls, blocks: dict[str, float]) -> dict[str, float]:
        """A misspelt block fails at load, naming the choices, not after the stages before embed have run."""
        known = [m for m in get_args(EmbedMethod) if m != "combo"]
        unknown = sorted(set(blocks) - set(known))
        if unknown:
            raise ValueError(f"unknown block(s) {unknown}; blocks are {known}")
        negative = sorted(k for k, w in blocks.items() if w < 0)
        if negative:
            raise ValueError(f"negative weight for {negative}; 0 switches a block off")
        return blocks

    backbone: str = Field("small", description="small (a CNN for grey patches) or a torchvision classifier name.")
    weights: str | None = Field(
        None, description="null = random init; imagenet = $TORCH_HOME/hub/checkpoints; or a local .pth file."
    )
    input_size: int = Field(
        32, ge=0, description="Side the backbone sees (standardised images are resized); 0 = as standardised."
    )
    dim: int = Field(128, ge=2, description="Projection-head output dimension.")
    epochs: int = Field(10, ge=0, description="Self-supervised epochs (0 = use the backbone as it is).")
    batch_size: int = Field(256, ge=4)
    lr: float = Field(2e-3, gt=0.0)
    temperature: float = Field(0.2, gt=0.0)
    max_train_images: int = Field(4000, ge=1, description="Subsample for training when there are more images.")
    pca_dims: int = Field(64, ge=1, description="raw: PCA dimensions of the pixels.")


class ClusterParams(_Section):
    method: Literal["kmeans", "scan", "hdbscan", "agglomerative"] = Field(
        "scan", description="kmeans | scan (neighbour-consistency head) | hdbscan (density) | agglomerative (Ward)."
    )
    k: int = Field(
        8, ge=0, description="Clusters; more than the defect types = over-clustering; 0 = chosen by silhouette."
    )
    k_min: int = Field(2, ge=2, description="Smallest k tried when k = 0.")
    k_max: int = Field(15, ge=2, description="Largest k tried when k = 0.")
    n_init: int = Field(10, ge=1)
    center: bool = Field(True, description="Subtract the mean vector before the cosine geometry.")
    neighbours: int = Field(10, ge=1, description="scan: nearest neighbours pushed into the same cluster.")
    heads: int = Field(8, ge=1, description="scan: heads trained from different starts; the lowest loss is kept.")
    epochs: int = Field(60, ge=1, description="scan: passes over the data.")
    lr: float = Field(1e-2, gt=0.0, description="scan: Adam learning rate.")
    hidden: int = Field(0, ge=0, description="scan: hidden units of the head; 0 = a linear head.")
    entropy_weight: float | list[float] = Field(
        [2.0, 0.5],
        description="scan: weight of the term that keeps every cluster in use (not a size prior); a list trains "
        "one candidate per weight (a low weight lets rare types keep small clusters).",
    )
    init: list[Literal["kmeans", "spectral"]] = Field(
        ["kmeans", "spectral"],
        min_length=1,
        description="scan: partitions the heads start from (kmeans; spectral = the nearest-neighbour graph); one "
        "candidate per init and entropy weight, the one with the highest graph modularity is kept (label-free).",
    )
    consensus: int = Field(
        0,
        ge=0,
        le=16,
        description="scan: 0 = off; N >= 2 runs the candidate search N times (seeds seed..seed+N-1, one shared "
        "neighbour graph) and keeps the candidate partition that agrees best (mean ARI) with all the others; "
        "about N times the clustering time. Ignored by the other methods.",
    )
    self_label: bool = Field(False, description="scan: fine-tune on the head's own confident predictions.")
    self_label_threshold: float = Field(0.99, gt=0.0, lt=1.0)
    pca_dims: int = Field(32, ge=2, description="hdbscan/agglomerative: PCA dimensions they run on.")
    min_cluster_size: int = Field(0, ge=0, description="hdbscan: 0 = 1 % of the images (at least 5).")
    min_samples: int | None = Field(None, ge=1, description="hdbscan: density smoothing; null = min_cluster_size.")
    max_fit: int = Field(5000, ge=2, description="agglomerative: fit on at most this many images, assign the rest.")
    review_below: float = Field(
        0.15, ge=0.0, le=1.0, description="Images whose confidence is below this go to the review queue."
    )

    @model_validator(mode="after")
    def _k(self) -> ClusterParams:
        if self.k == 1:
            raise ValueError("cluster.k must be 0 (automatic) or at least 2")
        if self.k_min > self.k_max:
            raise ValueError("cluster.k_min must not exceed cluster.k_max")
        if self.consensus == 1:
            raise ValueError(
                "cluster.consensus must be 0 (off) or at least 2 (runs whose partitions vote); 1 run is no consensus"
            )
        weights = self.entropy_weight if isinstance(self.entropy_weight, list) else [self.entropy_weight]
        if not weights or any(w < 0 for w in weights):
            raise ValueError("cluster.entropy_weight must be a number >= 0 or a non-empty list of them")
        return self


class AnnotateParams(_Section):
    accept_confidence: float = Field(
        0.9, ge=0.0, le=1.0, description="Propagated labels below this calibrated confidence need review."
    )
    neighbours: int = Field(10, ge=1, description="k of the nearest-neighbour graph that seed labels spread on.")
    calibration_folds: int = Field(5, ge=2, description="Cross-validation folds over the seeds for calibration.")
    metric_weight: float = Field(
        1.0,
        ge=0.0,
        description="Weight of the block learned from the seeds (LDA) in the space labels spread in; 0 = the "
        "label-free embedding only (tasks/annotation.py seed_space).",
    )
    space_rule: Literal["blend", "better", "margin"] = Field(
        "blend",
        description="How the embedding and the seed-metric space are used (tasks/annotation.py choose_space): "
        "blend = spread on both graphs, class scores averaged; better = the seed metric alone when its held-out "
        "seed accuracy is higher; margin = the seed metric unless the embedding is better by more than one "
        "standard error (bench/RESULTS.md).",
    )
    probe_weight: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Weight of a logistic-regression probe fitted on the seeds, mixed with the propagated class "
        "shares (tasks/annotation.py mix_probe); 0 = label spreading alone. 0.5 adopted by a rule written before "
        "measuring (bench/RESULTS.md, bench/results/simulate-probe-trials.json).",
    )


class LocalizeParams(_Section):
    """Template-based defect localisation (``tasks/localize.py``), used by ``autolabel run --templates``.

    Lengths are in pixels of the inspected image; grey levels are on the normalised 0-1 scale (after each image's
    percentile stretch), so the same values work for binarised scans and grey IC-package images alike. The
    defaults are the best recipe of ``bench/localize.py`` on DeepPCB (see bench/RESULTS.md).
    """

    rule: Literal["same-name", "suffix", "single"] = Field(
        "same-name",
        description="Pairing of images with templates: same-name = TEMPLATES/<relative path> (parallel trees); "
        "suffix = <stem><test_suffix>.<ext> with <stem><template_suffix>.<ext> in the same folder; single = one "
        "golden image (TEMPLATES is a file).",
    )
    unpaired: Literal["passthrough", "skip"] = Field(
        "passthrough",
        description="Images without a usable template: labelled whole (passthrough) or only listed in "
        "unlocalized.csv (skip). Listed either way.",
    )
    registration: Literal["search", "phase", "none"] = Field(
        "search",
        description="How to align test to template: exhaustive integer search minimising the mean absolute "
        "difference (robust, O(shifts)), phase correlation (fast for large shifts), or none.",
    )
    max_shift: int = Field(8, ge=0, le=256, description="Largest registration shift searched/accepted, pixels.")
    affine: bool = Field(
        True,
        description="Refine the global shift to an affine warp (slight scale/rotation/skew between test and template).",
    )
    affine_sigma: float = Field(
        1.5, gt=0.0, le=10.0, description="Gaussian blur (px, at each pyramid level) widening the affine fit's reach."
    )
    affine_iterations: int = Field(20, ge=1, le=200, description="Gauss-Newton iterations per pyramid level.")
    local_tile: int = Field(
        64, ge=8, le=4096, description="Block side (px) for the local shift refinement after global alignment."
    )
    local_reach: int = Field(
        2, ge=0, le=16, description="Extra shift (px) each block may take after global alignment; 0 = none."
    )
    percentiles: tuple[float, float] = Field(
        (1.0, 99.0), description="Lighting normalisation: each image's low/high percentiles are mapped to 0 and 1."
    )
    tolerance_radius: int = Field(
        1,
        ge=0,
        le=10,
        description="A test pixel only differs if it lies outside the template's min-max range within this radius "
        "(absorbs residual misalignment and edge ringing).",
    )
    threshold: float = Field(0.35, gt=0.0, le=1.0, description="Normalised difference above which a pixel differs.")
    morph_radius: int = Field(
        1, ge=0, le=10, description="Opening radius removing specks thinner than 2*r+1 px from the difference mask."
    )
    min_area: int = Field(6, ge=1, description="Smallest differing region (pixels, after morphology) kept.")
    merge_distance: int = Field(
        6, ge=0, description="Regions closer than this (pixels) are one defect (a broken track shows as two blobs)."
    )
    min_side: int = Field(64, ge=1, description="Smallest crop side, pixels.")
    margin: int = Field(16, ge=0, description="Crop side = max(min_side, longest box side + margin).")
    max_crops: int = Field(50, ge=1, description="At most this many crops per image, strongest difference first.")
    test_suffix: str = Field("_test", description="`suffix` pairing: stem suffix of inspected images.")
    template_suffix: str = Field("_temp", description="`suffix` pairing: stem suffix of templates.")

    @model_validator(mode="after")
    def _check(self) -> LocalizeParams:
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError("percentiles must satisfy 0 <= low < high <= 100")
        if self.test_suffix == self.template_suffix:
            raise ValueError("test_suffix and template_suffix must differ")
        return self


class PublishParams(_Section):
    montage_size: int = Field(36, ge=1, description="Images per cluster montage (closest to the centre first).")
    map_method: Literal["tsne", "pca"] = Field("tsne", description="2-D embedding map in the report.")
    map_points: int = Field(2000, ge=10, description="Images drawn on the map (a seeded sample).")


class TrackParams(_Section):
    experiment: str = "aoi-autolabel"
    model_prefix: str = Field("aoi-autolabel", description="Registered models: <prefix>-embedder, -clusterer.")
    retries: int = Field(
        3, ge=0, le=10, description="Retries of a tracking-server request (health check and MLflow's own requests)."
    )
    backoff: float = Field(1.0, ge=0.0, le=60.0, description="Seconds before the first retry, doubling after each.")
    timeout: float = Field(10.0, gt=0.0, le=600.0, description="Seconds one request to the tracking server may take.")


class GateParams(_Section):
    """Champion/challenger: when a retrain's models replace ``@champion`` (both scored on the same new data)."""

    metric: Literal["auto", "acc", "nmi", "ari", "macro_recall", "silhouette"] = Field(
        "auto", description="Score compared; auto = nmi with ground-truth labels, else silhouette (internal)."
    )
    tolerance: float = Field(
        0.0, ge=0.0, le=1.0, description="Promote when challenger >= champion - tolerance on the metric."
    )


class RefreshParams(_Section):
    """New batches assigned with the champion models; drift above these limits triggers a retrain."""

    far_quantile: float = Field(
        0.99, gt=0.5, lt=1.0, description="An image is 'far' when its distance exceeds this training quantile."
    )
    max_far_share: float = Field(0.2, gt=0.0, le=1.0, description="Drift when more new images than this are far.")
    max_psi: float = Field(
        0.25, gt=0.0, description="Drift when the cluster-share population stability index exceeds this."
    )
    max_mean_shift: float = Field(
        1.0, gt=0.0, description="Drift when the mean embedding moves more than this many training std (RMS)."
    )
    retrain_on_drift: bool = Field(True, description="Run the retrain flow on all workspace data when drift is seen.")


class RunnerParams(_Section):
    """Prefect task runner of the parallel stages (quality stats, embedding inference)."""

    kind: Literal["local", "dask"] = Field("local", description="local = threads in this process; dask = Dask.")
    address: str | None = Field(None, description="Dask scheduler address; none = a LocalCluster per run.")
    n_workers: int = Field(2, ge=1, description="LocalCluster workers (one thread each).")
    chunk: int = Field(512, ge=1, description="Images per parallel task.")


class Params(_Section):
    base: BaseParams = BaseParams()
    localize: LocalizeParams = LocalizeParams()
    version: VersionParams = VersionParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    standardize: StandardizeParams = StandardizeParams()
    embed: EmbedParams = EmbedParams()
    cluster: ClusterParams = ClusterParams()
    annotate: AnnotateParams = AnnotateParams()
    publish: PublishParams = PublishParams()
    track: TrackParams = TrackParams()
    gate: GateParams = GateParams()
    refresh: RefreshParams = RefreshParams()
    runner: RunnerParams = RunnerParams()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def validate(self) -> ValidateParams:  # type: ignore[override]
        """The `validate` section (stored as ``validate_`` to avoid pydantic's reserved name)."""
        return self.validate_

    def as_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict with the same keys as params.yaml, credentials in URLs masked (``***``).

        This is what gets recorded (MLflow params, manifests, the workspace's params.yaml) and hashed: a password
        in ``version.remote`` is never written, and changing it does not change a label set's id. Code that needs
        the real value reads the attribute (``params.version.remote``).
        """
        from tasks.secrets import redact_obj

        return redact_obj(self.model_dump(mode="json", by_alias=True))

    def digest(self) -> str:
        """sha256 of the canonical JSON of the resolved params (the `params_hash` in lineage)."""
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]).replace("validate_", "validate")
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ParamsError(f"--set {item!r}: expected key=value, e.g. embed.epochs=5")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ParamsError(f"--set {item!r}: key must be <section>.<name>, e.g. cluster.k=12")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ParamsError(f"--set {item!r}: value is not valid YAML ({exc})") from exc
    return path, value


def load_params(path: Path | None = None, overrides: list[str] | None = None) -> Params:
    """Read params.yaml (defaults when ``path`` is None), apply ``section.key=value`` overrides, validate.

    Raises:
        ParamsError: naming the file and every offending key.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        if not Path(path).is_file():
            raise ParamsError(f"params file not found: {path}")
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ParamsError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ParamsError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    for item in overrides or []:
        (section, name), value = _parse_override(item)
        current = data.setdefault(section, {})
        if not isinstance(current, dict):
            raise ParamsError(f"--set {item!r}: {section} is not a section")
        current[name] = value
        source = f"{source} + --set"
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(_format_error(exc, source)) from None


def write_params(params: Params, path: Path) -> None:
    """Write resolved params as YAML (what `dvc repro` in the workspace reads)."""
    path.write_text(yaml.safe_dump(params.as_dict(), sort_keys=False))
