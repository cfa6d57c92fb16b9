"""bulwark.contract.presets, bulwark.contract.spec and bulwark.workers.engine.schedule (no torch):
the papers' per-ε defaults (docs/methods.md, "Presets per dataset family"), field-by-field
overrides, spec validation, and lr schedules against their closed forms."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from bulwark.contract.presets import PRESETS
from bulwark.contract.spec import JobSpec, LRSchedule, format_validation_error
from bulwark.workers.engine.schedule import lr_at

REPO = Path(__file__).resolve().parent.parent
FAST = {"standard", "fgsm", "fgsm-rs", "n-fgsm", "fgsm-elle", "fgsm-elle-a", "n-fgsm-elle-a",
        "rs-aaer", "n-aaer", "fgsm-gradalign"}
LONG = {"pgd-at", "trades-200", "pgd-awp", "trades-awp", "pgd-adr", "trades-adr", "pgd-adr-awp"}
CIFAR = {"dataset": {"name": "cifar10"}}  # the papers' tables are CIFAR-10's


def cifar(data: dict) -> JobSpec:
    return JobSpec.model_validate({**CIFAR, **data})


def job(recipe, epsilon: object = "8/255", norm: str = "linf", **extra) -> JobSpec:
    return cifar({"recipe": recipe,
                                   "threat": {"epsilon": epsilon, "norm": norm}, **extra})


def reg(spec: JobSpec, kind: str):
    (r,) = [r for r in spec.recipe.regularizers if r.kind == kind]
    return r


# ---------------------------------------------------------------------------------- presets
def test_preset_names_are_the_documented_set():
    assert set(PRESETS) == FAST | LONG | {"trades", "gaussian-smoothing"}


def test_gaussian_smoothing_preset_follows_cohen():
    spec = job({"preset": "gaussian-smoothing", "adversary": {"kind": "gaussian", "sigma": 0.5}})
    assert (spec.recipe.adversary.kind, spec.recipe.adversary.sigma) == ("gaussian", 0.5)
    s = spec.schedule
    assert (s.epochs, s.weight_decay, s.lr.kind, s.lr.lr_max) == (90, 1e-4, "piecewise", 0.1)
    assert [m * 90 for m in s.lr.milestones] == pytest.approx([30, 60])
    cert = spec.evaluation.certification
    assert (cert.sigma, cert.n0, cert.n, cert.alpha) == (0.5, 100, 100_000, 0.001), \
        "certification is on, at the training σ, with the paper's defaults"
    with pytest.raises(ValidationError, match="sigma is required"):
        job("fgsm", evaluation={"certification": {"n": 100}})


@pytest.mark.parametrize("e,lam", [(8, 1000.0), (4, 1000.0), (16, 5000.0), (10, 5000.0),
                                   (20, 5000.0), (24, 10000.0), (22, 10000.0), (26, 10000.0)])
def test_fgsm_elle_lambda_per_epsilon(e, lam):
    spec = job("fgsm-elle", f"{e}/255")
    assert reg(spec, "elle").lam == lam
    assert spec.recipe.adversary.kind == "fgsm" and spec.recipe.adversary.alpha == 1.0


@pytest.mark.parametrize("e,lam", [(2, 0.036), (4, 0.063), (6, 0.112), (8, 0.2), (10, 0.356),
                                   (12, 0.632), (14, 1.124), (16, 2.0), (20, 2.0), (32, 2.0)])
def test_gradalign_lambda_at_table_points(e, lam):
    assert reg(job("fgsm-gradalign", f"{e}/255"), "gradalign").lam == pytest.approx(lam, abs=1e-9)


@pytest.mark.parametrize("e,lo,hi", [(3, 0.036, 0.063), (9, 0.2, 0.356), (11, 0.356, 0.632),
                                     (15, 1.124, 2.0), (8.5, 0.2, 0.356)])
def test_gradalign_lambda_between_table_points_is_strictly_between(e, lo, hi):
    lam = reg(job("fgsm-gradalign", e / 255), "gradalign").lam
    assert lo < lam < hi


def test_gradalign_lambda_midpoint_is_log_linear():
    # the documented interpolation: log-linear, so the midpoint is the geometric mean
    lam = reg(job("fgsm-gradalign", "9/255"), "gradalign").lam
    assert lam == pytest.approx(math.sqrt(0.2 * 0.356), abs=1e-6)


@pytest.mark.parametrize("preset,e,lams", [
    # the AAER README's current table (its first commit had RS 12: λ3 2.5; RS 32: λ2 6.0;
    # N 32: (3.5, 0.7))
    ("rs-aaer", 8, (2.5, 1.5)), ("rs-aaer", 12, (5.0, 2.75)), ("rs-aaer", 16, (7.0, 3.25)),
    ("rs-aaer", 32, (5.75, 1.5)), ("n-aaer", 8, (1.5, 0.15)), ("n-aaer", 12, (5.0, 0.55)),
    ("n-aaer", 16, (8.5, 1.5)), ("n-aaer", 32, (2.75, 0.75)),
])
def test_aaer_lambdas_per_epsilon(preset, e, lams):
    spec = job(preset, f"{e}/255")
    r = reg(spec, "aaer")
    assert (r.lam1, r.lam2, r.lam3) == (1.0, *lams)
    assert r.gradient == "official"


# The AAER README's CIFAR-100 commands (tmllab/2023_NeurIPS_AAER at 5ad2591), as written there
# after `python3 AAER.py --epoch 30`; the test reads λ2 and λ3 off them.
AAER_CIFAR100 = """
--clamp 1 --alpha 1.25 --epsilon 8 --lamda1 1.0 --lamda2 3.5 --lamda3 1.5
--clamp 0 --alpha 1.00 --epsilon 8 --lamda1 1.0 --lamda2 1.5 --lamda3 0.15
--clamp 1 --alpha 1.25 --epsilon 12 --lamda1 1.0 --lamda2 3.5 --lamda3 2.75
--clamp 0 --alpha 1.00 --epsilon 12 --lamda1 1.0 --lamda2 3.5 --lamda3 0.3
--clamp 1 --alpha 1.25 --epsilon 16 --lamda1 1.0 --lamda2 6.0 --lamda3 2.25
--clamp 0 --alpha 1.00 --epsilon 16 --lamda1 1.0 --lamda2 6.0 --lamda3 0.5
--clamp 1 --alpha 1.25 --epsilon 32 --lamda1 1.0 --lamda2 5.0 --lamda3 0.75
--clamp 0 --alpha 1.00 --epsilon 32 --lamda1 1.0 --lamda2 3.5 --lamda3 0.5
"""


def test_aaer_on_cifar100_takes_the_readmes_cifar100_table():
    import re

    rows = re.findall(r"--clamp (\d) .*--epsilon (\d+) .*--lamda2 ([\d.]+) --lamda3 ([\d.]+)",
                      AAER_CIFAR100)
    assert len(rows) == 8
    for clamp, e, lam2, lam3 in rows:
        preset = "rs-aaer" if clamp == "1" else "n-aaer"  # --clamp 1: RS-AAER, 0: N-AAER
        spec = JobSpec.model_validate({"dataset": {"name": "cifar100"}, "recipe": preset,
                                       "threat": {"epsilon": f"{e}/255"}})
        r = reg(spec, "aaer")
        assert (r.lam1, r.lam2, r.lam3) == (1.0, float(lam2), float(lam3)), (preset, e)
        from bulwark.contract.presets import preset_sources
        sources = {f: src for f, _, src in preset_sources(spec)}
        assert "CIFAR-100 table" in sources["recipe.regularizers.aaer"]
    # CIFAR-10 keeps its own table (RS 8/255: (2.5, 1.5) there, (3.5, 1.5) on CIFAR-100)
    ten = reg(job("rs-aaer", "8/255"), "aaer")
    assert (ten.lam2, ten.lam3) == (2.5, 1.5)


@pytest.mark.parametrize("e,rs,n", [(4, (2.5, 1.5), (1.5, 0.15)),
                                    (13, (5.0, 2.75), (5.0, 0.55)),
                                    (14.5, (7.0, 3.25), (8.5, 1.5)), (22, (7.0, 3.25), (8.5, 1.5)),
                                    (26, (5.75, 1.5), (2.75, 0.75)),
                                    (40, (5.75, 1.5), (2.75, 0.75))])
def test_aaer_lambdas_between_table_points_take_the_nearest_entry(e, rs, n):
    r = reg(job("rs-aaer", e / 255), "aaer")
    assert (r.lam2, r.lam3) == rs
    r = reg(job("n-aaer", e / 255), "aaer")
    assert (r.lam2, r.lam3) == n


def test_aaer_presets_use_their_base_attacks():
    rs = job("rs-aaer").recipe.adversary
    n = job("n-aaer").recipe.adversary
    assert (rs.kind, rs.alpha) == ("fgsm_rs", 1.25)
    assert (n.kind, n.k, n.alpha) == ("n_fgsm", 2.0, 1.0)  # N-AAER: α = 1.0ε, not 1.25ε


def test_single_step_adversaries():
    assert job("fgsm").recipe.adversary.model_dump() == {"kind": "fgsm", "alpha": 1.0,
                                                         "clip_adv": True}
    assert job("fgsm-rs").recipe.adversary.model_dump() == {"kind": "fgsm_rs", "alpha": 1.25,
                                                            "clip_start": True, "clip_adv": True}
    assert job("n-fgsm").recipe.adversary.model_dump() == {"kind": "n_fgsm", "k": 2.0,
                                                           "alpha": 1.0, "clip_start": True,
                                                           "clip_adv": True}
    assert job("standard").recipe.adversary.kind == "none"
    for name in FAST:
        assert job(name).recipe.loss.kind == "ce"


@pytest.mark.parametrize("name", ["fgsm-elle-a", "n-fgsm-elle-a"])
def test_elle_a_presets(name):
    spec = job(name, "16/255")
    r = reg(spec, "elle_a")
    assert (r.lam_max, r.sensitivity, r.decay) == (4000.0, 2.0, 0.99)  # λ_max 4000 at every ε
    assert r.official_double_step  # as the official code: optimizer.step() twice a batch
    expected = "fgsm" if name == "fgsm-elle-a" else "n_fgsm"
    assert spec.recipe.adversary.kind == expected


@pytest.mark.parametrize("name", sorted(LONG))
def test_multi_step_presets(name):
    spec = job(name)
    s = spec.schedule
    assert s.epochs == 200 and s.batch_size == 128
    assert (s.momentum, s.weight_decay) == (0.9, 5e-4)
    assert s.lr.kind == "piecewise" and s.lr.lr_max == 0.1
    assert s.lr.milestones == [0.5, 0.75] and s.lr.gamma == 0.1
    adv = spec.recipe.adversary
    assert (adv.kind, adv.steps, adv.restarts, adv.random_start) == ("pgd", 10, 1, True)
    assert adv.alpha * 8 / 255 == pytest.approx(2 / 255)  # PGD-10, step 2/255 at 8/255
    assert spec.recipe.regularizers == []
    if name.startswith("trades"):
        assert spec.recipe.loss.kind == "trades" and spec.recipe.loss.beta == 6.0
    else:
        assert spec.recipe.loss.kind == "ce"
    r = spec.recipe
    awp = {"pgd-awp": (0.01, 0), "trades-awp": (0.005, 10), "pgd-adr-awp": (0.005, 0)}
    if name in awp:
        assert (r.weight_perturbation.kind, r.weight_perturbation.gamma,
                r.weight_perturbation.warmup) == ("awp", *awp[name])
    else:
        assert r.weight_perturbation is None
    adr = {"pgd-adr": (2.0, 0.95), "trades-adr": (2.0, 0.95), "pgd-adr-awp": (1.5, 0.85)}
    if name in adr:
        assert (r.labels.kind, r.labels.decay, r.labels.tau_high, r.labels.lam_low) == \
            ("adr", 0.995, 2.5, 0.7)
        assert (r.labels.tau_low, r.labels.lam_high) == adr[name]
        assert r.weight_average is not None and r.weight_average.decay == 0.995
    else:
        assert r.labels.kind == "hard" and r.weight_average is None
    assert s.nesterov == (name in ("pgd-adr", "trades-adr"))  # ADR's SGD configs


def test_trades_is_trades_own_recipe_and_trades_200_the_awp_adr_baseline():
    spec = job("trades", 0.031)
    s, adv = spec.schedule, spec.recipe.adversary
    assert (s.epochs, s.weight_decay, s.lr.kind, s.lr.lr_max) == (76, 2e-4, "piecewise", 0.1)
    # lr ×0.1 from epoch 75 (1-based) of 76: the official `if epoch >= 75`
    assert s.lr.milestones[0] * 76 == pytest.approx(74)
    assert (adv.kind, adv.steps) == ("pgd", 10)
    assert adv.alpha * 0.031 == pytest.approx(0.007, rel=1e-5)  # step 0.007 at ε 0.031
    assert spec.recipe.loss.beta == 6.0
    assert lr_at(s.lr, 73.99, 76) == pytest.approx(0.1)
    assert lr_at(s.lr, 74.01, 76) == pytest.approx(0.01)
    base = job("trades-200").schedule
    assert (base.epochs, base.weight_decay, base.lr.milestones) == (200, 5e-4, [0.5, 0.75])


# ---------------------------------------------------------------------------------- families
def mnist(recipe, **extra) -> JobSpec:
    return JobSpec.model_validate({"dataset": {"name": "mnist"}, "recipe": recipe,
                                   "threat": {"epsilon": 0.3}, **extra})


@pytest.mark.parametrize("name", sorted(FAST))
def test_mnist_single_step_presets_use_the_mnist_recipe(name):
    spec = mnist(name)
    s = spec.schedule
    # Wong et al.'s MNIST/train_mnist.py: 10 epochs of batch 100, Adam, lr 0 → 5e-3 → 0
    assert (s.optimizer, s.weight_decay, s.epochs, s.batch_size) == ("adam", 0.0, 10, 100)
    assert (s.lr.kind, s.lr.lr_max, s.lr.peak) == ("cyclic", 0.005, 0.4)
    assert lr_at(s.lr, 4.0, 10) == pytest.approx(0.005)  # their np.interp peak at epochs*2//5
    # ... on raw [0, 1] pixels, with no ε warm-up (train_mnist.py has neither)
    assert spec.threat.epsilon_warmup == 0.0 and spec.model.normalization == "none"
    assert job(name, 0.3).model.normalization == "dataset"  # CIFAR's recipes normalize
    # the adversary kind is the method's, whatever the dataset; FGSM-RS takes their MNIST
    # code's step α = 1.25ε from its unclipped start
    cifar = job(name, 0.3).recipe.adversary
    assert spec.recipe.adversary.kind == cifar.kind
    if cifar.kind == "fgsm_rs":
        assert (spec.recipe.adversary.alpha, spec.recipe.adversary.clip_start) == (1.25, False)
        assert (cifar.alpha, cifar.clip_start) == (1.25, True)
    else:
        assert spec.recipe.adversary == cifar


def test_mnist_multi_step_presets_follow_madry_and_trades_mnist_scripts():
    pgd = mnist("pgd-at")
    assert (pgd.recipe.adversary.steps, pgd.schedule.optimizer, pgd.schedule.lr.kind,
            pgd.schedule.lr.lr_max, pgd.schedule.batch_size) == (40, "adam", "constant", 1e-4, 50)
    assert pgd.recipe.adversary.alpha * 0.3 == pytest.approx(0.01, rel=1e-4)
    assert pgd.schedule.epochs * 60_000 // 50 == pytest.approx(100_000, rel=0.005)
    trades = mnist("trades")
    assert trades.recipe.loss.beta == 1.0 and trades.recipe.adversary.steps == 40
    s = trades.schedule
    assert (s.optimizer, s.lr.lr_max, s.weight_decay, s.epochs) == ("sgd", 0.01, 0.0, 100)

    def trades_lr(epoch: int) -> float:  # train_trades_mnist.py's adjust_learning_rate (c56d2f2)
        lr = 0.01
        if epoch >= 55:
            lr = 0.01 * 0.1
        if epoch >= 75:
            lr = 0.01 * 0.01
        if epoch >= 90:
            lr = 0.01 * 0.001
        return lr

    for epoch in range(1, 101):  # its epochs count from 1; t here from 0 within the run
        for t in (epoch - 1, epoch - 0.5, epoch - 1e-3):
            assert lr_at(s.lr, t, 100) == pytest.approx(trades_lr(epoch)), (epoch, t)
    # the add-ons keep their (CIFAR-10) values on MNIST's base recipe
    awp = mnist("pgd-awp")
    assert awp.recipe.weight_perturbation.gamma == 0.01 and awp.schedule.optimizer == "adam"


def test_mnist_presets_train_on_raw_pixels_unless_the_model_says_otherwise():
    for name in ("fgsm-rs", "pgd-at", "trades", "gaussian-smoothing"):
        assert mnist(name).model.normalization == "none"
    # the user's model fields win one by one; the preset's normalization stays where unsaid
    spec = mnist("fgsm-rs", model={"arch": "mnist_net"})
    assert (spec.model.arch, spec.model.normalization) == ("mnist_net", "none")
    spec = mnist("fgsm-rs", model={"arch": "mnist_net", "normalization": "dataset"})
    assert spec.model.normalization == "dataset"
    from bulwark.contract.presets import preset_sources
    rows = {f: (v, src) for f, v, src in preset_sources(spec)}
    assert "your spec (the preset's: none)" in rows["model.normalization"][1]
    # a recipe without a preset keeps the spec's default
    plain = JobSpec.model_validate({"dataset": {"name": "mnist"},
                                    "recipe": {"adversary": {"kind": "fgsm"}}})
    assert plain.model.normalization == "dataset"


def test_a_run_dumped_before_normalization_existed_reads_as_normalized():
    """A report's spec is a full dump; one written before model.normalization existed ran
    behind the dataset's statistics (the only behaviour then) and must not read as raw pixels,
    the MNIST presets' value since: `same_spec` and `Report.job_spec` both complete it."""
    from bulwark.contract.report import Report
    from bulwark.contract.spec import as_ran, same_spec

    now = mnist("fgsm-rs", model={"arch": "mnist_net", "normalization": "dataset"})
    old = now.model_dump(mode="json")
    del old["model"]["normalization"]
    assert JobSpec.model_validate(old).model_dump()["model"]["normalization"] == "none"
    assert as_ran(old)["model"]["normalization"] == "dataset"
    assert same_spec(old, now.model_dump(mode="json"))
    raw = mnist("fgsm-rs", model={"arch": "mnist_net"}).model_dump(mode="json")
    assert not same_spec(old, raw), "the old run was not trained on raw pixels"
    committed = REPO / "experiments/mnist-co/runs/fgsm_seed=0/report.json"  # such a run
    report = Report.model_validate_json(committed.read_text())
    assert "normalization" not in report.spec["model"]
    assert report.job_spec.model.normalization == "dataset"
    # a user's spec file (not a dump: no depth) still takes the preset's value
    assert as_ran({"model": {"arch": "mnist_net"}}) == {"model": {"arch": "mnist_net"}}


def test_svhn_single_step_presets_follow_n_fgsm_svhn_settings():
    spec = JobSpec.model_validate({"dataset": {"name": "svhn"}, "recipe": "n-fgsm",
                                   "threat": {"epsilon": "8/255"}})
    assert (spec.schedule.lr.lr_max, spec.schedule.lr.peak) == (0.05, 0.4)
    assert spec.threat.epsilon_warmup == 5.0 and spec.schedule.epochs == 30


def test_family_values_yield_to_the_users_fields():
    spec = mnist("n-aaer", threat={"epsilon": 0.3, "epsilon_warmup": 0},
                 schedule={"epochs": 2, "lr": {"lr_max": 0.01}})
    assert spec.threat.epsilon_warmup == 0 and spec.schedule.epochs == 2
    assert (spec.schedule.optimizer, spec.schedule.lr.lr_max) == ("adam", 0.01)
    # a run shorter than the preset's warm-up ramps over the whole run, not an error
    short = JobSpec.model_validate({"dataset": {"name": "svhn"}, "recipe": "fgsm",
                                    "schedule": {"epochs": 2}})
    assert short.threat.epsilon_warmup == 2
    # datasets with no values of their own take CIFAR-10's
    for name in ("synthetic", "npz"):
        data = {"name": name, **({"path": "x.npz"} if name == "npz" else {})}
        spec = JobSpec.model_validate({"dataset": data, "recipe": "fgsm"})
        assert (spec.schedule.optimizer, spec.schedule.lr.lr_max) == ("sgd", 0.2)


def test_preset_sources_name_every_supplied_value_and_the_users_overrides():
    from bulwark.contract.presets import preset_sources

    rows = {f: (v, src) for f, v, src in preset_sources(mnist("fgsm-elle-a"))}
    assert "Wong et al. 2020" in rows["schedule"][1]
    assert "experiments/mnist-anchor" in rows["threat.epsilon_warmup"][1]
    assert rows["model.normalization"][0] == "none"
    assert "raw [0, 1] pixels" in rows["model.normalization"][1]
    # on MNIST: ELLE-A's λ_max and step count as the validation search chose them
    assert "lam_max=1300" in rows["recipe.regularizers.elle_a"][0]
    assert "5 seeds of 5" in rows["recipe.regularizers.elle_a"][1]
    assert "fragile" in rows["recipe.regularizers.elle_a"][1], "what the test set said too"
    assert "recipe.regularizers.elle_a.official_double_step" not in rows  # one step
    rows = {f: (v, src) for f, v, src in preset_sources(job("fgsm-elle-a"))}
    assert "twice" in rows["recipe.regularizers.elle_a.official_double_step"][1]  # CIFAR-10
    assert "lam_max=4000" in rows["recipe.regularizers.elle_a"][0]
    rows = {f: (v, src) for f, v, src in preset_sources(
        mnist({"preset": "fgsm-elle-a",
               "regularizers": [{"kind": "elle_a", "lam_max": 9e4}]}))}
    value, src = rows["recipe.regularizers.elle_a"]
    assert "lam_max=90000" in value and "your spec changed lam_max (the preset's: 1300)" in src
    assert preset_sources(JobSpec.model_validate({"recipe": {"adversary": {"kind": "fgsm"}}})) \
        == []


@pytest.mark.parametrize("name", sorted(FAST))
def test_fast_presets_schedule(name):
    s = job(name).schedule
    assert s.epochs == 30 and s.batch_size == 128
    assert (s.momentum, s.weight_decay) == (0.9, 5e-4)
    assert (s.lr.kind, s.lr.lr_max, s.lr.peak) == ("cyclic", 0.2, 0.5)


def test_l2_threat_uses_the_8_255_entries():
    spec = job("fgsm-gradalign", 0.5, norm="l2")
    assert reg(spec, "gradalign").lam == pytest.approx(0.2)
    assert reg(job("fgsm-elle", 2.0, norm="l2"), "elle").lam == 1000.0
    assert reg(job("n-aaer", 1.0, norm="l2"), "aaer").lam2 == 1.5


def test_preset_recorded_in_the_recipe():
    assert job("fgsm-elle").recipe.preset == "fgsm-elle"
    assert job({"preset": "trades"}).recipe.preset == "trades"


# ---------------------------------------------------------------------------------- overrides
def test_user_overrides_win_field_by_field():
    spec = JobSpec.model_validate({**CIFAR,
        "recipe": {"preset": "fgsm-elle", "regularizers": [{"kind": "elle", "lam": 123}]},
        "schedule": {"epochs": 2},
    })
    assert reg(spec, "elle").lam == 123.0
    assert spec.schedule.epochs == 2
    assert (spec.schedule.lr.kind, spec.schedule.lr.lr_max) == ("cyclic", 0.2)
    assert spec.schedule.momentum == 0.9 and spec.schedule.batch_size == 128
    assert spec.recipe.adversary.kind == "fgsm"


def test_nested_override_keeps_the_rest_of_the_block():
    spec = cifar({"recipe": "pgd-at", "schedule": {"lr": {"lr_max": 0.05}}})
    assert spec.schedule.lr.kind == "piecewise" and spec.schedule.lr.lr_max == 0.05
    assert spec.schedule.lr.milestones == [0.5, 0.75] and spec.schedule.epochs == 200
    spec = JobSpec.model_validate({**CIFAR,
        "recipe": {"preset": "rs-aaer", "regularizers": [{"kind": "aaer", "lam3": 9.0}]},
        "threat": {"epsilon": "16/255"}})
    r = reg(spec, "aaer")
    assert (r.lam1, r.lam2, r.lam3) == (1.0, 7.0, 9.0)


def test_same_kind_adversary_override_merges_and_other_kind_replaces():
    spec = cifar({"recipe": {"preset": "n-fgsm",
                                              "adversary": {"kind": "n_fgsm", "k": 3.0}}})
    assert (spec.recipe.adversary.k, spec.recipe.adversary.alpha) == (3.0, 1.0)
    spec = cifar({"recipe": {"preset": "fgsm-rs", "adversary": {"alpha": 1.0}}})
    assert spec.recipe.adversary.model_dump() == {"kind": "fgsm_rs", "alpha": 1.0,
                                                  "clip_start": True, "clip_adv": True}
    # another kind replaces the whole adversary: N-FGSM's own defaults, not FGSM's fields
    spec = cifar({"recipe": {"preset": "fgsm-elle",
                                              "adversary": {"kind": "n_fgsm"}}})
    assert spec.recipe.adversary.model_dump() == {"kind": "n_fgsm", "k": 2.0, "alpha": 1.0,
                                                  "clip_start": True, "clip_adv": True}
    assert reg(spec, "elle").lam == 1000.0
    spec = cifar({"recipe": {"preset": "pgd-at", "adversary": {"kind": "fgsm"}}})
    assert spec.recipe.adversary.model_dump() == {"kind": "fgsm", "alpha": 1.0, "clip_adv": True}


def test_schedule_overrides_merge_field_by_field():
    spec = cifar({"recipe": "pgd-at", "schedule": {"lr": {"kind": "cosine"}}})
    # changing the lr kind keeps the preset's other lr fields (lr_max 0.1, not the default 0.2)
    assert spec.schedule.lr.kind == "cosine"
    assert spec.schedule.lr.lr_max == pytest.approx(0.1)
    assert spec.schedule.epochs == 200


# ---------------------------------------------------------------------------------- spec checks
def errors_of(data) -> str:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(data)
    return str(info.value) + "\n" + format_validation_error(info.value)


def test_unknown_field_is_rejected_by_name():
    assert "bogus_field" in errors_of({"bogus_field": 1})
    text = errors_of({"recipe": {"preset": "fgsm", "adversary": {"kind": "fgsm", "steps": 3}}})
    assert "steps" in text
    assert "not permitted" in text


@pytest.mark.parametrize("threat,range_text", [
    ({"epsilon": 2.0}, "(0, 1]"), ({"epsilon": 0}, "(0, 1]"), ({"epsilon": "-8/255"}, None),
    ({"epsilon": 65.0, "norm": "l2"}, "(0, 64]"),
])
def test_epsilon_out_of_range(threat, range_text):
    text = errors_of({"threat": threat})
    assert "epsilon" in text
    if range_text:
        assert "threat.epsilon" in text and range_text in text


def test_epsilon_fraction_is_accepted():
    assert JobSpec.model_validate({"threat": {"epsilon": "8/255"}}).threat.epsilon == 8 / 255
    assert JobSpec.model_validate({"threat": {"epsilon": " 16 / 255 "}}).threat.epsilon == \
        16 / 255
    assert JobSpec.model_validate({"threat": {"epsilon": 0.5, "norm": "l2"}}).threat.epsilon == 0.5


def test_unknown_preset_lists_valid_names():
    text = errors_of({"recipe": "fgsm-elle-b"})
    assert "fgsm-elle-b" in text
    for name in PRESETS:
        assert name in text


def test_inconsistent_recipes_are_rejected():
    assert "trades" in errors_of({"recipe": {"adversary": {"kind": "fgsm"},
                                             "loss": {"kind": "trades"}}})
    assert "aaer" in errors_of({"recipe": {"adversary": {"kind": "pgd"},
                                           "regularizers": [{"kind": "aaer"}]}})
    assert "aaer" in errors_of({"recipe": {"preset": "rs-aaer", "adversary": {"kind": "pgd"}}})
    assert "aaer" in errors_of({"recipe": {"adversary": {"kind": "none"},
                                           "regularizers": [{"kind": "aaer"}]}})
    text = errors_of({"recipe": {"adversary": {"kind": "fgsm"},
                                 "regularizers": [{"kind": "elle"}, {"kind": "elle_a"}]}})
    assert "elle" in text and "elle_a" in text
    assert "twice" in errors_of({"recipe": {"regularizers": [{"kind": "elle"},
                                                             {"kind": "elle", "lam": 2}]}})
    # the consistent versions pass
    JobSpec.model_validate({"recipe": {"adversary": {"kind": "pgd"}, "loss": {"kind": "trades"}}})
    JobSpec.model_validate({"recipe": {"adversary": {"kind": "n_fgsm"},
                                       "regularizers": [{"kind": "aaer"}]}})


def test_npz_dataset_needs_a_path():
    assert "dataset.path" in errors_of({"dataset": {"name": "npz"}})
    spec = JobSpec.model_validate({"dataset": {"name": "npz", "path": "/tmp/x.npz"}})
    assert spec.dataset.path == "/tmp/x.npz"


def test_spec_and_presets_import_without_torch():
    code = ("import sys; import bulwark.contract.spec, bulwark.contract.presets, "
            "bulwark.workers.engine.schedule; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------- schedules
def test_cyclic_schedule():
    s = LRSchedule(kind="cyclic", lr_max=0.2, peak=0.5)
    assert lr_at(s, 0, 30) == 0.0
    assert lr_at(s, 15, 30) == pytest.approx(0.2)
    assert lr_at(s, 30, 30) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(s, 7.5, 30) == pytest.approx(0.1)
    assert lr_at(s, 22.5, 30) == pytest.approx(0.1)
    assert lr_at(s, 3, 30) == pytest.approx(0.2 * 3 / 15)
    assert lr_at(s, 27, 30) == pytest.approx(0.2 * 3 / 15)
    # an off-centre peak: linear up to 30% of the run, then down
    s = LRSchedule(kind="cyclic", lr_max=1.0, peak=0.3)
    assert lr_at(s, 15, 100) == pytest.approx(0.5)
    assert lr_at(s, 30, 100) == pytest.approx(1.0)
    assert lr_at(s, 65, 100) == pytest.approx(0.5)
    assert lr_at(s, 90, 100) == pytest.approx(1.0 / 7)


def test_piecewise_schedule():
    s = LRSchedule(kind="piecewise", lr_max=0.1, milestones=[0.5, 0.75], gamma=0.1)
    assert lr_at(s, 0, 200) == pytest.approx(0.1)
    assert lr_at(s, 99.99, 200) == pytest.approx(0.1)
    assert lr_at(s, 100, 200) == pytest.approx(0.01)  # ×0.1 from epoch 100
    assert lr_at(s, 149.5, 200) == pytest.approx(0.01)
    assert lr_at(s, 150, 200) == pytest.approx(0.001)
    assert lr_at(s, 200, 200) == pytest.approx(0.001)


def test_cosine_and_constant_schedules():
    s = LRSchedule(kind="cosine", lr_max=0.4)
    assert lr_at(s, 0, 10) == pytest.approx(0.4)
    assert lr_at(s, 5, 10) == pytest.approx(0.2)
    assert lr_at(s, 10, 10) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(s, 2.5, 10) == pytest.approx(0.2 * (1 + math.cos(math.pi / 4)))
    c = LRSchedule(kind="constant", lr_max=0.03)
    assert {lr_at(c, t, 10) for t in (0, 3.3, 10)} == {0.03}


def test_schedule_clamps_t_outside_the_run():
    s = LRSchedule(kind="cyclic", lr_max=0.2, peak=0.5)
    assert lr_at(s, -1, 30) == 0.0
    assert lr_at(s, 31, 30) == pytest.approx(0.0, abs=1e-15)


def test_invalid_milestones_rejected():
    with pytest.raises(ValidationError, match="milestones"):
        LRSchedule(kind="piecewise", milestones=[0.75, 0.5])
    with pytest.raises(ValidationError, match="milestones"):
        LRSchedule(kind="piecewise", milestones=[1.5])


def test_mnist_n_fgsm_keeps_the_published_setting_and_says_what_held_on_mnist():
    from bulwark.contract.presets import preset_sources

    spec = mnist("n-fgsm")
    adv = spec.recipe.adversary
    assert (adv.kind, adv.k, adv.alpha) == ("n_fgsm", 2.0, 1.0)
    rows = {f: src for f, _, src in preset_sources(spec)}
    assert "k = 1 with α = 0.5ε held on 5 of 5" in rows["recipe.adversary"]
    cifar_rows = {f: src for f, _, src in preset_sources(job("n-fgsm"))}
    assert "MNIST" not in cifar_rows["recipe.adversary"]


def test_mnist_elle_lambda_follows_e_lin_growth_and_cifar_keeps_the_papers():
    """On MNIST, FGSM + ELLE's λ is the paper's 5000 at 16/255 carried by E_lin ∝ ε³ (to one
    significant digit); CIFAR-10 keeps run_elle_cifar10.sh's table."""
    for eps, lam in ((0.1, 1000.0), (0.2, 200.0), (0.3, 50.0), (0.4, 20.0)):
        spec = mnist("fgsm-elle", threat={"epsilon": eps})
        assert reg(spec, "elle").lam == lam and reg(spec, "elle").official_double_step
    for eps, lam in (("8/255", 1000.0), ("16/255", 5000.0), ("32/255", 10000.0)):
        assert reg(job("fgsm-elle", eps), "elle").lam == lam


def test_the_carried_elle_lambda_keeps_its_regularizer_at_the_papers_size():
    """The independent measurement (experiments/elle-scaling/results.json: E_lin of four
    networks at eleven ε): on each network but the overfit one, λ(0.3)·E_lin(0.3) stays within a
    factor of 2 of 5000·E_lin(16/255), the strength the paper tuned; the paper's 10 000 at
    0.3 is 160-220× it."""
    import json

    from bulwark.contract.presets import elle_lambda, elle_lambda_carried

    data = json.loads((REPO / "experiments/elle-scaling/results.json").read_text())
    eps = data["epsilons_255"]
    i16, i03 = eps.index(16), eps.index(76.5)
    healthy = [n for n in data["nets"] if "overfit" not in n]
    assert len(healthy) >= 3
    for name in healthy:
        e_lin = data["nets"][name]["e_lin"]
        ratio = elle_lambda_carried(76.5) * e_lin[i03] / (5000.0 * e_lin[i16])
        assert 0.5 <= ratio <= 2.0, (name, ratio)
        assert elle_lambda(76.5) * e_lin[i03] / (5000.0 * e_lin[i16]) > 50
