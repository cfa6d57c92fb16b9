"""The catastrophic-overfitting watchdog, ε warm-up, the Adam option, stopping at CO and the
divergence guard: scripted inputs with hand-computed expectations."""

from __future__ import annotations

import math

import pytest
import torch

from bulwark.contract.spec import JobSpec
from bulwark.workers.engine.monitor import COWatchdog
from bulwark.workers.engine.runner import Diverged, run_job
from bulwark.workers.engine.schedule import build_optimizer, epsilon_at


def m(clean, fgsm, pgd):
    return {"clean_acc": clean, "fgsm_acc": fgsm, "pgd_acc": pgd, "n": 100}


def kinds(w: COWatchdog) -> list[tuple[str, int]]:
    return [(e["type"], e["epoch"]) for e in w.events]


def test_a_gap_is_recorded_and_the_alarm_waits_for_it_to_persist():
    """A collapse after robustness: the gap opens at epoch 3 (recorded), persists at 4 with PGD
    not rising while FGSM ≈ clean: the alarm at 4, its recovery at 6."""
    w = COWatchdog(co_drop=0.5, co_gap=0.2)
    flags = [w.check(e, x) for e, x in enumerate(
        [m(0.6, 0.4, 0.30), m(0.8, 0.5, 0.40), m(0.9, 0.9, 0.05), m(0.95, 0.95, 0.0),
         m(0.95, 0.95, 0.0), m(0.9, 0.5, 0.41)], start=1)]
    assert flags == [False, False, False, True, True, False]
    assert kinds(w) == [("fgsm_pgd_gap", 3), ("catastrophic_overfitting", 4),
                        ("co_recovered", 6)]
    alarm = w.events[1]
    assert alarm["gap_since_epoch"] == 3 and alarm["pgd_acc_then"] == 0.05
    assert alarm["pattern"] == "fell_after_rising" and alarm["best_pgd_acc"] == 0.40
    assert w.events[2]["onset_epoch"] == 4 and w.events[2]["pgd_acc"] == 0.41


def test_a_passing_gap_raises_no_alarm_and_a_lasting_one_does_in_epoch_two():
    """The quick start's pair on MNIST at ε = 0.3 (experiments/quickstart/runs-mnist-net):
    FGSM-RS shows the gap after epoch 1 (PGD 0.064 against FGSM 0.694) and closes it in
    epoch 2 (0.506): recorded, no alarm. Plain FGSM keeps it (PGD 0.001): the alarm at 2."""
    passing = COWatchdog()
    flags = [passing.check(e, x) for e, x in enumerate(
        [m(0.942, 0.694, 0.064), m(0.979, 0.822, 0.506), m(0.981, 0.866, 0.726)], start=1)]
    assert flags == [False, False, False]
    assert kinds(passing) == [("fgsm_pgd_gap", 1), ("fgsm_pgd_gap_closed", 2)]
    lasting = COWatchdog()
    flags = [lasting.check(e, x) for e, x in enumerate(
        [m(0.936, 0.611, 0.002), m(0.959, 0.688, 0.001), m(0.93, 0.96, 0.0)], start=1)]
    assert flags == [False, True, True]
    assert kinds(lasting) == [("fgsm_pgd_gap", 1), ("catastrophic_overfitting", 2)]
    assert lasting.events[1]["pattern"] == "never_robust"
    slow = COWatchdog()  # PGD rising by ≥ co_rise over the patience: not robust *yet*
    flags = [slow.check(e, x) for e, x in enumerate(
        [m(0.90, 0.70, 0.03), m(0.95, 0.85, 0.29), m(0.97, 0.90, 0.30)], start=1)]
    assert flags == [False, False, True], "0.29 rose 0.26; then 0.30 < 0.29 + 0.1"
    again = COWatchdog()  # a second episode after a recovery is a second onset
    for e, x in enumerate([m(0.9, 0.9, 0.05), m(0.95, 0.9, 0.05), m(0.95, 0.9, 0.6),
                           m(0.95, 0.95, 0.01), m(0.95, 0.95, 0.01)], start=1):
        again.check(e, x)
    assert kinds(again) == [("fgsm_pgd_gap", 1), ("catastrophic_overfitting", 2),
                            ("co_recovered", 3), ("fgsm_pgd_gap", 4),
                            ("catastrophic_overfitting", 5)]


def test_a_persisting_gap_while_the_training_attack_works_is_under_training():
    """ELLE on MNIST at ε = 0.3 (experiments/mnist/runs, seed 1): FGSM 0.5-0.7 of clean
    0.8-0.9 in every epoch, PGD rising slowly: the single-step attack still fools the model,
    so a persisting gap is under-training, recorded once, never the alarm."""
    w = COWatchdog()
    seq = [(0.80, 0.49, 0.20), (0.80, 0.52, 0.22), (0.82, 0.55, 0.21), (0.86, 0.60, 0.25)]
    flags = [w.check(e, m(*x)) for e, x in enumerate(seq, start=1)]
    assert flags == [False] * 4
    assert kinds(w) == [("fgsm_pgd_gap", 1), ("under_training", 2)]
    assert "training attack still works" in w.events[1]["rule"]
    passing = COWatchdog()  # on its way into CO a model passes through that state briefly
    for t, fgsm in ((1.0, 0.36), (1.25, 0.64), (1.5, 0.76), (1.75, 0.81)):
        passing.check(t, m(0.95, fgsm, 0.02))
    assert [k for k, _ in kinds(passing)] == ["fgsm_pgd_gap", "catastrophic_overfitting"], \
        "half an epoch of it is not under-training"


def test_probes_within_an_epoch_time_the_alarm_in_epochs():
    """Checks at fractional times: the patience is in epochs, not checks. An onset at 1.25
    alarms half an epoch later, at 1.75; its event names the epoch (2) and the time."""
    w = COWatchdog()
    assert w.co_patience == 0.5
    assert not w.check(1.25, m(0.95, 0.9, 0.02)) and kinds(w) == [("fgsm_pgd_gap", 2)]
    assert not w.check(1.5, m(0.95, 0.9, 0.02)), "a quarter of an epoch: not yet"
    assert w.check(1.75, m(0.95, 0.9, 0.02))
    alarm = w.events[-1]
    assert (alarm["type"], alarm["epoch"], alarm["at_epoch"]) == (
        "catastrophic_overfitting", 2, 1.75)
    assert w.events[0]["at_epoch"] == 1.25
    at_end = COWatchdog()
    at_end.check(1, m(0.95, 0.9, 0.02))
    assert "at_epoch" not in at_end.events[0], "an epoch's end is named by its epoch alone"
    rising = COWatchdog()  # PGD rising over the last half epoch: not yet
    for t, pgd in ((1.0, 0.02), (1.25, 0.08), (1.5, 0.15), (1.75, 0.2)):
        rising.check(t, m(0.95, 0.9, pgd))
    assert kinds(rising) == [("fgsm_pgd_gap", 1)], "0.15 ≥ 0.02 + 0.1; 0.2 ≥ 0.08 + 0.1"
    assert rising.check(2.0, m(0.95, 0.9, 0.2)), "0.2 < 0.15 + 0.1: no longer rising"


def test_an_event_as_a_stream_delivers_it_reads_as_a_line():
    """Over server-sent events each event's data carries the server's timestamp as ``at``
    (service/app.py): the watchdog's own time within the epoch is ``at_epoch``, and the CLI
    and the quick start read either without a clash."""
    from bulwark.contract.report import Event

    w = COWatchdog()
    for t in (1.25, 1.5, 1.75):
        w.check(t, m(0.95, 0.9, 0.02))
    sse = {**w.events[-1], "at": "2026-12-06T05:08:27.985+00:00"}
    line = Event.model_validate({**sse, "type": sse["type"]}).line()
    assert line.startswith("!! catastrophic overfitting at epoch 2 (at 1.75): PGD 0.020")
    gap = Event.model_validate({**w.events[0], "at": "2026-12-06T05:08:20+00:00"}).line()
    assert "FGSM-PGD gap at epoch 2 (at 1.25)" in gap and "!!" not in gap


def test_the_previous_rule_is_the_watchdog_without_patience():
    """co_patience 0, co_rise ∞, co_resist 0 alarm at the first check where the gap holds:
    the rule before experiments/watchdog measured it (it flagged FGSM-RS's first epoch)."""
    w = COWatchdog(co_patience=0.0, co_rise=math.inf, co_resist=0.0, co_deep=0.0)
    assert w.check(1, m(0.942, 0.694, 0.064))
    assert kinds(w) == [("fgsm_pgd_gap", 1), ("catastrophic_overfitting", 1)]


def test_watchdog_quiet_at_chance_and_for_robust_models():
    w = COWatchdog()
    assert not w.check(1, m(0.11, 0.11, 0.11)) and not w.events, "chance level: no gap"
    assert not w.check(2, m(0.95, 0.70, 0.40)), "PGD above half of FGSM"
    assert not w.check(3, m(0.95, 0.70, 0.36)) and not w.events, "0.36 > 0.5 x 0.70 = 0.35"
    w.check(4, m(0.95, 0.70, 0.34))
    assert kinds(w) == [("fgsm_pgd_gap", 4)], "0.34 < 0.35 and the gap is 0.36: recorded"
    w2 = COWatchdog()
    assert not w2.check(1, m(0.5, 0.25, 0.12)) and not w2.events, "gap 0.13 < 0.2"


def test_watchdog_records_a_collapse_to_a_constant_predictor():
    """N-FGSM + AAER on MNIST, ε = 0.3, seed 0 (experiments/quickstart): clean 0.92, 0.94,
    then 0.12 for every attack alike; no gap, the collapse rule sees it."""
    w = COWatchdog()
    flags = [w.check(e, x) for e, x in enumerate(
        [m(0.92, 0.60, 0.49), m(0.94, 0.70, 0.58), m(0.12, 0.125, 0.125),
         m(0.12, 0.125, 0.125), m(0.95, 0.7, 0.6)], start=1)]
    assert flags == [False] * 5, "not catastrophic overfitting"
    assert kinds(w) == [("accuracy_collapse", 3)]
    assert w.events[0]["best_clean_acc"] == 0.94


def test_a_fall_from_fgsm_accuracy_to_a_constant_prediction_is_no_recovery():
    """GradAlign on MNIST, ε = 0.3, seed 1 (experiments/mnist/runs): after epoch 1 the model
    classifies FGSM's images (0.978) and not the clean ones (0.113); from epoch 2 it predicts
    one class (0.122 under every attack): a collapse from 0.978, not a closing gap."""
    w = COWatchdog()
    flags = [w.check(e, x) for e, x in enumerate(
        [m(0.113, 0.978, 0.0), m(0.122, 0.122, 0.122), m(0.122, 0.122, 0.122)], start=1)]
    assert flags == [False, False, False]
    assert kinds(w) == [("fgsm_pgd_gap", 1), ("accuracy_collapse", 2),
                        ("fgsm_pgd_gap_closed", 2)]
    assert w.events[1]["best_fgsm_acc"] == 0.978 and w.events[1]["best_clean_acc"] == 0.113
    leak = COWatchdog()  # FGSM above clean, persisting: the alarm, with that pattern
    for e, x in enumerate([m(0.45, 0.87, 0.0), m(0.50, 0.90, 0.0)], start=1):
        leak.check(e, x)
    assert leak.events[-1]["pattern"] == "fgsm_above_clean"


def test_fgsm_accuracy_falling_to_pgd_is_no_recovery():
    """Plain FGSM on MNIST at ε = 0.4, seed 0 (experiments/mnist/runs): PGD is 0.000 at every
    epoch; FGSM accuracy 0.396, 0.176 (the gap closes from above), then climbs to 0.98 while
    clean accuracy sags: once the alarm is up, only PGD coming back ends it."""
    seq = [(0.89, 0.8), (0.90, 0.85), (0.825, 0.176), (0.791, 0.7), (0.612, 0.892),
           (0.454, 0.816), (0.446, 0.984)]
    w = COWatchdog()
    flags = [w.check(e, m(clean, fgsm, 0.0)) for e, (clean, fgsm) in enumerate(seq, start=1)]
    assert flags == [False] + [True] * 6, "the alarm at 2 stays open through the dip at 3"
    assert kinds(w) == [("fgsm_pgd_gap", 1), ("catastrophic_overfitting", 2)]
    back = COWatchdog()  # the same start, then PGD comes back: that is the recovery
    for e, x in enumerate([m(0.89, 0.8, 0.0), m(0.90, 0.85, 0.0), m(0.825, 0.176, 0.0),
                           m(0.9, 0.6, 0.35)], start=1):
        back.check(e, x)
    assert kinds(back) == [("fgsm_pgd_gap", 1), ("catastrophic_overfitting", 2),
                           ("co_recovered", 4)]
    assert back.events[2]["onset_epoch"] == 2


def test_watchdog_state_round_trip():
    """The open gap, its checks and the alarm survive a resume."""
    w = COWatchdog()
    w.check(1, m(0.8, 0.5, 0.4))
    w.check(2, m(0.9, 0.9, 0.0))
    w2 = COWatchdog()
    w2.load_state_dict(w.state_dict())
    assert w2.check(3, m(0.9, 0.9, 0.0)), "the gap since epoch 2 persists: the alarm"
    assert kinds(w2) == [("fgsm_pgd_gap", 2), ("catastrophic_overfitting", 3)]
    w3 = COWatchdog()
    w3.load_state_dict(w2.state_dict())
    assert w3.check(4, m(0.9, 0.9, 0.0)) and len(w3.events) == 2, "still open: no new event"
    leak = COWatchdog()  # the best FGSM figure survives a resume
    leak.check(1, m(0.1, 0.9, 0.0))
    leak2 = COWatchdog()
    leak2.load_state_dict(leak.state_dict())
    leak2.check(2, m(0.12, 0.12, 0.12))
    assert [e["type"] for e in leak2.events] == ["fgsm_pgd_gap", "accuracy_collapse",
                                                 "fgsm_pgd_gap_closed"]


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
    from bulwark.workers.engine.runner import judge
    from bulwark.workers.engine.schedule import warmed_up

    assert warmed_up(1, 1) and warmed_up(1, 0) and not warmed_up(1, 2) and warmed_up(2, 2)
    assert not warmed_up(2, 2.5) and warmed_up(3, 2.5)
    w = COWatchdog()
    flags = [judge(w, e, m(0.9, 0.7, 0.0), 3) for e in (1, 2, 3, 4)]
    assert flags == [False, False, False, True], "the gap is first seen at 3, persists at 4"
    assert kinds(w) == [("fgsm_pgd_gap", 3), ("catastrophic_overfitting", 4)]
    plain = COWatchdog()
    assert not judge(plain, 1, m(0.9, 0.7, 0.0), 1) and plain.events, "warm-up 1: judged"
    assert not judge(plain, 1.5, None, 1), "no monitor, no verdict"
    assert judge(plain, 2, m(0.9, 0.7, 0.0), 1)
    assert judge(plain, 2.5, None, 1), "no figures: the alarm's state stands"
    probe = COWatchdog()  # a probe during the warm-up is not judged either
    assert not judge(probe, 2.5, m(0.9, 0.7, 0.0), 3) and not probe.events


def test_stop_on_co_goes_straight_to_the_final_evaluation(tmp_path):
    # An lr so large that the monitor is fooled early: force the rule with co_gap tiny and
    # co_drop close to 1, no patience: the first epoch whose PGD is below its FGSM stops it.
    spec = _digits(schedule={"epochs": 6},
                   evaluation={"monitor": {"size": 128, "pgd_steps": 5, "co_drop": 0.99,
                                           "co_gap": 0.01, "co_patience": 0, "co_resist": 0,
                                           "stop_on_co": True}})
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
    from bulwark.defenses import Recipe
    from bulwark.workers.engine.runner import NonFiniteStep, train_step

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


def test_probes_per_epoch_stay_within_a_tenth_of_the_training_work():
    from bulwark.contract.spec import MonitorSpec
    from bulwark.workers.engine.runner import PROBE_BUDGET, probe_steps, probes_per_epoch

    auto = MonitorSpec()
    assert probes_per_epoch(auto, "fgsm_rs", 59_000, 256) == 3, "MNIST: 3 probes fit"
    cost = 3 * 256 * (auto.probe_pgd_steps + 2) / (2 * 59_000)
    assert cost <= PROBE_BUDGET and cost == pytest.approx(0.046, abs=0.001)
    assert probes_per_epoch(auto, "fgsm_rs", 10_000, 256) == 1, "0.1 x 20 000 / 1792 = 1.1"
    assert probes_per_epoch(auto, "fgsm_rs", 2_000, 256) == 0, "0.1 x 4 000 / 1792 < 1"
    assert probes_per_epoch(auto, "fgsm", 384, 64) == 0, "a tiny run: no probe fits"
    assert probes_per_epoch(auto, "pgd", 59_000, 256) == 0, "multi-step: no CO to watch"
    assert probes_per_epoch(MonitorSpec(probes=2), "pgd", 384, 64) == 2, "as asked"
    assert probe_steps(3, 590) == {148, 295, 442}
    assert probe_steps(3, 2) == {1} and probe_steps(0, 100) == set()


def test_probes_are_judged_within_the_epoch_and_leave_training_unchanged(tmp_path):
    """Two probes an epoch: each history row lists them (at 1/3 and 2/3 of the epoch), the
    watchdog judges them like an epoch's end, and training is the run without probes to the
    bit (the probes draw from a forked generator)."""
    over = {"evaluation": {"monitor": {"size": 128, "pgd_steps": 5, "probes": 2,
                                       "probe_size": 64, "probe_pgd_steps": 3}}}
    with_probes = run_job(_digits(schedule={"epochs": 2}, **over), tmp_path / "p",
                          progress=False)
    over["evaluation"]["monitor"]["probes"] = 0
    without = run_job(_digits(schedule={"epochs": 2}, **over), tmp_path / "n", progress=False)
    for a, b in zip(with_probes["history"], without["history"], strict=True):
        assert a["train_loss"] == b["train_loss"] and a["monitor"] == b["monitor"]
        assert len(a["probes"]) == 2 and "probes" not in b
        steps = math.ceil(with_probes["dataset"]["train"] / 64)
        assert [p["at_epoch"] for p in a["probes"]] == [
            round(a["epoch"] - 1 + round(k * steps / 3) / steps, 4) for k in (1, 2)]
        assert all(p["n"] == 64 and 0 <= p["pgd_acc"] <= p["clean_acc"] + 1e-9
                   for p in a["probes"])
        assert a["train_seconds"] < a["seconds"]
    assert with_probes["final"] == without["final"]
    probed = [e for e in with_probes["events"] if e.get("at_epoch") is not None]
    checks = [p for h in with_probes["history"] for p in h["probes"]]
    assert all(any(abs(e["at_epoch"] - p["at_epoch"]) < 1e-9 for p in checks)
               for e in probed)
