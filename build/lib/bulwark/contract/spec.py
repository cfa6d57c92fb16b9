"""The job spec: one pydantic model shared by the CLI, the runner and the service.

It imports without torch. A recipe is a composition of orthogonal parts (docs/spec.md, `recipe`):
adversary x loss x regularizers x weight perturbation x labels, under a threat model and a
schedule. A named preset (``"recipe": "fgsm-elle"``) fills in the papers' per-epsilon
defaults; every field the user gives overrides the preset's value (see
``bulwark.contract.presets``).

Unknown fields and out-of-range values are rejected with the field path and allowed range.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bulwark.contract.presets import ELLE_A, apply_preset
from bulwark.contract.units import parse_epsilon

SPEC_VERSION = 1
MAX_CLASSES = 1000  # of any dataset: a synthetic one, an upload's labels (0 .. 999), a model's


class _Strict(BaseModel):
    # NaN and ±Infinity are never a valid setting (and a JSON body cannot even echo them)
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------------- dataset
DatasetName = Literal[
    "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "digits", "synthetic", "npz"
]


class SyntheticSpec(_Strict):
    """Seeded synthetic images for tests: class-dependent blobs, learnable but not trivial."""

    num_classes: int = Field(10, ge=2, le=MAX_CLASSES)
    image_size: int = Field(28, ge=4, le=256)
    channels: Literal[1, 3] = 1
    n_train: int = Field(2048, ge=16, le=1_000_000)
    n_test: int = Field(512, ge=16, le=1_000_000)
    seed: int = Field(0, ge=0)


SMALL_VAL_SIZES = {"digits": 256}  # datasets too small for the 1 024-image validation slice


class DatasetSpec(_Strict):
    name: DatasetName = "mnist"
    root: str | None = Field(
        None,
        description="data root; default: $BULWARK_DATA_ROOT, ./data, then the data Bulwark ships"
    )
    path: str | None = Field(None, description="the .npz file (name = 'npz' only)")
    val_size: int | None = Field(
        None, ge=0, le=100_000,
        description="held-out training images; default 1024, and 256 for digits (1 797 images "
                    "in all: 1 024 held out would leave 413 to train on)")
    train_limit: int | None = Field(None, ge=1, le=100_000_000,
                                    description="use only this many train images")
    test_limit: int | None = Field(None, ge=1, le=100_000_000,
                                   description="use only this many test images")
    crop_padding: int | None = Field(
        None, ge=0, le=16, description="random-crop padding; None = dataset default"
    )
    flip: bool | None = Field(None, description="random horizontal flip; None = dataset default")
    download: bool = Field(False, description="opt in to downloading the standard files")
    synthetic: SyntheticSpec = Field(default_factory=SyntheticSpec)

    @model_validator(mode="after")
    def _npz_needs_path(self) -> DatasetSpec:
        if self.val_size is None:
            self.val_size = SMALL_VAL_SIZES.get(self.name, 1024)
        if self.name == "npz" and not self.path:
            raise ValueError("dataset.path is required when dataset.name is 'npz'")
        if self.name != "npz" and self.path:
            raise ValueError("dataset.path is only used with dataset.name 'npz'")
        return self


# ---------------------------------------------------------------------------------- model
# The architectures (workers/engine/models.py builds them; uploads name one of them).
ARCHS = ("small_cnn", "mnist_net", "preact_resnet18", "wide_resnet")


class ModelSpec(_Strict):
    arch: Literal["small_cnn", "mnist_net", "preact_resnet18", "wide_resnet"] = Field(
        "small_cnn", description="small_cnn: TRADES' 4-conv 3-fc net; mnist_net: Wong et al. "
        "2020's MNIST net (2 strided convs, 2 fc; ~16x fewer FLOPs); preact_resnet18; "
        "wide_resnet")
    weights: str | None = Field(
        None, max_length=500,
        description="initial weights: a .safetensors file (bulwark run) or an uploaded model "
                    "'models/<id>' (the API); required when mode is 'evaluate'")
    normalization: Literal["dataset", "none"] = Field(
        "dataset", description="dataset: (x - mean) / std with the dataset's statistics as the "
        "network's first layer; none: the network sees [0, 1] pixels, as the published MNIST "
        "recipes and checkpoints do (every preset sets none on MNIST / Fashion-MNIST unless "
        "the spec says otherwise)")
    depth: int = Field(28, ge=10, le=70, description="WideResNet depth (6n+4)")
    widen_factor: int = Field(10, ge=1, le=20, description="WideResNet widen factor")

    @model_validator(mode="after")
    def _wrn_depth(self) -> ModelSpec:
        if self.arch == "wide_resnet" and (self.depth - 4) % 6 != 0:
            raise ValueError("model.depth must be 6n+4 for wide_resnet (e.g. 28, 34), "
                             f"got {self.depth}")
        return self


# ---------------------------------------------------------------------------------- threat
class ThreatSpec(_Strict):
    """Perturbation set: the ε-ball of the norm, intersected with the image box [0, 1]."""

    norm: Literal["linf", "l2"] = "linf"
    epsilon: float = Field(8 / 255, description="radius in [0,1] pixel units; '8/255' accepted")
    epsilon_warmup: float = Field(
        0.0, ge=0, le=1000,
        description="training ε ramps linearly from 0 to ε over this many epochs (per "
                    "iteration); monitor and final evaluation always use the full ε")
    train_epsilon: float | None = Field(
        None, description="the training adversary's radius when it is not ε (a larger one "
                          "trains a margin, as MNIST certified-training recipes do: 0.4 for "
                          "0.3); the ramp leads to it; monitor, watchdog, final evaluation and "
                          "the presets' per-ε values keep ε. Default: ε")

    @field_validator("epsilon", "train_epsilon", mode="before")
    @classmethod
    def _parse_eps(cls, v: Any) -> float | None:
        return None if v is None else parse_epsilon(v)

    @property
    def training_epsilon(self) -> float:
        """The radius the training adversary works at once the warm-up is over."""
        return self.epsilon if self.train_epsilon is None else self.train_epsilon

    @field_validator("norm", mode="before")
    @classmethod
    def _norm_any_case(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v  # "Linf", "L2" as papers write

    @model_validator(mode="after")
    def _range(self) -> ThreatSpec:
        hi = 1.0 if self.norm == "linf" else 64.0
        for name in ("epsilon", "train_epsilon"):
            v = getattr(self, name)
            if v is not None and not (0.0 < v <= hi):
                raise ValueError(f"threat.{name} must be in (0, {hi:g}] for norm {self.norm}, "
                                 f"got {v}")
        return self


# ---------------------------------------------------------------------------------- recipe
class NoAdversary(_Strict):
    kind: Literal["none"] = "none"


CLIP_ADV = ("clip the adversarial input x'' to [0, 1] (every reference code but ELLE's); false: "
            "train on x'' as the step leaves it, up to ε outside the image box (ELLE's official "
            "Trainer)")


class FGSMAdversary(_Strict):
    """FGSM (Goodfellow'15): zero init, one signed step of α = ε."""

    kind: Literal["fgsm"] = "fgsm"
    alpha: float = Field(1.0, gt=0, le=4, description="step size as a multiple of ε")
    clip_adv: bool = Field(True, description=CLIP_ADV)


CLIP_START = ("clip the random start x + η to [0, 1] before its gradient (Wong et al.'s "
              "CIFAR-10 code, N-FGSM's code); false: the gradient is taken at the unclipped "
              "x + η and only the final point is clipped (Wong et al.'s MNIST code: on images "
              "whose pixels sit at 0 or 1, clipping removes half the noise)")


class FGSMRSAdversary(_Strict):
    """RS-FGSM (Wong'20): η ~ U[-ε, ε], step α = 1.25ε, projected back onto the ε-ball."""

    kind: Literal["fgsm_rs"] = "fgsm_rs"
    alpha: float = Field(1.25, gt=0, le=4, description="step size as a multiple of ε")
    clip_start: bool = Field(True, description=CLIP_START)
    clip_adv: bool = Field(True, description=CLIP_ADV)


class NFGSMAdversary(_Strict):
    """N-FGSM (de Jorge'22): η ~ U[-kε, kε], step α = ε, no projection (clip to [0,1] only)."""

    kind: Literal["n_fgsm"] = "n_fgsm"
    k: float = Field(2.0, ge=0, le=8, description="noise magnitude as a multiple of ε")
    alpha: float = Field(1.0, gt=0, le=4, description="step size as a multiple of ε")
    clip_start: bool = Field(True, description=CLIP_START)
    clip_adv: bool = Field(True, description=CLIP_ADV)


class PGDAdversary(_Strict):
    """PGD (Madry'18): `steps` projected steps of α from a random start in the ε-ball."""

    kind: Literal["pgd"] = "pgd"
    steps: int = Field(10, ge=1, le=1000)
    alpha: float = Field(0.25, gt=0, le=4, description="step size as a multiple of ε")
    restarts: int = Field(1, ge=1, le=100)
    random_start: bool = True


class GaussianAdversary(_Strict):
    """Gaussian-noise training (Cohen et al. 2019): x + N(0, σ²I) in [0, 1] pixel space, before
    the model's normalization layer, one draw per example per step, not clipped."""

    kind: Literal["gaussian"] = "gaussian"
    sigma: float = Field(0.25, gt=0, le=4, description="σ; papers: 0.12, 0.25, 0.5, 1.0")


Adversary = Annotated[
    NoAdversary | FGSMAdversary | FGSMRSAdversary | NFGSMAdversary | PGDAdversary
    | GaussianAdversary,
    Field(discriminator="kind"),
]


class CELoss(_Strict):
    kind: Literal["ce"] = "ce"


class TradesLoss(_Strict):
    """TRADES (Zhang'19): CE(f(x), y) + β·KL(f(x_adv) ‖ f(x)); the attack maximizes the KL."""

    kind: Literal["trades"] = "trades"
    beta: float = Field(6.0, ge=0, le=100)


Loss = Annotated[CELoss | TradesLoss, Field(discriminator="kind")]


class ELLE(_Strict):
    """ELLE (Abad Rocamora'24): λ·E_lin, the local-linearity error on random triplets."""

    kind: Literal["elle"] = "elle"
    lam: float = Field(1000.0, ge=0, le=1e6, description="λ (papers: 1e3..1e4)")
    official_double_step: bool = Field(
        False, description="repeat optimizer.step() as the official code does (a quirk)"
    )


class ELLEA(_Strict):
    """ELLE-A: λ resets to λ_max when E_lin spikes above mean + s·std of its history."""

    kind: Literal["elle_a"] = "elle_a"
    lam_max: float = Field(4000.0, ge=0, le=1e6)
    sensitivity: float = Field(2.0, gt=0, le=100, description="s")
    decay: float = Field(0.99, gt=0, lt=1, description="γ, per iteration")
    official_double_step: bool = False


class AAER(_Strict):
    """AAER (Lin'23): penalize abnormal adversarial examples (the ascent step lowered the loss)."""

    kind: Literal["aaer"] = "aaer"
    lam1: float = Field(1.0, ge=0, le=1e4)
    lam2: float = Field(2.5, ge=0, le=1e4)
    lam3: float = Field(1.5, ge=0, le=1e4)
    gradient: Literal["official", "paper"] = Field(
        "official",
        description="official: only the logit-variation term carries gradient (as the code); "
        "paper: gradient also flows through the CE variation",
    )


class GradAlign(_Strict):
    """GradAlign (Andriushchenko'20): λ·(1 − cos(∇ℓ(x), ∇ℓ(x+η))), double backprop."""

    kind: Literal["gradalign"] = "gradalign"
    lam: float = Field(0.2, ge=0, le=1e4)


Regularizer = Annotated[ELLE | ELLEA | AAER | GradAlign, Field(discriminator="kind")]


class AWPSpec(_Strict):
    """AWP (Wu, Xia, Wang 2020), the official rule: a proxy copy takes one ascent step on the
    loss at x_adv; each ≥2-D weight w_l moves by γ·‖w_l‖·Δ_l/‖Δ_l‖; restored after the step."""

    kind: Literal["awp"] = "awp"
    gamma: float = Field(0.01, gt=0, le=0.1, description="γ; 0.01 for PGD-AT, 0.005 TRADES")
    warmup: int = Field(0, ge=0, le=1000, description="first epoch (1-based) AWP applies at")


class SAMAWPSpec(_Strict):
    """ADR's SAM-style AWP variant: e = ρ·‖p‖/‖∇p‖·∇p on every parameter with a gradient,
    second pass with BatchNorm statistics frozen; not the official AWP rule."""

    kind: Literal["awp_sam"] = "awp_sam"
    rho: float = Field(0.005, gt=0, le=0.1)
    warmup: int = Field(0, ge=0, le=1000)


WeightPerturbation = Annotated[AWPSpec | SAMAWPSpec, Field(discriminator="kind")]


class HardLabels(_Strict):
    kind: Literal["hard"] = "hard"


class ADRSpec(_Strict):
    """ADR (Wu, Wang, Chen 2024): rectified soft labels from an EMA teacher on the clean x,
    with per-iteration cosine schedules: τ from tau_high down to tau_low, λ from lam_low up to
    lam_high."""

    kind: Literal["adr"] = "adr"
    decay: float = Field(0.995, gt=0, lt=1, description="EMA teacher decay")
    tau_high: float = Field(2.5, gt=0, le=100)
    tau_low: float = Field(2.0, gt=0, le=100)
    lam_low: float = Field(0.7, ge=0, le=1)
    lam_high: float = Field(0.95, ge=0, le=1)


Labels = Annotated[HardLabels | ADRSpec, Field(discriminator="kind")]


class WeightAverageSpec(_Strict):
    """An EMA of the weights (the "WA" model), evaluated beside the raw model."""

    decay: float = Field(0.995, gt=0, lt=1)


class RecipeSpec(_Strict):
    preset: str | None = Field(None, description="the preset this recipe started from")
    adversary: Adversary = Field(default_factory=NoAdversary)
    loss: Loss = Field(default_factory=CELoss)
    regularizers: list[Regularizer] = Field(default_factory=list, max_length=4)
    weight_perturbation: WeightPerturbation | None = None
    labels: Labels = Field(default_factory=HardLabels)
    weight_average: WeightAverageSpec | None = None

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_by_name(cls, v: Any) -> Any:
        return {"kind": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _consistent(self) -> RecipeSpec:
        kinds = [r.kind for r in self.regularizers]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"recipe.regularizers lists a regularizer twice: {kinds}")
        if "elle" in kinds and "elle_a" in kinds:
            raise ValueError("recipe.regularizers: use either elle or elle_a, not both")
        if "aaer" in kinds and self.adversary.kind not in ("fgsm", "fgsm_rs", "n_fgsm"):
            raise ValueError(
                "recipe.regularizers: aaer needs a single-step adversary "
                f"(fgsm, fgsm_rs, n_fgsm), got {self.adversary.kind}"
            )
        if self.loss.kind == "trades" and self.adversary.kind != "pgd":
            raise ValueError("recipe.loss trades needs adversary kind 'pgd' (its KL attack)")
        if self.weight_perturbation is not None and self.adversary.kind != "pgd":
            raise ValueError("recipe.weight_perturbation (AWP) composes with multi-step "
                             f"recipes (adversary 'pgd'), got {self.adversary.kind!r}")
        if self.labels.kind == "adr" and self.adversary.kind != "pgd":
            raise ValueError("recipe.labels adr composes with multi-step recipes "
                             f"(adversary 'pgd'), got {self.adversary.kind!r}")
        return self


# ---------------------------------------------------------------------------------- schedule
class LRSchedule(_Strict):
    """lr as a function of fractional epoch t in [0, epochs]; set every iteration."""

    kind: Literal["piecewise", "cyclic", "cosine", "constant"] = "cyclic"
    lr_max: float = Field(0.2, gt=0, le=10)
    milestones: list[float] = Field(
        default_factory=lambda: [0.5, 0.75],
        description="piecewise: fractions of the run where lr is multiplied by gamma",
    )
    gamma: float = Field(0.1, gt=0, le=1)
    peak: float = Field(0.5, gt=0, lt=1, description="cyclic: fraction of the run at lr_max")

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not (0 < m < 1) for m in v) or v != sorted(v):
            raise ValueError("milestones must be increasing fractions of the run in (0, 1)")
        return v


class ScheduleSpec(_Strict):
    epochs: int = Field(30, ge=1, le=1000)
    batch_size: int = Field(128, ge=1, le=4096)
    optimizer: Literal["sgd", "adam"] = Field(
        "sgd", description="sgd (momentum, nesterov apply) or adam (β = 0.9, 0.999; "
                           "weight_decay is Adam's L2 term)")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0, le=0.1)
    lr: LRSchedule = Field(default_factory=LRSchedule)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _nesterov_is_sgd(self) -> ScheduleSpec:
        if self.nesterov and self.optimizer != "sgd":
            raise ValueError("schedule.nesterov applies to optimizer 'sgd' only")
        return self


# ---------------------------------------------------------------------------------- evaluation
SINGLE_STEP = ("fgsm", "fgsm_rs", "n_fgsm")  # adversaries the watchdog's remedies apply to


class MonitorSpec(_Strict):
    """Per-epoch checks on the held-out validation slice (model in eval mode)."""

    size: int = Field(
        1024, ge=0, le=100_000, description="0 disables; capped by dataset.val_size"
    )
    pgd_steps: int = Field(10, ge=1, le=200)
    pgd_alpha: float = Field(0.25, gt=0, le=4, description="multiple of ε")
    co_drop: float = Field(
        0.5, gt=0, lt=1,
        description="the FGSM-PGD gap: PGD acc below co_drop x max(its best so far, FGSM acc) ...",
    )
    co_gap: float = Field(0.2, gt=0, le=1, description="... while FGSM acc exceeds PGD acc by this")
    co_patience: float = Field(
        0.5, ge=0, le=100, description="catastrophic overfitting (the alarm): the gap has held "
        "at every check for this many epochs ...")
    co_rise: float = Field(0.1, gt=0, le=1, description="... PGD acc rose less than this over "
                           "that span (a rising PGD acc is a model not robust yet) ...")
    co_resist: float = Field(
        0.8, ge=0, le=1, description="... and FGSM acc >= co_resist x clean acc: the training "
        "attack no longer works (below: an under_training event instead)")
    probes: Annotated[int, Field(ge=0, le=20)] | Literal["auto"] = Field(
        "auto", description="checks within each epoch (besides its end) on probe_size images "
        "with PGD-probe_pgd_steps, evenly spaced; auto: up to 3 for single-step adversaries, as "
        "many as cost <= 10 % of the epoch's training (none for multi-step ones); 0: off")
    probe_size: int = Field(256, ge=16, le=10_000, description="capped by the monitor's size")
    probe_pgd_steps: int = Field(5, ge=1, le=100)
    stop_on_co: bool = Field(
        False, description="the same as on_catastrophic_overfitting: stop (kept for old specs)")
    on_catastrophic_overfitting: Literal["record", "stop", "remediate"] = Field(
        "record", description="record: note the event and train on; stop: end training and go "
                              "to the final evaluation (sweeps over ε use it); remediate: roll "
                              "back to the last healthy epoch and go on with the next remedy")
    max_nonfinite_steps: int = Field(
        0, ge=0, le=1_000_000,
        description="steps with a non-finite loss, loss term or gradient are skipped (nothing "
                    "updated) and counted; one more in an epoch and the run has diverged: a "
                    "'diverged' event, then failure (record, stop) or a rollback (remediate)")
    remedies: list[Literal["elle_a", "n_fgsm_noise", "halve_step"]] = Field(
        default_factory=lambda: ["elle_a"], min_length=1, max_length=3,
        description="with remediate, one per CO event, in order: elle_a (switch on ELLE-A at "
                    "the preset's λ), n_fgsm_noise (N-FGSM's noise, k = 2), halve_step (α/2)")
    masking_gap: float | None = Field(
        0.05, gt=0, le=1,
        description="gradient-masking check: PGD-pgd_steps on the DLR loss (Croce & Hein 2020) "
                    "beside cross-entropy's; a 'gradient_masking' event when the cross-entropy "
                    "PGD accuracy exceeds the DLR PGD accuracy by this much (null: off; needs "
                    ">= 3 classes)")

    @model_validator(mode="after")
    def _stop_alias(self) -> MonitorSpec:
        if self.stop_on_co and self.on_catastrophic_overfitting == "record":
            self.on_catastrophic_overfitting = "stop"
        return self


class PGDEval(_Strict):
    steps: int = Field(50, ge=1, le=10_000)
    restarts: int = Field(10, ge=1, le=100)
    alpha: float = Field(0.25, gt=0, le=4, description="step as a multiple of ε (state it!)")


class AutoAttackEval(_Strict):
    version: Literal["standard", "apgd-ce", "apgd-t", "apgd-ce+apgd-t"] = Field(
        "standard", description="standard: APGD-CE, APGD-T, FAB-T, Square-5000; apgd-ce+apgd-t: "
                                "the first two only (state it where reported)")


class FinalEval(_Strict):
    split: Literal["test", "validation"] = Field(
        "test", description="the images the final suite (and certification) evaluates: the "
        "test set, or the held-out validation slice of the training set (dataset.val_size "
        "images) for choosing a setting without touching the test images; a validation "
        "figure is never ranked on the leaderboard")
    n: int | None = Field(None, ge=1, le=10_000_000,
                          description="points evaluated; None = the whole split")
    models: list[Literal["last", "best", "wa"]] = Field(
        default_factory=lambda: ["last", "wa"], min_length=1,
        description="which weights to evaluate: last epoch, best monitor PGD epoch, weight "
                    "average (skipped when the recipe keeps none)")
    batch_size: int = Field(256, ge=1, le=8192)
    fgsm: bool = True
    pgd: PGDEval | None = Field(default_factory=PGDEval)
    autoattack: AutoAttackEval | None = Field(default_factory=AutoAttackEval)


class SmoothedAttackEval(_Strict):
    """Empirical robustness of the smoothed classifier: torchattacks' PGDRSL2 (Salman et al.
    2019) against the base model under noise, then PREDICT on the adversarial inputs."""

    eps: float = Field(0.5, gt=0, le=64, description="ℓ2 radius of the attack")
    steps: int = Field(10, ge=1, le=1000)
    noise_samples: int = Field(8, ge=1, le=1024, description="noise draws per attack step")
    predict_n: int = Field(1000, ge=10, le=1_000_000, description="PREDICT samples")
    num_points: int = Field(100, ge=1, le=100_000)


class CertificationSpec(_Strict):
    """CERTIFY (Cohen et al. 2019) on the test set; defaults are the paper's."""

    sigma: float | None = Field(None, gt=0, le=4, description="default: the training σ")
    n0: int = Field(100, ge=1, le=1_000_000, description="selection samples")
    n: int = Field(100_000, ge=1, le=10_000_000, description="estimation samples")
    alpha: float = Field(0.001, gt=0, lt=0.5, description="failure probability")
    batch_size: int = Field(1000, ge=1, le=100_000)
    skip: int = Field(1, ge=1, le=10_000, description="certify every skip-th test image")
    num_points: int | None = Field(None, ge=1, description="cap on the points certified")
    chunk: int = Field(16, ge=1, le=10_000, description="inputs per progress checkpoint")
    radii: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0])
    empirical: SmoothedAttackEval | None = Field(default_factory=SmoothedAttackEval)


class EvaluationSpec(_Strict):
    monitor: MonitorSpec = Field(default_factory=MonitorSpec)
    final: FinalEval = Field(default_factory=FinalEval)
    certification: CertificationSpec | None = Field(
        None, description="randomized smoothing; on by default when the adversary is gaussian")


class ComputeSpec(_Strict):
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: on for CUDA and the CPU")
    devices: Annotated[int, Field(ge=1, le=64)] | Literal["all"] = Field(
        1, description="training ranks (torch.distributed DDP): one per CUDA "
        "device (NCCL), or CPU processes (gloo); 'all' = every visible GPU. "
        "schedule.batch_size stays the global batch")
    sync_batchnorm: bool = Field(False, description="with devices > 1: BatchNorm statistics "
                                 "over the global batch (SyncBatchNorm) instead of per rank")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the training step's network. auto: on only on "
        "device types where the recorded step-cost figures show a win (none yet: on the CPU "
        "it loses; see docs/benchmarks.md)")


class MLflowSpec(_Strict):
    """Log the job to an MLflow tracking store (needs ``pip install bulwark[mlflow]``)."""

    target: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="the name of one of the operator's tracking servers "
                    "(BULWARK_MLFLOW_TARGETS); neither target nor uri: the operator's default")
    uri: str | None = Field(
        None, max_length=2000, description="`bulwark run` only: a tracking URI of your own, "
        "http(s)://host:port of a server or sqlite:///path/mlflow.db (through the API a job "
        "names a target instead)")
    experiment: str = Field("bulwark", max_length=200)
    run_name: str | None = Field(None, max_length=200, description="default: the job's name")

    @model_validator(mode="after")
    def _one_server(self) -> MLflowSpec:
        if self.target is not None and self.uri is not None:
            raise ValueError("tracking.mlflow: give target (a server the operator named) or "
                             "uri (bulwark run), not both")
        return self


class TrackingSpec(_Strict):
    mlflow: MLflowSpec | None = None


# ---------------------------------------------------------------------------------- job
class JobSpec(_Strict):
    spec_version: Literal[1] = SPEC_VERSION
    name: str | None = Field(None, max_length=200)
    mode: Literal["train", "evaluate"] = Field(
        "train", description="evaluate: no training; evaluate (and certify) model.weights")
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    threat: ThreatSpec = Field(default_factory=ThreatSpec)
    recipe: RecipeSpec = Field(default_factory=RecipeSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    compute: ComputeSpec = Field(default_factory=ComputeSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @model_validator(mode="after")
    def _cross_checks(self) -> JobSpec:
        if (self.evaluation.monitor.on_catastrophic_overfitting == "remediate"
                and self.recipe.adversary.kind not in SINGLE_STEP):
            raise ValueError("evaluation.monitor.on_catastrophic_overfitting: remediate applies "
                             "to single-step recipes (fgsm, fgsm_rs, n_fgsm adversaries), not "
                             f"to {self.recipe.adversary.kind!r}")
        double = any(getattr(r, "official_double_step", False) for r in self.recipe.regularizers)
        if double and self.compute.precision == "fp16":
            raise ValueError("official_double_step cannot be combined with compute.precision "
                             "fp16 (the loss scaler steps once per batch); use fp32 or bf16, or "
                             "set official_double_step: false on the regularizer (the ELLE "
                             "presets turn it on, as the official code steps twice)")
        if self.compute.compile == "on" and any(r.kind == "gradalign"
                                                for r in self.recipe.regularizers):
            raise ValueError("compute.compile: 'on' cannot train GradAlign (its gradient "
                             "alignment term needs a double backward, which torch.compile "
                             "does not support); use 'auto' or 'off'")
        if self.threat.epsilon_warmup > self.schedule.epochs:
            raise ValueError(f"threat.epsilon_warmup must be in [0, schedule.epochs = "
                             f"{self.schedule.epochs}], got {self.threat.epsilon_warmup:g}")
        if self.evaluation.final.split == "validation" and not self.dataset.val_size:
            raise ValueError("evaluation.final.split 'validation' evaluates the held-out slice: "
                             "dataset.val_size must be > 0")
        if self.mode == "evaluate" and not self.model.weights:
            raise ValueError("model.weights is required when mode is 'evaluate'")
        adv = self.recipe.adversary
        if adv.kind == "gaussian" and self.evaluation.certification is None:
            self.evaluation.certification = CertificationSpec()
        cert = self.evaluation.certification
        if cert is not None and cert.sigma is None:
            if adv.kind != "gaussian":
                raise ValueError("evaluation.certification.sigma is required when the adversary "
                                 "is not gaussian (it defaults to the training σ)")
            cert.sigma = adv.sigma
        return self

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        return apply_preset(data) if isinstance(data, dict) else data


# ---------------------------------------------------------------------------------- errors
def format_validation_error(exc: Exception) -> str:
    """One line per problem: `field.path: message`, for the CLI."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        return str(exc)
    lines = []
    for e in errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("function-after",))
        msg = e.get("msg", "")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        lines.append(f"{loc or '(spec)'}: {msg}")
    return "\n".join(lines)


MAX_NESTING = 64  # a spec nests ~6 deep; a sweep's grid a few more
MAX_YAML_NODES = 20_000  # a spec has a few hundred


def _plain_yaml_loader():
    """A SafeLoader for text from someone else (the API): no anchors or aliases (an alias bomb
    of a few hundred bytes expands to gigabytes), at most MAX_NESTING deep and MAX_YAML_NODES
    nodes, so that reading it is bounded by its size."""
    import yaml

    class PlainLoader(yaml.SafeLoader):
        nodes = depth = 0

        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise yaml.composer.ComposerError(
                    None, None, "YAML anchors and aliases (&name, *name) are not accepted "
                    "here: write the values out", event.start_mark)
            self.nodes += 1
            if self.nodes > MAX_YAML_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_YAML_NODES} values", event.start_mark)
            if self.depth > MAX_NESTING:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_NESTING} levels", event.start_mark)
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return PlainLoader


def parse_spec_text(text: str, what: str = "the spec", json_only: bool = False,
                    plain: bool = False) -> dict[str, Any]:
    """The mapping in YAML (a superset of JSON) or, with ``json_only``, JSON text; not yet
    validated (SpecError naming ``what`` otherwise). YAML is read with ``safe_load``: plain
    data only, never objects; with ``plain`` (text from a tenant) also no anchors or aliases
    and bounded nesting. An error quotes at most a short excerpt of the text."""
    import json

    import yaml

    try:
        if json_only:
            data = json.loads(text)
        elif plain:
            data = yaml.load(text, Loader=_plain_yaml_loader())  # noqa: S506 - a SafeLoader
        else:
            data = yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise SpecError(f"{what}: not valid {'JSON' if json_only else 'YAML'}: "
                        f"{why[:500]}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{what}: the spec must be a mapping at the top level")
    return data


def read_spec_file(path: str) -> dict[str, Any]:
    """The mapping in a JSON or YAML spec file, not yet validated (SpecError otherwise)."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file not found: {p}")
    return parse_spec_text(p.read_text(), str(p), json_only=p.suffix == ".json")


def load_spec_file(path: str) -> JobSpec:
    """Read a JSON or YAML spec file and validate it (raises SpecError with readable text)."""
    from pydantic import ValidationError

    data = read_spec_file(path)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"{path}: invalid job spec\n{format_validation_error(e)}") from e
    except ValueError as e:  # raised by preset resolution
        raise SpecError(f"{path}: invalid job spec\n{e}") from e


def as_ran(dumped: dict[str, Any]) -> dict[str, Any]:
    """A spec as a run dumped it (report.json's ``spec``), completed with the values its fields
    had before they existed: a dump holds every field, so a missing ``model.normalization`` was
    written before the field was added, when every model normalized with the dataset's
    statistics. Without this an old MNIST run would read as trained on raw pixels, the presets'
    value since."""
    model = dumped.get("model")
    if isinstance(model, dict) and "depth" in model and "normalization" not in model:
        return {**dumped, "model": {**model, "normalization": "dataset"}}
    return dumped


def same_spec(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal job specs (as dumped), whatever their names, ``compute.devices`` and
    ``compute.compile``: none changes what a run computes (the batch is the global batch on any
    number of ranks; a compiled step computes the eager one's figures up to float rounding), so
    a run may resume or be reused under another name, on another number of devices, compiled
    or not. Both are read again first, so a spec dumped before a field with a default existed
    still equals its reading."""
    def norm(d: dict[str, Any]) -> Any:
        try:
            dumped = JobSpec.model_validate(as_ran(d)).model_dump(mode="json")
            dumped["compute"] = {**dumped["compute"], "devices": None, "compile": None}
            return {**dumped, "name": None}
        except ValueError:
            return {**as_ran(d), "name": None}
    return norm(a) == norm(b)


def remedied(recipe: RecipeSpec, remedy: str) -> RecipeSpec | None:
    """The recipe with ``remedy`` applied (the watchdog's remediation), or None when it does not
    apply to it: elle_a when the recipe has no ELLE yet, n_fgsm_noise to FGSM / FGSM-RS,
    halve_step to any single-step adversary."""
    data = recipe.model_dump(mode="json")
    adv = data["adversary"]
    if remedy == "elle_a":
        if any(r["kind"] in ("elle", "elle_a") for r in data["regularizers"]):
            return None
        data["regularizers"].append(dict(ELLE_A))
    elif remedy == "n_fgsm_noise":
        if adv["kind"] not in ("fgsm", "fgsm_rs"):
            return None
        data["adversary"] = {"kind": "n_fgsm", "k": 2.0, "alpha": adv.get("alpha", 1.0),
                             "clip_adv": adv.get("clip_adv", True)}
    elif remedy == "halve_step":
        if adv["kind"] not in SINGLE_STEP:
            return None
        adv["alpha"] = adv.get("alpha", 1.0) / 2
    else:
        raise ValueError(f"unknown remedy {remedy!r}")
    return RecipeSpec.model_validate(data)


def as_spec(spec: Any) -> JobSpec:
    """A ``JobSpec`` from a JobSpec, a mapping, or the path of a JSON/YAML file."""
    from pathlib import Path

    from pydantic import ValidationError

    if isinstance(spec, JobSpec):
        return spec
    if isinstance(spec, str | Path):
        return load_spec_file(str(spec))
    if isinstance(spec, dict):
        try:
            return JobSpec.model_validate(spec)
        except ValidationError as e:
            raise SpecError(f"invalid job spec\n{format_validation_error(e)}") from e
        except ValueError as e:
            raise SpecError(f"invalid job spec\n{e}") from e
    raise SpecError(f"a job spec is a JobSpec, a mapping or a file path, not {type(spec)}")


class SpecError(ValueError):
    pass
