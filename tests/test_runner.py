"""End-to-end runs of the job runner and the ``bulwark`` CLI on real data (CPU-sized)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bulwark.contract.spec import JobSpec
from bulwark.workers.engine.models import build_model
from bulwark.workers.engine.runner import Cancelled, run_job
from tests.cli import CLI

pytestmark = pytest.mark.training  # trains real models: not in the fast lane

REPO = Path(__file__).resolve().parents[1]


def digits_spec(**over) -> JobSpec:
    spec = {
        "name": "digits-test",
        "dataset": {"name": "digits", "val_size": 256},
        "model": {"arch": "small_cnn"},
        "threat": {"norm": "linf", "epsilon": "8/255"},
        "recipe": "fgsm-elle-a",
        "schedule": {"epochs": 2, "batch_size": 64, "seed": 3},
        "evaluation": {"monitor": {"size": 128, "pgd_steps": 3},
                       "final": {"n": 128, "pgd": {"steps": 5, "restarts": 2},
                                 "autoattack": {"version": "apgd-ce"}}},
    }
    spec.update(over)
    return JobSpec.model_validate(spec)


def test_digits_report_is_complete_and_learns(tmp_path):
    # one optimizer step a batch: the preset's official double step doubles this lr, and
    # SmallCNN (no BatchNorm) then diverges on digits (a run that tests the divergence guard)
    spec = digits_spec(recipe={"preset": "fgsm-elle", "regularizers": [
                           {"kind": "elle", "official_double_step": False}]},
                       schedule={"epochs": 8, "batch_size": 32, "seed": 0,
                                 "lr": {"kind": "cyclic", "lr_max": 0.05}})
    report = run_job(spec, tmp_path, device="cpu", progress=False)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["report_version"] == 1
    assert on_disk["spec"]["recipe"]["preset"] == "fgsm-elle"
    assert on_disk["environment"]["torch"] == torch.__version__
    assert on_disk["environment"]["seed"] == 0
    assert [h["epoch"] for h in on_disk["history"]] == list(range(1, 9))
    for h in on_disk["history"]:
        assert 0 <= h["train_acc"] <= 1 and h["train_loss"] > 0
        assert set(h["monitor"]) == {"clean_acc", "fgsm_acc", "pgd_acc", "dlr_acc", "n"}
        assert 0 <= h["monitor"]["dlr_acc"] <= h["monitor"]["clean_acc"] + 0.05
        assert h["monitor"]["n"] == 128
        assert h["metrics"]["elle_lambda"] == pytest.approx(1000.0)
        assert h["metrics"]["elle_e_lin"] >= 0
    final = on_disk["final"]
    assert final["n"] == 128
    assert final["clean_acc"] > 0.5, "10 classes: chance is 0.1"
    attacks = final["attacks"]
    assert set(attacks) == {"fgsm", "pgd5-2", "autoattack-apgd-ce"}
    for r in attacks.values():
        assert r["n"] == 128 and 0 <= r["acc"] <= final["clean_acc"] + 1e-9
    assert on_disk["certification"] is None
    assert on_disk["timing"]["total"] > 0
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert any(k.endswith("weight") for k in weights)
    page = (tmp_path / "report.html").read_text()
    # training curves, monitor, method traces (E_lin, λ): matplotlib SVGs embedded
    assert page.count("data:image/svg+xml;base64,") == 3
    assert f"{final['clean_acc']:.4f}" in page


def test_best_that_is_the_last_epoch_is_evaluated_once(tmp_path):
    """One epoch: the monitor's best epoch is the last, so `best` holds the last weights; the
    suite runs once and both entries carry its result (the same weights, seeds and attacks)."""
    spec = digits_spec(recipe="fgsm", schedule={"epochs": 1, "batch_size": 64, "seed": 3},
                       evaluation={"monitor": {"size": 128, "pgd_steps": 3},
                                   "final": {"n": 128, "pgd": {"steps": 5, "restarts": 2},
                                             "autoattack": None, "models": ["last", "best"]}})
    events = []
    report = run_job(spec, tmp_path / "run", device="cpu", progress=False,
                     on_event=lambda k, d: events.append((k, d)))
    assert report["selection"]["epoch"] == report["selection"]["last_epoch"] == 1
    last, best = report["final_models"]["last"], report["final_models"]["best"]
    assert best == {**last, "model": "best"}
    evaluated = [d["model"] for k, d in events if k == "phase" and
                 d.get("phase") == "final_evaluation" and "model" in d and "attack" not in d]
    assert evaluated == ["last"]
    # the same job evaluating `best` alone runs the suite on those weights: what was copied
    alone = run_job(spec.model_copy(update={"evaluation": spec.evaluation.model_copy(update={
        "final": spec.evaluation.final.model_copy(update={"models": ["best"]})})}),
        tmp_path / "alone", device="cpu", progress=False)
    assert alone["final_models"]["best"] == best


def test_final_split_validation_evaluates_the_held_out_slice_not_the_test_set(tmp_path):
    """evaluation.final.split: validation, for choosing a setting: the suite's clean accuracy is
    the saved weights' accuracy on the held-out training images (recomputed here from
    scikit-learn's digits and the documented seeded permutation), on all of them, and the
    report and its page say so."""
    from sklearn.datasets import load_digits

    import bulwark
    from bulwark.workers.engine.data import load_dataset, split_validation

    spec = digits_spec(recipe="fgsm", evaluation={
        "monitor": {"size": 64, "pgd_steps": 2},
        "final": {"split": "validation", "pgd": {"steps": 2, "restarts": 1},
                  "autoattack": None}})
    report = run_job(spec, tmp_path / "run", device="cpu", progress=False)
    assert report["dataset"]["final_split"] == "validation"
    assert report["final"]["n"] == 256 == spec.dataset.val_size
    data = load_dataset(spec.dataset)
    _, _, val_x, val_y = split_validation(data.train_x, data.train_y, 256, seed=3)
    digits = load_digits()  # the held-out images are training images, never test ones
    pixels = {bytes(x.flatten().tolist()) for x in data.train_x}
    assert all(bytes(x.flatten().tolist()) in pixels for x in val_x)
    assert len(data.train_x) + len(data.test_x) == len(digits.target)
    model = bulwark.load_model(tmp_path / "run" / "model.safetensors")
    with torch.no_grad():
        val_acc = (model(val_x.float() / 255).argmax(1) == val_y).float().mean().item()
    assert report["final"]["clean_acc"] == pytest.approx(val_acc, abs=1e-6)
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Final evaluation on the validation slice (not the test set)" in page
    with pytest.raises(ValueError, match="val_size must be > 0"):
        digits_spec(dataset={"name": "digits", "val_size": 0},
                    evaluation={"final": {"split": "validation"}})


def test_resume_matches_uninterrupted_run(tmp_path):
    """Stop after epoch 1, resume: final weights and ELLE-A state equal an uninterrupted run.
    Stop again inside the final suite, resume: the finished batches come from the ledger and
    the report equals the uninterrupted run's."""
    spec = digits_spec(evaluation={
        "monitor": {"size": 128, "pgd_steps": 3},
        "final": {"n": 128, "batch_size": 32, "pgd": {"steps": 5, "restarts": 2},
                  "autoattack": {"version": "apgd-ce"}}})
    full = tmp_path / "full"
    run_job(spec, full, device="cpu", progress=False)

    part = tmp_path / "part"
    done = {"epoch": 0}

    def on_event(kind, data):
        if kind == "epoch":
            done["epoch"] = data["epoch"]

    with pytest.raises(Cancelled):
        run_job(spec, part, device="cpu", progress=False, on_event=on_event,
                should_stop=lambda: done["epoch"] >= 1)
    assert not (part / "report.json").exists()
    ckpt = torch.load(part / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    elle_a = ckpt["recipe"]["regularizers"]["elle_a"]
    assert float(elle_a["n"]) > 0, "ELLE-A history is checkpointed"

    # the second attempt stops at its first check inside AutoAttack (one batch done there)
    phases: list[str] = []
    with pytest.raises(Cancelled):
        run_job(spec, part, device="cpu", progress=False, resume=True,
                on_event=lambda kind, data: phases.append(data.get("attack", "")),
                should_stop=lambda: "autoattack-apgd-ce" in phases)
    ledger = json.loads((part / "final.partial.json").read_text())["models"]["last"]
    assert ledger["identity"]["n"] == 128
    assert ledger["seconds"] > 0, "the kept batches' cost travels with them"
    assert {k: sorted(v) for k, v in ledger["attacks"].items()} == {
        "fgsm": ["0:32", "32:64", "64:96", "96:128"],
        "pgd5-2": ["0:32", "32:64", "64:96", "96:128"], "autoattack-apgd-ce": ["0:32"]}
    # the ledger is read, not recomputed: a copy whose first PGD batch says "none robust"
    # resumes to a PGD count short of exactly that batch's robust points
    tampered = tmp_path / "tampered"
    shutil.copytree(part, tampered)
    first = ledger["attacks"]["pgd5-2"]["0:32"]
    book = json.loads((tampered / "final.partial.json").read_text())
    book["models"]["last"]["attacks"]["pgd5-2"]["0:32"] = "0" * 32
    (tampered / "final.partial.json").write_text(json.dumps(book))
    short = run_job(spec, tampered, device="cpu", progress=False, resume=True)

    t0 = time.perf_counter()
    report = run_job(spec, part, device="cpu", progress=False, resume=True)
    last_process = time.perf_counter() - t0
    assert not (part / "final.partial.json").exists(), "the report replaces the ledger"
    # the timing counts the three processes, not only the last one: the final suite includes
    # the kept batches' seconds, the total the earlier processes' time, and no phase exceeds it
    timing = report["timing"]
    assert timing["final_evaluation"] >= ledger["seconds"]
    assert timing["total"] > last_process
    assert sum(v for k, v in timing.items() if k != "total") <= timing["total"] + 0.01
    a = load_file(str(full / "model.safetensors"))
    b = load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full_report = json.loads((full / "report.json").read_text())
    assert report["final"] == full_report["final"]
    attacks = full_report["final"]["attacks"]
    assert round(128 * short["final"]["attacks"]["pgd5-2"]["acc"]) == \
        round(128 * attacks["pgd5-2"]["acc"]) - first.count("1")
    assert first.count("1") > 0, "the tampered batch had robust points to lose"
    assert short["final"]["attacks"]["autoattack-apgd-ce"] == attacks["autoattack-apgd-ce"]
    assert [h["train_loss"] for h in report["history"]] == \
        [h["train_loss"] for h in full_report["history"]]


def test_cli_runs_mnist_job(tmp_path):
    """The shipped MNIST, found with no root given (the working directory has no data/)."""
    spec = {
        "dataset": {"name": "mnist", "train_limit": 4000, "val_size": 512},
        "threat": {"epsilon": 0.1},
        "recipe": "n-aaer",
        "schedule": {"epochs": 2, "batch_size": 32, "lr": {"kind": "cyclic", "lr_max": 0.05}},
        "evaluation": {"monitor": {"size": 256, "pgd_steps": 5},
                       "final": {"n": 500, "pgd": {"steps": 10, "restarts": 1},
                                 "autoattack": None}},
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "BULWARK_DATA_ROOT"}
    proc = subprocess.run([*CLI, "run", str(path), "--out",
                           str(out), "--device", "cpu", "--quiet"], env=env,
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "clean accuracy" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"]["train"] == 4000 - 512
    # Learned, with a margin that holds on any CPU: chance is 0.1, 0.79-0.96 seen on machines.
    assert report["final"]["clean_acc"] > 0.5
    assert "aaer_ratio" in report["history"][0]["metrics"]


def _cli(*args, cwd=REPO):
    return subprocess.run([*CLI, *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_cli_bad_spec_is_a_message_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: fgsm-elle\nthreat: {epsilon: 3}\nschedule: {epochs: 0}\nbogus: 1\n")
    proc = _cli("run", str(bad), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "threat.epsilon" in proc.stderr and "(0, 1]" in proc.stderr
    assert "schedule.epochs" in proc.stderr and "greater than or equal to 1" in proc.stderr
    assert "bogus" in proc.stderr
    assert not (tmp_path / "o" / "report.json").exists()


def test_cli_unknown_preset_and_missing_file(tmp_path):
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"recipe": "fgsm-magic"}))
    proc = _cli("validate", str(spec))
    assert proc.returncode == 2 and "fgsm-magic" in proc.stderr and "fgsm-elle" in proc.stderr
    proc = _cli("run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_missing_dataset_says_where_it_looked(tmp_path):
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"dataset": {"name": "cifar10", "root": str(tmp_path / "none")},
                                "schedule": {"epochs": 1}}))
    proc = _cli("run", str(spec), "--out", str(tmp_path / "o"), "--quiet", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert str(tmp_path / "none") in proc.stderr


def test_cli_validate_prints_resolved_spec(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("recipe: n-aaer\nthreat: {epsilon: 16/255}\n")
    proc = _cli("validate", str(spec))
    assert proc.returncode == 0, proc.stderr
    resolved = json.loads(proc.stdout)
    reg = resolved["recipe"]["regularizers"][0]
    assert (reg["kind"], reg["lam2"], reg["lam3"]) == ("aaer", 8.5, 1.5)
    assert resolved["threat"]["epsilon"] == pytest.approx(16 / 255)


def test_gaussian_job_certifies_and_evaluate_mode_reproduces(tmp_path):
    spec = {
        "dataset": {"name": "digits", "val_size": 256},
        "threat": {"norm": "l2", "epsilon": 0.5},
        "recipe": {"preset": "gaussian-smoothing",
                   "adversary": {"kind": "gaussian", "sigma": 0.25}},
        "schedule": {"epochs": 6, "batch_size": 32, "lr": {"kind": "cyclic", "lr_max": 0.05}},
        "evaluation": {"monitor": {"size": 64, "pgd_steps": 2},
                       "final": {"n": 64, "pgd": None, "autoattack": None},
                       "certification": {"n0": 50, "n": 1000, "skip": 6, "num_points": 40,
                                         "empirical": {"eps": 0.25, "steps": 3,
                                                       "noise_samples": 2, "predict_n": 100,
                                                       "num_points": 16}}},
    }
    report = run_job(JobSpec.model_validate(spec), tmp_path / "train", device="cpu",
                     progress=False)
    cert = report["certification"]
    assert (cert["sigma"], cert["n0"], cert["n"], cert["alpha"]) == (0.25, 50, 1000, 0.001)
    assert cert["num_points"] == 40 and cert["skip"] == 6
    acc = cert["certified_accuracy"]
    assert len(acc) == len(cert["radii"]) and acc == sorted(acc, reverse=True)
    assert acc[0] > 0.5, "a noise-trained digits model certifies well above chance at r=0"
    rows = (tmp_path / "train" / "certify.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time"]
    parsed = [r.split("\t") for r in rows[1:]]
    assert [int(r[0]) for r in parsed] == list(range(0, 240, 6))
    correct = [int(r[4]) for r in parsed]
    radius = [float(r[3]) for r in parsed]
    assert acc[0] == pytest.approx(sum(correct) / 40)
    acr = sum(r * c for r, c in zip(radius, correct, strict=True)) / 40
    assert cert["acr"] == pytest.approx(acr)
    emp = cert["empirical"]
    assert emp["n"] == 16 and 0 <= emp["acc"] <= 1

    trained = str(tmp_path / "train" / "model.safetensors")
    evaluate = {**spec, "mode": "evaluate", "model": {"arch": "small_cnn", "weights": trained}}
    again = run_job(JobSpec.model_validate(evaluate), tmp_path / "eval", device="cpu",
                    progress=False)
    assert again["history"] == []
    assert again["certification"]["certified_accuracy"] == acc
    assert again["final"]["clean_acc"] == report["final"]["clean_acc"]

    # the summary `bulwark run` and `bulwark report` print includes the certification
    from bulwark.contract.report import Report

    text = Report.model_validate(report).summary()
    assert "certified (σ=0.25, n=1000, α=0.001, 40 points)" in text
    assert f"r=0: {acc[0]:.3f}" in text and f"ACR {cert['acr']:.3f}" in text
    assert f"smoothed PGD (ℓ2 ε=0.25) {emp['acc']:.4f}  (n=16)" in text


def test_evaluate_mode_needs_loadable_weights(tmp_path):
    with pytest.raises(ValueError, match="model.weights is required"):
        JobSpec.model_validate({"mode": "evaluate"})
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"not safetensors")
    spec = JobSpec.model_validate({"mode": "evaluate", "dataset": {"name": "digits"},
                                   "model": {"weights": str(bad)}})
    with pytest.raises(ValueError, match="cannot load"):
        run_job(spec, tmp_path / "o", device="cpu", progress=False)


def test_cli_submit_reads_the_spec_like_run_does(tmp_path):
    """`bulwark submit` shares `bulwark run`'s reader: a broken file is a message, no server
    contacted, no traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: [unclosed\n")
    proc = _cli("submit", str(bad), "--url", "http://127.0.0.1:9")
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_validate_says_where_the_data_is(tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text("dataset: {name: mnist}\nthreat: {norm: Linf, epsilon: 0.3}\n")
    proc = _cli("validate", str(ok), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["threat"]["norm"] == "linf", "norm in any case"
    assert "data: mnist found at" in proc.stderr and str(REPO / "data" / "mnist") in proc.stderr
    assert "source:" not in proc.stderr, "no preset, no sources"
    preset = tmp_path / "preset.yaml"
    preset.write_text("dataset: {name: mnist}\nthreat: {epsilon: 0.3}\nrecipe: n-aaer\n"
                      "schedule: {epochs: 3}\n")
    proc = _cli("validate", str(preset), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["schedule"]["optimizer"] == "adam", "MNIST family values"
    err = proc.stderr
    assert "preset n-aaer at ε = 0.3 for mnist (mnist family values)" in err
    assert "recipe.regularizers.aaer = aaer(lam1=1, lam2=2.75, lam3=0.75)" in err
    assert "AAER README" in err and "Wong et al. 2020" in err
    assert "schedule = epochs 3" in err and "your spec changed epochs (the preset's: 10)" in err
    missing = tmp_path / "missing.yaml"
    missing.write_text(f"dataset: {{name: cifar10, root: {tmp_path / 'none'}}}\n")
    proc = _cli("validate", str(missing), cwd=tmp_path)
    assert proc.returncode == 1 and "data: NOT FOUND" in proc.stderr
    assert str(tmp_path / "none" / "cifar-10-batches-py") in proc.stderr


def test_cli_validate_checks_every_child_of_a_sweep_file(tmp_path):
    """A sweep file is checked child by child (not refused as a spec with unknown keys)."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: {dataset: {name: mnist}, threat: {epsilon: 0.3}, recipe: fgsm-rs}\n"
                     "variants: {plain: {}, margin: {threat: {train_epsilon: 0.36}}}\n"
                     "grid: {schedule.seed: [0, 1]}\n")
    proc = _cli("validate", str(sweep), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "plain_seed=0: fgsm-rs, ε 0.3, 10 epochs, seed 0",
        "plain_seed=1: fgsm-rs, ε 0.3, 10 epochs, seed 1",
        "margin_seed=0: fgsm-rs, ε 0.3 (trained at 0.36), 10 epochs, seed 0",
        "margin_seed=1: fgsm-rs, ε 0.3 (trained at 0.36), 10 epochs, seed 1"]
    assert "sweep: 4 children, every one a valid job spec" in proc.stderr
    assert "data: mnist found at" in proc.stderr
    sweep.write_text(sweep.read_text().replace("train_epsilon: 0.36", "train_epsilon: 3"))
    proc = _cli("validate", str(sweep), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "sweep child margin_seed=0" in proc.stderr and "train_epsilon" in proc.stderr
    sweep.write_text("base: {threat: {epsilon: 0.3}, recipe: fgsm-rs}\n"
                     "grid: {dataset.name: [mnist, cifar10], schedule.seed: [0, 1]}\n")
    proc = _cli("validate", str(sweep), cwd=tmp_path)  # every dataset the children read, once
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("data: mnist found at") == 1
    assert proc.stderr.count("data: NOT FOUND") == 1 and "cifar-10-batches-py" in proc.stderr


def test_cli_presets_shows_every_part_aligned():
    proc = _cli("presets", "--epsilon", "16/255")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = lines[0].split()
    assert header == ["preset", "adversary", "loss", "regularizers", "awp", "labels", "wa",
                      "epochs", "optimizer", "lr", "warmup"]
    rows = {ln.split()[0]: ln for ln in lines[1:-1]}
    assert "elle(lam=5000, official_double_step=True)" in rows["fgsm-elle"], \
        "λ resolved at the ε asked"
    assert "awp(gamma=0.005, warmup=10)" in rows["trades-awp"]
    assert "adr(τ 2.5→2, λ 0.7→0.95)" in rows["pgd-adr"] and "ema(0.995)" in rows["pgd-adr"]
    col = lines[0].index("loss")
    assert all(ln[col - 2:col] == "  " for ln in lines[1:-1]), "columns line up"


def test_cli_run_shows_every_phase_and_survives_a_zero_column_terminal(tmp_path):
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({
        "name": "bars", "dataset": {"name": "digits", "val_size": 128},
        "threat": {"epsilon": 0.1}, "recipe": "fgsm",
        "schedule": {"epochs": 1, "batch_size": 64},
        "evaluation": {"monitor": {"size": 64, "pgd_steps": 2},
                       "final": {"n": 64, "pgd": {"steps": 2, "restarts": 1},
                                 "autoattack": {"version": "apgd-ce"}}}}))
    import os

    env = {**os.environ, "COLUMNS": "0", "LINES": "0"}
    # no --out: the run goes to runs/<the spec's stem> under the working directory
    proc = subprocess.run([*CLI, "run", str(spec)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for phase in ("bars train", "bars last fgsm", "bars last pgd2-1",
                  "bars last autoattack-apgd-ce"):
        assert phase in proc.stderr, f"no bar for {phase!r}:\n{proc.stderr}"
    frames = [f for line in proc.stderr.splitlines() for f in line.split("\r") if f.strip()]
    assert max(len(f) for f in frames) <= 100, "the 100-column fallback"
    assert "64/64" in proc.stderr, "attack bars count test points"
    out = tmp_path / "runs" / "s"
    assert (out / "report.json").exists() and not (out / "checkpoint.pt").exists()
    assert f"report: {Path('runs') / 's' / 'report.json'}" in proc.stdout
    # `bulwark report` reads a run folder as it reads a job: the same summary, or the JSON
    shown = subprocess.run([*CLI, "report", "runs/s"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert shown.returncode == 0, shown.stderr
    report = json.loads((out / "report.json").read_text())
    assert f"{report['final']['clean_acc']:.4f}" in shown.stdout
    assert shown.stdout.strip() in proc.stdout, "the summary `bulwark run` printed"
    as_json = subprocess.run([*CLI, "report", "runs/s",
                              "--json"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert json.loads(as_json.stdout) == report
    empty = subprocess.run([*CLI, "report", "runs"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert empty.returncode == 2 and "no report.json" in empty.stderr
    assert "Traceback" not in empty.stderr


def test_compiled_step_follows_the_eager_run(tmp_path):
    """compute.compile on: the training step runs through torch.compile (inductor, C++ on the
    CPU) and takes the eager run's steps to float rounding; auto stays eager on the CPU, where
    the recorded figures show compilation losing."""
    # 900 training images = 9 full batches of 100: one batch shape, no recompilation. SGD at a
    # small lr: on the loss plateau of a fresh net Adam (or a large lr) turns rounding into
    # another trajectory, and the comparison would test chaos rather than equality.
    over = {"dataset": {"name": "digits", "val_size": 100, "train_limit": 900},
            "recipe": {"preset": "fgsm-elle-a", "regularizers": [
                {"kind": "elle_a", "lam_max": 100}]},
            "schedule": {"epochs": 2, "batch_size": 100, "seed": 3, "optimizer": "sgd",
                         "lr": {"kind": "cyclic", "lr_max": 0.05}}}
    eager = run_job(digits_spec(**over), tmp_path / "eager", device="cpu", progress=False)
    spec = digits_spec(**over, compute={"compile": "on"})
    compiled = run_job(spec, tmp_path / "compiled", device="cpu", progress=False)
    assert eager["environment"]["compile"] is False
    assert compiled["environment"]["compile"] is True
    for a, b in zip(eager["history"], compiled["history"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["metrics"]["elle_e_lin"] == pytest.approx(a["metrics"]["elle_e_lin"],
                                                           rel=1e-2, abs=1e-6)
    wa = load_file(str(tmp_path / "eager" / "model.safetensors"))
    wb = load_file(str(tmp_path / "compiled" / "model.safetensors"))
    assert wa.keys() == wb.keys(), "the weights are saved under the eager module's names"
    torch.manual_seed(3)  # the runner's initialisation: how far training moved the weights
    start = build_model("small_cnn", num_classes=10, in_channels=1, image_size=8,
                        mean=(0.0,), std=(1.0,)).state_dict()
    params = [k for k in wa if k.startswith("net.")]  # not the Normalize layer's constants
    moved = max(float((wa[k] - start[k]).abs().max()) for k in params)
    apart = max(float((wa[k] - wb[k]).abs().max()) for k in params)
    assert apart * 1000 < moved, f"the runs differ by {apart:.2e}; training moved {moved:.2e}"


def test_compile_on_refuses_gradalign_double_backward():
    with pytest.raises(ValueError, match="compute.compile: 'on' cannot train GradAlign"):
        digits_spec(recipe="fgsm-gradalign", compute={"compile": "on"})
    assert digits_spec(recipe="fgsm-gradalign").compute.compile == "auto"


def test_weights_trained_behind_another_normalization_are_refused(tmp_path):
    """The normalization constants are buffers outside the state dict, so the same weights load
    into a model with either normalization; the runner compares the file's recorded mean/std
    (written by Bulwark) with the job's and says which setting evaluates them as trained."""
    from bulwark.contract.spec import DatasetSpec
    from bulwark.workers.engine.checkpoint import save_weights
    from bulwark.workers.engine.data import load_dataset
    from bulwark.workers.engine.models import build_model

    data = load_dataset(DatasetSpec(name="digits"))
    net = build_model("small_cnn", num_classes=10, in_channels=1, image_size=data.image_size,
                      mean=data.mean, std=data.std)
    weights = tmp_path / "w.safetensors"
    save_weights(weights, net, {"mean": json.dumps(list(data.mean)),
                                "std": json.dumps(list(data.std))})
    base = {"mode": "evaluate", "dataset": {"name": "digits"},
            "threat": {"norm": "linf", "epsilon": 0.1},
            "evaluation": {"final": {"n": 32, "pgd": {"steps": 2, "restarts": 1},
                                     "autoattack": None}}}
    raw = JobSpec.model_validate({**base, "model": {"arch": "small_cnn", "weights": str(weights),
                                                    "normalization": "none"}})
    with pytest.raises(ValueError, match="set model.normalization: dataset"):
        run_job(raw, tmp_path / "raw", device="cpu", progress=False)
    same = JobSpec.model_validate({**base, "model": {"arch": "small_cnn", "weights": str(weights),
                                                     "normalization": "dataset"}})
    report = run_job(same, tmp_path / "same", device="cpu", progress=False)
    assert report["final"]["n"] == 32
