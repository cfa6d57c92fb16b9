"""The catastrophic-overfitting watchdog, ε warm-up, the Adam option, stopping at CO and the
divergence guard: scripted inputs with hand-computed expectations."""

from __future__ import annotations

import math

import pytest
import torch

from contract.spec import JobSpec
from workers.engine.monitor import COWatchdog
from workers.engine.runner import Diverged, run_job
from workers.engine.schedule import build_optimizer, epsilon_at


def m(clean, fgsm, pgd):
    return {"clean_acc": clean, "fgsm_acc": fgsm, "pgd_acc": pgd, "n": 100}


def test_watchdog_flags_a_collapse_after_robustness():
    w = COWatchdog(co_drop=0.5, co_gap=0.2)
    flags = [w.check(e, x) for e, x in enumerate(
        [m(0.6, 0.4, 0.30), m(0.8, 0.5, 0.40), m(0.9, 0.9, 0.05), m(0.95, 0.95, 0.0),
         m(0.9, 0.5, 0.41)], start=1)]
    assert flags == [False, False, True, True, False]
    assert [(e["type"], e["epoch"]) for e in w.events] == [
        ("catastrophic_overfitting", 3), ("co_recovered", 5)], "an event at the onset and the end"
    assert w.events[0]["best_pgd_acc"] == 0.40
    assert w.events[1]["onset_epoch"] == 3 and w.events[1]["pgd_acc"] == 0.41


def test_watchdog_tells_a_passing_episode_from_a_lasting_collapse():
    """FGSM-RS on MNIST at ε = 0.3 (experiments/mnist-recipe): flagged after epoch 1 (PGD 0.08
    against FGSM 0.73), then robust; plain FGSM: flagged at epoch 1 and never again clear."""
    passing = COWatchdog()
    flags = [passing.check(e, x) for e, x in enumerate(
        [m(0.945, 0.729, 0.083), m(0.977, 0.834, 0.579), m(0.981, 0.866, 0.726)], start=1)]
    assert flags == [True, False, False]
    assert [(e["type"], e["epoch"]) for e in passing.events] == [
        ("catastrophic_overfitting", 1), ("co_recovered", 2)]
    lasting = COWatchdog()
    flags = [lasting.check(e, x) for e, x in enumerate(
        [m(0.931, 0.562, 0.002), m(0.959, 0.815, 0.006), m(0.93, 0.96, 0.0)], start=1)]
    assert flags == [True, True, True]
    assert [e["type"] for e in lasting.events] == ["catastrophic_overfitting"]
    dead = COWatchdog()  # GradAlign at lr 5e-3: flagged, then a constant prediction
    for e, x in enumerate([m(0.9, 0.94, 0.0), m(0.95, 0.62, 0.07), m(0.10, 0.10, 0.10)], 1):
        dead.check(e, x)
    assert [e["type"] for e in dead.events] == ["catastrophic_overfitting", "accuracy_collapse"]
    again = COWatchdog()  # a second episode after a recovery is a second onset
    for e, x in enumerate([m(0.9, 0.6, 0.05), m(0.95, 0.7, 0.6), m(0.95, 0.95, 0.01)], start=1):
        again.check(e, x)
    assert [(e["type"], e["epoch"]) for e in again.events] == [
        ("catastrophic_overfitting", 1), ("co_recovered", 2), ("catastrophic_overfitting", 3)]


def test_watchdog_flags_a_model_that_was_never_robust():
    """MNIST ε = 0.3 with plain FGSM: PGD is 0 from the first epoch while FGSM climbs."""
    w = COWatchdog()
    assert w.check(1, m(0.9, 0.59, 0.004))
    assert w.events[0]["epoch"] == 1


def test_watchdog_quiet_at_chance_and_for_robust_models():
    w = COWatchdog()
    assert not w.check(1, m(0.11, 0.11, 0.11)), "chance level: no gap"
    assert not w.check(2, m(0.95, 0.70, 0.40)), "PGD above half of FGSM"
    assert not w.check(3, m(0.95, 0.70, 0.36)), "0.36 > 0.5 * max(0.40, 0.70) = 0.35"
    assert w.check(4, m(0.95, 0.70, 0.34)), "0.34 < 0.35 and the gap is 0.36"
    w2 = COWatchdog()
    assert not w2.check(1, m(0.5, 0.25, 0.12)), "gap 0.13 < 0.2"


def test_watchdog_records_a_collapse_to_a_constant_predictor():
    """N-FGSM + AAER on MNIST, ε = 0.3, seed 0 (experiments/quickstart): clean 0.92, 0.94,
    then 0.12 for every attack alike; the CO rule sees no gap, the collapse rule sees it."""
    w = COWatchdog()
    flags = [w.check(e, x) for e, x in enumerate(
        [m(0.92, 0.60, 0.49), m(0.94, 0.70, 0.58), m(0.12, 0.125, 0.125),
         m(0.12, 0.125, 0.125), m(0.95, 0.7, 0.6)], start=1)]
    assert flags == [False] * 5, "not catastrophic overfitting"
    assert [(e["type"], e["epoch"]) for e in w.events] == [("accuracy_collapse", 3)]
    assert w.events[0]["best_clean_acc"] == 0.94


def test_a_fall_from_fgsm_accuracy_to_a_constant_prediction_is_no_recovery():
    """GradAlign on MNIST, ε = 0.3, seed 1 (experiments/mnist/runs): after epoch 1 the model
    classifies FGSM's images (0.978) and not the clean ones (0.113); from epoch 2 it predicts
    one class (0.122 under every attack). The CO rule no longer holds, but that is a collapse
    from 0.978, not a recovery (the run's report said co_recovered before this rule)."""
    w = COWatchdog()
    flags = [w.check(e, x) for e, x in enumerate(
        [m(0.113, 0.978, 0.0), m(0.122, 0.122, 0.122), m(0.122, 0.122, 0.122)], start=1)]
    assert flags == [True, False, False]
    assert [(e["type"], e["epoch"]) for e in w.events] == [
        ("catastrophic_overfitting", 1), ("accuracy_collapse", 2)]
    assert w.events[1]["best_fgsm_acc"] == 0.978 and w.events[1]["best_clean_acc"] == 0.113
    clean_ok = COWatchdog()  # FGSM above clean without a fall is no collapse
    for e, x in enumerate([m(0.90, 0.95, 0.0), m(0.93, 0.80, 0.60)], start=1):
        clean_ok.check(e, x)
    assert [e["type"] for e in clean_ok.events] == ["catastrophic_overfitting", "co_recovered"]


def test_fgsm_accuracy_falling_to_pgd_is_no_recovery_and_co_hides_no_collapse():
    """Plain FGSM on MNIST at ε = 0.4, seed 0 (experiments/mnist/runs): PGD is 0.000 at every
    epoch; FGSM accuracy goes 0.396, 0.176 (the gap closes from above: no robustness came
    back), then climbs to 0.98 while clean accuracy sags to 0.39 — the label leaking of CO,
    not a collapse the CO rule cannot see. The watchdog of the time reported a recovery at
    epoch 2, a second onset at 3 and an accuracy_collapse at 8."""
    seq = [(0.89, 0.396), (0.825, 0.176), (0.791, 0.7), (0.612, 0.892), (0.454, 0.816),
           (0.446, 0.984), (0.553, 0.969), (0.472, 0.976), (0.486, 0.973), (0.386, 0.987)]
    w = COWatchdog()
    flags = [w.check(e, m(clean, fgsm, 0.0)) for e, (clean, fgsm) in enumerate(seq, start=1)]
    assert flags == [True, False] + [True] * 8, "the rule itself: the gap was 0.176 at epoch 2"
    assert [(e["type"], e["epoch"]) for e in w.events] == [("catastrophic_overfitting", 1)]
    assert w.flagged, "the episode is still open at the end"
    back = COWatchdog()  # the same start, then PGD comes back: that is the recovery
    for e, x in enumerate([m(0.89, 0.396, 0.0), m(0.825, 0.176, 0.0), m(0.9, 0.6, 0.35)], 1):
        back.check(e, x)
    assert [(e["type"], e["epoch"]) for e in back.events] == [
        ("catastrophic_overfitting", 1), ("co_recovered", 3)]
    assert back.events[1]["onset_epoch"] == 1


def test_pgd_and_fgsm_falling_together_to_chance_is_no_recovery():
    """RS-AAER on MNIST at ε = 0.4, seed 0 (experiments/mnist/runs): flagged after epoch 1
    (PGD 0.000, FGSM 0.58), then PGD 0.10 / FGSM 0.68, then both 0.11 at clean 0.56: the CO
    rule no longer holds (no gap), but PGD rose by 0.11 alone: no robustness came back. The
    watchdog of the time called epoch 3 a recovery and epoch 4 a second onset."""
    seq = [(0.94, 0.58, 0.0), (0.96, 0.68, 0.10), (0.56, 0.11, 0.11), (0.60, 0.22, 0.01),
           (0.60, 0.21, 0.03), (0.64, 0.28, 0.02), (0.63, 0.49, 0.01), (0.69, 0.55, 0.0)]
    w = COWatchdog()
    for e, x in enumerate(seq, start=1):
        w.check(e, m(*x))
    assert [(e["type"], e["epoch"]) for e in w.events] == [("catastrophic_overfitting", 1)]
    assert w.flagged
    w2 = COWatchdog()  # the onset's PGD figure survives a resume
    w2.check(1, m(*seq[0]))
    w3 = COWatchdog()
    w3.load_state_dict(w2.state_dict())
    for e, x in enumerate(seq[1:3], start=2):
        w3.check(e, m(*x))
    assert [e["type"] for e in w3.events] == ["catastrophic_overfitting"]
    w3.check(4, m(0.9, 0.7, 0.35))  # 0.35 ≥ 0.5 · max(0.11, 0.7) and ≥ 0.000 + 0.2: back
    assert [e["type"] for e in w3.events] == ["catastrophic_overfitting", "co_recovered"]
    assert w3.onset_pgd is None


def test_watchdog_state_round_trip():
    w = COWatchdog()
    w.check(1, m(0.8, 0.5, 0.4))
    w.check(2, m(0.9, 0.9, 0.0))
    w2 = COWatchdog()
    w2.load_state_dict(w.state_dict())
    assert w2.check(3, m(0.9, 0.9, 0.0)) and len(w2.events) == 1, "still flagged: no new event"
    leak = COWatchdog()  # the best FGSM figure survives a resume
    leak.check(1, m(0.1, 0.9, 0.0))
    leak2 = COWatchdog()
    leak2.load_state_dict(leak.state_dict())
    leak2.check(2, m(0.12, 0.12, 0.12))
    assert [e["type"] for e in leak2.events] == ["catastrophic_overfitting", "accuracy_collapse"]


def test_epsilon_warmup_is_a_linear_ramp():
    assert epsilon_at(0.3, 0, 0.0) == 0.3
    assert epsilon_at(0.3, 2, 0.0) == 0.0
    assert math.isclose(epsilon_at(0.3, 2, 0.5), 0.075)
    assert math.isclose(epsilon_at(0.3, 2, 1.5), 0.225)
    assert epsilon_at(0.3, 2, 2.0) == 0.3 and epsilon_at(0.3, 2, 7.0) == 0.3


def test_adam_is_built_with_the_spec_weight_decay():
    spec = JobSpec.model_validate({"schedule": {"optimizer": "adam", "weight_decay": 1e-4}})
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], spec.schedule)
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["weight_decay"] == 1e-4
    sgd = build_optimizer([torch.nn.Parameter(torch.zeros(2))], JobSpec().schedule)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    with pytest.raises(ValueError, match="nesterov"):
        JobSpec.model_validate({"schedule": {"optimizer": "adam", "nesterov": True}})
    with pytest.raises(ValueError, match="epsilon_warmup"):
        JobSpec.model_validate({"schedule": {"epochs": 2}, "threat": {"epsilon_warmup": 3}})


def _digits(**over):
    spec = {"dataset": {"name": "digits", "val_size": 256}, "threat": {"epsilon": 0.3},
            "recipe": "fgsm",
            "schedule": {"epochs": 3, "batch_size": 64, "optimizer": "adam",
                         "weight_decay": 0, "lr": {"kind": "cyclic", "lr_max": 0.01}},
            "evaluation": {"monitor": {"size": 128, "pgd_steps": 5},
                           "final": {"n": 64, "pgd": {"steps": 5, "restarts": 1},
                                     "autoattack": None}}}
    for k, v in over.items():
        old = spec.get(k)
        spec[k] = {**old, **v} if isinstance(v, dict) and isinstance(old, dict) else v
    return JobSpec.model_validate(spec)


def test_training_epsilon_follows_the_warmup(tmp_path):
    spec = _digits(threat={"epsilon": 0.2, "epsilon_warmup": 2})
    r = run_job(spec, tmp_path, progress=False)
    steps = math.ceil(r["dataset"]["train"] / 64)
    eps = [h["train_epsilon"] for h in r["history"]]
    # the value at each epoch's last step t = e + (steps - 1) / steps
    assert eps[0] == pytest.approx(0.2 * ((steps - 1) / steps) / 2)
    assert eps[1] == pytest.approx(0.2 * min((1 + (steps - 1) / steps) / 2, 1))
    assert eps[2] == pytest.approx(0.2)


def test_train_epsilon_moves_training_not_the_evaluation(tmp_path):
    """threat.train_epsilon: the ramp leads to it and the adversary trains at it, while the
    monitor and the final attacks stay at ε (their recorded params say which)."""
    spec = _digits(threat={"epsilon": 0.2, "train_epsilon": "0.25", "epsilon_warmup": 1},
                   schedule={"epochs": 2})
    assert spec.threat.training_epsilon == 0.25 and spec.threat.epsilon == 0.2
    r = run_job(spec, tmp_path, progress=False)
    steps = math.ceil(r["dataset"]["train"] / 64)
    eps = [h["train_epsilon"] for h in r["history"]]
    assert eps[0] == pytest.approx(0.25 * (steps - 1) / steps) and eps[1] == pytest.approx(0.25)
    final = r["final"]["attacks"]
    assert {a["params"]["eps"] for a in final.values()} == {0.2}
    assert JobSpec.model_validate({"threat": {"epsilon": 0.3}}).threat.training_epsilon == 0.3
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"threat.train_epsilon must be in \(0, 1\]"):
            JobSpec.model_validate({"threat": {"epsilon": 0.3, "train_epsilon": bad}})


def test_the_watchdog_judges_no_epoch_of_a_longer_warm_up():
    """With ε ramped over 3 epochs the monitor's figures at full ε after epochs 1 and 2 are
    the warm-up's, not an overfit (mnist-recipe round 7: FGSM-RS flagged after epoch 2 at
    training ε 0.2, monitor ε 0.3): recorded, not judged. What the runner calls (judge)."""
    from workers.engine.runner import judge
    from workers.engine.schedule import warmed_up

    assert warmed_up(1, 1) and warmed_up(1, 0) and not warmed_up(1, 2) and warmed_up(2, 2)
    assert not warmed_up(2, 2.5) and warmed_up(3, 2.5)
    w = COWatchdog()
    flags = [judge(w, e, m(0.9, 0.7, 0.0), 3) for e in (1, 2, 3)]
    assert flags == [False, False, True]
    assert [(e["type"], e["epoch"]) for e in w.events] == [("catastrophic_overfitting", 3)]
    plain = COWatchdog()
    assert judge(plain, 1, m(0.9, 0.7, 0.0), 1), "warm-up 1 (the presets'): epoch 1 judged"
    assert not judge(plain, 2, None, 1), "no monitor, no verdict"


def test_stop_on_co_goes_straight_to_the_final_evaluation(tmp_path):
    # An lr so large that the monitor is fooled early: force the rule with co_gap tiny and
    # co_drop close to 1, so the first epoch whose PGD is below its FGSM stops the run.
    spec = _digits(schedule={"epochs": 6},
                   evaluation={"monitor": {"size": 128, "pgd_steps": 5, "co_drop": 0.99,
                                           "co_gap": 0.01, "stop_on_co": True}})
    events = []
    r = run_job(spec, tmp_path, progress=False, on_event=lambda k, d: events.append(k))
    stopped = r["stopped_early"]
    assert stopped is not None and stopped["reason"] == "catastrophic_overfitting"
    assert len(r["history"]) == stopped["epoch"] < 6
    assert r["history"][-1]["catastrophic_overfitting"]
    assert "stopped_early" in events and events.index("stopped_early") < events.index("finished")
    assert r["final"]["n"] == 64, "the final suite still runs"
    # resuming the stopped run does not train further
    r2 = run_job(spec, tmp_path, progress=False, resume=True)
    assert len(r2["history"]) == len(r["history"])


def _diverging(**monitor):
    """Real digits, a real run: SGD at lr 10 with ELLE's λ at 1e6 goes non-finite within its
    first epoch."""
    return _digits(schedule={"epochs": 2, "optimizer": "sgd",
                             "lr": {"kind": "constant", "lr_max": 10.0}},
                   recipe={"preset": "fgsm-elle", "regularizers": [{"kind": "elle",
                                                                    "lam": 1e6}]},
                   evaluation={"monitor": {"size": 128, "pgd_steps": 5, **monitor},
                               "final": {"n": 64, "pgd": {"steps": 5, "restarts": 1},
                                         "autoattack": None}})


def test_a_diverging_run_names_the_step_and_term_and_fails_with_advice(tmp_path):
    events = []
    with pytest.raises(Diverged, match=r"diverged in epoch 1, step \d+: .*non-finite.*lr_max"):
        run_job(_diverging(), tmp_path, progress=False,
                on_event=lambda k, d: events.append((k, d)))
    (info,) = [d for k, d in events if k == "diverged"]
    assert info["epoch"] == 1 and info["step"] >= 1 and info["skipped_steps"] == 1
    assert info["terms"] and set(info["terms"]) <= {"loss", "gradient", "elle_e_lin",
                                                     "elle_lambda"}
    assert "finished" not in [k for k, _ in events]


def test_remediate_rolls_a_diverged_run_back_and_fails_once_no_remedy_is_left(tmp_path):
    events = []
    with pytest.raises(Diverged):
        run_job(_diverging(on_catastrophic_overfitting="remediate",
                           remedies=["n_fgsm_noise", "halve_step"]),
                tmp_path, progress=False, on_event=lambda k, d: events.append((k, d)))
    kinds = [k for k, _ in events if k in ("diverged", "remediated")]
    # lr 10 diverges whatever the attack: each remedy is tried once, then the run fails
    assert kinds == ["diverged", "remediated", "diverged", "remediated", "diverged"]
    remedies = [d["remedy"] for k, d in events if k == "remediated"]
    assert remedies == ["n_fgsm_noise", "halve_step"]
    assert all(d["rolled_back_to"] == 0 for k, d in events if k == "remediated")


def test_a_non_finite_step_is_skipped_leaving_weights_and_optimizer_untouched():
    from defenses import Recipe
    from workers.engine.runner import NonFiniteStep, train_step

    spec = _digits()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    opt = build_optimizer(model.parameters(), spec.schedule)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    recipe = Recipe(spec.recipe, eps=0.3, norm="linf")
    recipe.bind(model, total_steps=10)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    train_step(model, opt, scaler, recipe, x, y, lr=0.01, precision="fp32",
               channels_last=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [t.clone() for st in opt.state.values() for t in st.values() if t.dim()]
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteStep) as info:
        train_step(model, opt, scaler, recipe, bad, y, lr=0.01, precision="fp32",
                   channels_last=False)
    assert "loss" in info.value.terms
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a skipped step"
    after = [t for st in opt.state.values() for t in st.values() if t.dim()]
    assert all(torch.equal(a, b) for a, b in zip(after, moments, strict=True))
    train_step(model, opt, scaler, recipe, x, y, lr=0.01, precision="fp32",
               channels_last=False)  # and training goes on from there
    assert all(torch.isfinite(p).all() for p in model.parameters())
