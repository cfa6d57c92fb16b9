"""Sweeps: expansion of a base spec x grid x variants, and the local, resumable runner."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from bulwark.contract.spec import SpecError
from bulwark.contract.sweep import MAX_CHILDREN, SweepSpec, expand, load_sweep
from bulwark.workers.engine.runner import Cancelled, run_job
from tests.cli import CLI
from tests.helpers import history_row, report_doc

pytestmark = pytest.mark.training  # trains real models: not in the fast lane

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "dataset": {"name": "synthetic", "val_size": 64,
                "synthetic": {"image_size": 8, "n_train": 256, "n_test": 64, "num_classes": 4}},
    "threat": {"epsilon": "8/255"},
    "recipe": "fgsm",
    "schedule": {"epochs": 2, "batch_size": 64, "lr": {"kind": "cyclic", "lr_max": 0.05}},
    "evaluation": {"monitor": {"size": 64, "pgd_steps": 2},
                   "final": {"n": 32, "pgd": {"steps": 2, "restarts": 1}, "autoattack": None}},
}


def test_grid_times_variants_in_file_order():
    sweep = SweepSpec.model_validate({
        "base": BASE,
        "variants": {"plain": {}, "elle": {"recipe": {"preset": "fgsm-elle",
                                                      "regularizers": [{"kind": "elle",
                                                                        "lam": 50}]}}},
        "grid": {"threat.epsilon": [0.1, "16/255"], "schedule.seed": [0, 1]},
    })
    children = expand(sweep)
    assert [c.name for c in children] == [
        f"{v}_epsilon={e}_seed={s}" for v in ("plain", "elle") for e in ("0.1", "16-255")
        for s in (0, 1)]
    c = children[5]  # elle, 0.1, seed 1
    assert c.overrides == {"variant": "elle", "threat.epsilon": 0.1, "schedule.seed": 1}
    assert c.spec.threat.epsilon == 0.1 and c.spec.schedule.seed == 1
    assert c.spec.recipe.regularizers[0].lam == 50 and c.spec.name == c.name
    assert children[2].spec.threat.epsilon == pytest.approx(16 / 255)
    assert all(ch.spec.recipe.adversary.kind == "fgsm" for ch in children)


def test_grid_over_a_preset_named_by_string_and_stop_on_co():
    sweep = SweepSpec.model_validate({"base": BASE, "grid": {"recipe.preset": ["fgsm", "n-fgsm"]},
                                      "stop_on_catastrophic_overfitting": True})
    a, b = expand(sweep)
    assert (a.spec.recipe.adversary.kind, b.spec.recipe.adversary.kind) == ("fgsm", "n_fgsm")
    assert a.spec.evaluation.monitor.stop_on_co and b.spec.evaluation.monitor.stop_on_co


def test_a_variant_of_another_kind_replaces_the_part_and_one_of_the_same_kind_merges():
    rs = {"kind": "fgsm_rs", "alpha": 1.25, "clip_start": False}
    base = {**BASE, "recipe": {"preset": "fgsm-rs", "adversary": rs},
            "schedule": {**BASE["schedule"], "lr": {"kind": "cyclic", "lr_max": 0.05, "peak": 0.4}}}
    sweep = SweepSpec.model_validate({"base": base, "variants": {
        "fgsm": {"recipe": {"preset": "fgsm-gradalign",
                            "adversary": {"kind": "fgsm", "alpha": 1.0}}},
        "rs": {"recipe": {"adversary": {"kind": "fgsm_rs", "alpha": 1.0}}},
        "step": {"schedule": {"lr": {"kind": "piecewise", "lr_max": 0.1, "milestones": [0.5],
                                     "gamma": 0.1}}}}})
    fgsm, rs, step = expand(sweep)
    assert fgsm.spec.recipe.adversary.kind == "fgsm" and fgsm.spec.recipe.adversary.alpha == 1.0
    assert not hasattr(fgsm.spec.recipe.adversary, "clip_start")
    assert rs.spec.recipe.adversary.alpha == 1.0 and rs.spec.recipe.adversary.clip_start is False
    assert step.spec.schedule.lr.kind == "piecewise" and step.spec.schedule.lr.milestones == [0.5]
    assert step.spec.schedule.lr.peak == 0.5, "the cyclic lr's peak is not carried over"


def test_bad_sweeps_name_the_child_and_field(tmp_path):
    with pytest.raises(SpecError, match=r"(?s)sweep child epsilon=2:.*threat.epsilon.*\(0, 1\]"):
        expand(SweepSpec.model_validate({"base": BASE, "grid": {"threat.epsilon": [0.1, 2]}}))
    with pytest.raises(ValueError, match="dotted spec field"):
        SweepSpec.model_validate({"base": BASE, "grid": {"Threat/eps": [1]}})
    with pytest.raises(ValueError, match="at least one value"):
        SweepSpec.model_validate({"base": BASE, "grid": {"threat.epsilon": []}})
    big = {"base": BASE, "grid": {"schedule.seed": list(range(MAX_CHILDREN + 1))}}
    with pytest.raises(SpecError, match="at most"):
        expand(SweepSpec.model_validate(big))
    path = tmp_path / "s.yaml"
    path.write_text("grid: {schedule.seed: [0]}\n")
    with pytest.raises(SpecError, match=r"s.yaml: invalid sweep\nbase: Field required"):
        load_sweep(path)


def test_base_may_be_a_spec_file_next_to_the_sweep(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(
        {"base": "base.yaml", "grid": {"schedule.seed": [3]}}))
    (child,) = expand(load_sweep(tmp_path / "sweep.yaml"))
    assert child.spec.schedule.seed == 3 and child.spec.dataset.name == "synthetic"


def test_variants_from_takes_another_files_variants_as_written(tmp_path):
    """One variant written once for every study that runs it: all of a file's variants, or
    `only` some, placed before this file's own; a name missing or defined twice is an error."""
    study = {"base": BASE, "variants": {
        "plain": {}, "rs": {"recipe": "fgsm-rs"},
        "elle": {"recipe": {"preset": "fgsm-elle", "regularizers": [{"kind": "elle",
                                                                      "lam": 50}]}}}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    seeds = tmp_path / "seeds.yaml"
    seeds.write_text(yaml.safe_dump({"base": BASE, "variants_from": [{"file": "study.yaml"}],
                                     "grid": {"schedule.seed": [1]}}, sort_keys=False))
    assert [c.name for c in expand(load_sweep(seeds))] == [
        "plain_seed=1", "rs_seed=1", "elle_seed=1"]
    (tmp_path / "sub").mkdir()  # paths are relative to the file that names them, nested too
    target = tmp_path / "sub" / "target.yaml"
    target.write_text(yaml.safe_dump({
        "base": BASE, "variants_from": [{"file": "../seeds.yaml", "only": ["elle"]}],
        "variants": {"margin": {"threat": {"train_epsilon": 0.1}}}}, sort_keys=False))
    elle, margin = expand(load_sweep(target))
    assert (elle.name, margin.name) == ("elle", "margin")
    assert elle.spec.recipe.regularizers[0].lam == 50, "the variant as its file writes it"
    assert margin.spec.threat.train_epsilon == 0.1
    target.write_text(yaml.safe_dump({"base": BASE, "variants_from": [
        {"file": "../study.yaml", "only": ["elle", "nope"]}]}))
    with pytest.raises(SpecError, match=r"has no variant nope \(it has plain, rs, elle\)"):
        load_sweep(target)
    target.write_text(yaml.safe_dump({"base": BASE, "variants": {"rs": {}},
                                      "variants_from": [{"file": "../study.yaml"}]}))
    with pytest.raises(SpecError, match="variant rs is defined twice"):
        load_sweep(target)
    loop = tmp_path / "loop.yaml"
    loop.write_text(yaml.safe_dump({"base": BASE, "variants_from": [{"file": "loop.yaml"}]}))
    with pytest.raises(SpecError, match="nests deeper than"):
        load_sweep(loop)
    with pytest.raises(SpecError, match="resolved first"):
        expand(SweepSpec.model_validate({"base": BASE,
                                         "variants_from": [{"file": "study.yaml"}]}))


def _sweep_cli(path: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "sweep", str(path),
                           "--out", str(out), *extra], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


def test_two_sweeps_running_at_once_into_one_folder_keep_each_others_rows(tmp_path):
    # a study runs its seeds sweep beside its main sweep: both write the folder's table while
    # the other runs, and neither may drop the rows the other wrote after it started
    out = tmp_path / "runs"
    cmd = [*CLI, "sweep"]
    procs = []
    for seeds in ([0, 1], [5, 6]):
        path = tmp_path / f"seeds{seeds[0]}.yaml"
        path.write_text(yaml.safe_dump({"base": BASE, "grid": {"schedule.seed": seeds}}))
        procs.append(subprocess.Popen([*cmd, str(path), "--out", str(out), "--threads", "1"],
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stdout.read()
    table = json.loads((out / "sweep.json").read_text())["children"]
    assert sorted(r["name"] for r in table) == ["seed=0", "seed=1", "seed=5", "seed=6"]
    assert all(r["state"] == "succeeded" for r in table)


def test_a_table_write_waits_for_the_sweep_that_holds_the_tables_lock(tmp_path):
    # two sweeps that finish a child in the same instant must not both read the old table and
    # replace it in turn (the second would drop the first's row): the second waits its turn
    import fcntl
    import threading

    from bulwark.workers.client.sweep import write_table

    table = tmp_path / "sweep.json"
    write_table(table, ["a"], {"a": {"name": "a", "state": "running"}})
    with open(tmp_path / "sweep.json.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another sweep is between its read and its replace
        writer = threading.Thread(target=write_table, args=(
            table, ["b"], {"b": {"name": "b", "state": "succeeded"}}))
        writer.start()
        writer.join(timeout=0.5)
        assert writer.is_alive()  # waiting, table untouched
        assert [r["name"] for r in json.loads(table.read_text())["children"]] == ["a"]
        rows = json.loads(table.read_text())["children"]  # the holder's own write lands
        table.write_text(json.dumps({"children": [*rows, {"name": "c", "state": "failed"}]}))
        fcntl.flock(held, fcntl.LOCK_UN)
    writer.join(timeout=10)
    assert not writer.is_alive()
    assert [r["name"] for r in json.loads(table.read_text())["children"]] == ["a", "c", "b"]


def test_local_sweep_runs_skips_finished_and_resumes_unfinished(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": BASE, "grid": {"schedule.seed": [0, 1]},
                                    "variants": {"fgsm": {}, "bad": {
                                        "dataset": {"name": "npz", "path": "/nonexistent.npz"}
                                    }}}, sort_keys=False))
    out = tmp_path / "runs"
    # An interrupted child: seed 1 stopped after its first epoch, as a killed sweep leaves it.
    (child,) = [c for c in expand(load_sweep(path)) if c.name == "fgsm_seed=1"]
    epochs = []
    with pytest.raises(Cancelled):
        run_job(child.spec, out / child.name, progress=False,
                on_event=lambda k, d: epochs.append(k),
                should_stop=lambda: epochs.count("epoch") >= 1)
    ckpt_path = out / child.name / "checkpoint.pt"
    state = torch.load(ckpt_path, weights_only=True)
    assert state["epoch"] == 1
    state["history"][0]["train_loss"] = 123.0  # a marker only a resumed run carries over
    torch.save(state, ckpt_path)

    proc = _sweep_cli(path, out, "--parallel", "2")
    assert proc.returncode == 1, "one child fails"
    table = json.loads((out / "sweep.json").read_text())["children"]
    by = {r["name"]: r for r in table}
    assert [r["name"] for r in table] == ["fgsm_seed=0", "fgsm_seed=1", "bad_seed=0",
                                          "bad_seed=1"]
    assert by["fgsm_seed=0"]["state"] == "succeeded" and by["fgsm_seed=0"]["n"] == 32
    assert by["bad_seed=0"]["state"] == "failed"
    assert "/nonexistent.npz" in by["bad_seed=0"]["error"]
    resumed = json.loads((out / "fgsm_seed=1" / "report.json").read_text())
    assert resumed["history"][0]["train_loss"] == 123.0, "continued from the checkpoint"
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert not (out / "fgsm_seed=1" / "checkpoint.pt").exists(), "cleaned after success"
    assert "fgsm_seed=0" in proc.stdout and "clean" in proc.stdout

    mtime = (out / "fgsm_seed=0" / "report.json").stat().st_mtime_ns
    again = _sweep_cli(path, out)
    assert "already done" in again.stdout
    assert (out / "fgsm_seed=0" / "report.json").stat().st_mtime_ns == mtime, "not re-run"
    skipped = {r["name"]: r.get("skipped") for r in
               json.loads((out / "sweep.json").read_text())["children"]}
    assert skipped["fgsm_seed=0"] and skipped["fgsm_seed=1"]

    other = tmp_path / "other.yaml"  # a second sweep into the same folder shares its table
    other.write_text(yaml.safe_dump({"base": BASE, "grid": {"schedule.seed": [7]}}))
    assert _sweep_cli(other, out).returncode == 0
    names = [r["name"] for r in json.loads((out / "sweep.json").read_text())["children"]]
    assert names == ["fgsm_seed=0", "fgsm_seed=1", "bad_seed=0", "bad_seed=1", "seed=7"]
    changed = tmp_path / "changed.yaml"  # same child name, another spec: never reused
    changed.write_text(yaml.safe_dump({"base": {**BASE, "schedule": {**BASE["schedule"],
                                                                     "epochs": 1}},
                                       "grid": {"schedule.seed": [7]}}))
    proc = _sweep_cli(changed, out)
    assert proc.returncode == 1 and "holds a finished run of another spec" in proc.stdout

    cmp = subprocess.run([*CLI, "compare", str(out),
                          "--json", str(tmp_path / "cmp.json")], capture_output=True,
                         text=True, cwd=REPO, timeout=60)
    assert cmp.returncode == 0, cmp.stderr
    runs = json.loads((tmp_path / "cmp.json").read_text())["runs"]
    done = {r["name"]: r for r in runs if r["state"] == "succeeded"}
    assert set(done) == {"fgsm_seed=0", "fgsm_seed=1", "seed=7"}
    report = json.loads((out / "seed=7" / "report.json").read_text())
    assert done["seed=7"]["clean_acc"] == report["final"]["clean_acc"]
    assert done["seed=7"]["monitor_pgd"] == [round(h["monitor"]["pgd_acc"], 3)
                                             for h in report["history"]]
    assert cmp.stdout.splitlines()[0].split()[:3] == ["child", "state", "clean"]
    page = (out / "compare.html").read_text()  # written beside the runs by default
    assert page.count("<img") == 3 and "data:image/svg+xml;base64," in page
    groups = json.loads((out / "compare.json").read_text())["groups"]
    assert [(g["method"], g["n"]) for g in groups] == [("fgsm", 3)]

    # `bulwark run` folders: each is a run of its own, its method named after its folder
    two = tmp_path / "two"
    cmp = subprocess.run([*CLI, "compare",
                          str(out / "seed=7"), str(out / "fgsm_seed=0"), "--out", str(two)],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert cmp.returncode == 0, cmp.stderr
    compared = json.loads((two / "compare.json").read_text())
    assert [(g["method"], g["n"]) for g in compared["groups"]] == [("seed=7", 1),
                                                                  ("fgsm_seed=0", 1)]
    assert {r["name"]: r["clean_acc"] for r in compared["runs"]}["seed=7"] == \
        report["final"]["clean_acc"]
    assert [ln.split()[0] for ln in cmp.stdout.splitlines()[1:3]] == ["seed=7", "fgsm_seed=0"]


def test_compare_groups_runs_by_method_and_epsilon_with_mean_and_std():
    from bulwark.contract.compare import groups, render

    def run(name, variant, eps, seed, pgd, co=(), end=False):
        return {"name": name, "overrides": {"variant": variant}, "state": "succeeded",
                "epsilon": eps, "seed": seed, "clean_acc": 0.9, "pgd_acc": pgd,
                "autoattack_acc": None, "seconds_per_epoch": 10.0 + seed,
                "train_seconds": 100.0 + 10 * seed,
                "co_epochs": list(co), "co_at_end": end}

    rows = [run("a0", "a", 0.1, 0, 0.5), run("a1", "a", 0.1, 1, 0.7, co=[2]),
            run("b0", "b", 0.1, 0, 0.2, co=[1], end=True), run("a2", "a", 0.3, 0, 0.1),
            {"name": "x", "state": "failed", "error": "<boom>"}]
    g = {(x["method"], x["epsilon"]): x for x in groups(rows)}
    assert set(g) == {("a", 0.1), ("b", 0.1), ("a", 0.3)}
    a = g[("a", 0.1)]
    assert a["n"] == 2 and a["pgd_acc"] == pytest.approx(0.6)
    assert a["pgd_acc_std"] == pytest.approx(0.1414213562, rel=1e-6)  # sample std of 0.5, 0.7
    assert a["co_runs"] == 1 and a["seconds_per_epoch"] == pytest.approx(10.5)
    assert a["co_end_runs"] == 0, "a1 recovered from its episode"
    assert (g[("b", 0.1)]["co_runs"], g[("b", 0.1)]["co_end_runs"]) == (1, 1)
    assert g[("b", 0.1)]["pgd_acc_std"] == 0.0 and g[("a", 0.3)]["seeds"] == [0]
    from bulwark.contract.compare import markdown
    md = markdown(rows).splitlines()
    assert md[0].startswith("| method | ε | runs |") and len(md) == 2 + 3
    assert md[2] == ("| a | 0.10 | 2 | 0.900 | 0.600 ± 0.141 | 0.500 / 0.700 | – | 1 / 2 | "
                     "0 / 2 | 10.5 ± 0.7 | 105 ± 7 |"), md[2]
    assert [(x["method"], x["epsilon"]) for x in groups(rows)] == [
        ("a", 0.1), ("a", 0.3), ("b", 0.1)], "methods in first-seen order, each by ε"
    from bulwark.contract.compare import epsilon_markdown
    assert epsilon_markdown(rows).splitlines() == [
        "| method | ε = 0.1 | ε = 0.3 |", "|---|---|---|",
        "| a | 0.600 ± 0.141 (2 runs) | 0.100 |", "| b | 0.200 CO | – |"]
    assert epsilon_markdown([r for r in rows if r.get("epsilon") != 0.3]) == "", "one ε: no grid"
    from bulwark.contract.compare import cost_groups
    eps, drawn = cost_groups(groups(rows))
    assert eps == 0.1 and [g["method"] for g in drawn] == ["a", "b"], "the ε most methods ran"
    assert drawn[0]["seconds_per_epoch"] == pytest.approx(10.5)
    page = render(rows, "t")
    assert "&lt;boom&gt;" in page and "<boom>" not in page, "run text is escaped"
    assert page.count("<img") == 3
    assert "PGD accuracy against ε" in page and "<td class='co'>0.200 CO</td>" in page


def test_compare_keeps_runs_apart_that_differ_in_a_grid_field_beyond_seed_and_epsilon():
    """A grid over `evaluation.final.models` (or a training radius, a learning rate) makes
    another method: the same variant's runs are not averaged across it."""
    from bulwark.contract.compare import groups

    def run(name, seed, pgd, **grid):
        return {"name": name, "state": "succeeded", "epsilon": 0.3, "seed": seed,
                "pgd_acc": pgd, "co_epochs": [], "co_at_end": False,
                "overrides": {"variant": "aaer", **grid, "schedule.seed": seed,
                              "threat.epsilon": 0.3}}

    rows = [run("l0", 0, 0.9), run("l1", 1, 0.6),
            run("b0", 0, 0.9, **{"evaluation.final.models": ["best"]}),
            run("b1", 1, 0.88, **{"evaluation.final.models": ["best"]}),
            run("r1", 1, 0.5, **{"threat.train_epsilon": 0.36,
                                 "schedule.lr.lr_max": 0.002})]
    got = {g["method"]: (g["runs"], round(g["pgd_acc"], 3)) for g in groups(rows)}
    assert got == {"aaer": (["l0", "l1"], 0.75), "aaer models=best": (["b0", "b1"], 0.89),
                   "aaer train_epsilon=0.36 lr_max=0.002": (["r1"], 0.5)}
    preset_grid = {"name": "p", "state": "succeeded", "epsilon": 0.1, "seed": 0,
                   "pgd_acc": 0.4, "preset": "fgsm",
                   "overrides": {"recipe.preset": "fgsm", "schedule.seed": 0}}
    assert [g["method"] for g in groups([preset_grid])] == ["fgsm"]


def test_compare_pools_only_runs_whose_specs_differ_in_the_seed_alone():
    """The dashboard's "Compare selected" of the issue: a 20 000-image 5-epoch job and a
    3 000-image 4-epoch job of one preset were pooled as two seeds ("PGD 0.428 ± 0.502", an
    error bar below 0). Jobs carry no sweep overrides there; their specs decide."""
    from bulwark.contract.compare import bounded, groups, render
    from bulwark.contract.sweep import pool_key

    def job(name, seed, pgd, train_limit, epochs):
        spec = {"name": name, "recipe": "n-aaer", "dataset": {"name": "digits",
                                                              "train_limit": train_limit},
                "schedule": {"epochs": epochs, "seed": seed}}
        return {"name": name, "state": "succeeded", "epsilon": 0.1, "seed": seed,
                "preset": "n-aaer", "clean_acc": 0.9, "pgd_acc": pgd, "co_epochs": [],
                "co_at_end": False, "pool": pool_key(spec), "spec": spec}

    big, small = job("big", 0, 0.783, 20000, 5), job("small", 0, 0.073, 3000, 4)
    got = {g["method"]: (g["runs"], g["pgd_acc_std"]) for g in groups([big, small])}
    assert got == {"n-aaer train_limit=20000 epochs=5": (["big"], 0.0),
                   "n-aaer train_limit=3000 epochs=4": (["small"], 0.0)}, got
    seeds = [job("s0", 0, 0.6, 20000, 5), job("s1", 1, 0.7, 20000, 5)]
    assert pool_key(seeds[0]["spec"]) == pool_key(seeds[1]["spec"]), "the seed alone: pooled"
    (g,) = groups(seeds)
    assert g["method"] == "n-aaer" and g["n"] == 2
    assert bounded(0.428, 0.502) == (0.428, 0.502), "the issue's bar: cut at 0 below"
    assert bounded(0.9, 0.3) == (0.3, pytest.approx(0.1)), "cut at 1 above"
    assert bounded(10.0, 3.0, top=None) == (3.0, 3.0), "seconds: no top"
    page = render([big, small], "t")
    assert "train_limit=3000 epochs=4" in page and "± " not in page.split("<h2>")[0].split(
        "<table>")[1], "one run a row: no ± drawn"


def test_compare_lists_runs_whose_attacks_disagree():
    """headline() carries the final suite's attack checks; compare's Markdown and page list
    them under the tables (the GPU study's GradAlign at ε = 0.2: PGD 0.862, APGD 0.000)."""
    from bulwark.contract.compare import markdown, render
    from bulwark.contract.sweep import headline

    def rep(pgd, aa):
        return report_doc(final={"clean_acc": 0.91, "n": 100, "attacks": {
            "fgsm": {"acc": 0.89, "n": 100}, "pgd50-10": {"acc": pgd, "n": 100},
            "autoattack-apgd-ce+apgd-t": {"acc": aa, "n": 100}}},
            spec={"recipe": {"preset": "fgsm-gradalign"}, "threat": {"epsilon": 0.2}})

    rows = [{"name": "masked", "state": "succeeded", **headline(rep(0.862, 0.0))},
            {"name": "fine", "state": "succeeded", **headline(rep(0.862, 0.85))}]
    assert rows[1]["warnings"] == [] and len(rows[0]["warnings"]) == 1
    md = markdown(rows)
    assert "- masked: AutoAttack finds 86.2 points more than pgd50-10" in md
    assert "- fine:" not in md
    page = render(rows, "t")
    assert "Attacks that disagree" in page and page.count("<li class='co'>") == 1
    with pytest.raises(ValueError, match="clean_acc"):  # malformed: said so, not half-read
        headline({"final": {"attacks": {}}, "spec": {}})


def test_a_sweep_file_names_its_own_folder(tmp_path):
    """`out` in the file: `bulwark sweep FILE` writes the children beside it, and a finished
    child of another spec there is reported, not overwritten; without one, runs/<stem>."""
    study = tmp_path / "study"
    study.mkdir()
    path = study / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": BASE, "grid": {"schedule.seed": [0]},
                                    "out": "runs"}))
    proc = subprocess.run([*CLI, "sweep", str(path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (study / "runs" / "seed=0" / "report.json").is_file()
    assert (study / "runs" / "sweep.json").is_file()
    path.write_text(yaml.safe_dump({"base": {**BASE, "recipe": "fgsm-rs"},
                                    "grid": {"schedule.seed": [0]}, "out": "runs"}))
    proc = subprocess.run([*CLI, "sweep", str(path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 1 and "finished run of another spec" in proc.stdout
    # no `out` and no --out: runs/<the file's stem> under the working directory, as `bulwark run`
    path.write_text(yaml.safe_dump({"base": BASE}))
    proc = subprocess.run([*CLI, "sweep", str(path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"in {Path('runs') / 'sweep'}" in proc.stdout
    assert (tmp_path / "runs" / "sweep" / "base" / "report.json").is_file()


def test_dry_run_lists_children(tmp_path):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"base": BASE, "grid": {"threat.norm": ["Linf", "L2"]}}))
    proc = _sweep_cli(path, tmp_path / "x", "--dry-run")
    assert proc.returncode == 0 and proc.stdout.split() == ["norm=Linf", "norm=L2", "2",
                                                             "children"]
    assert not (tmp_path / "x").exists()


def test_sigterm_stops_the_sweep_and_its_children_and_keeps_checkpoints(tmp_path):
    import os
    import signal
    import time

    base = {**BASE, "schedule": {**BASE["schedule"], "epochs": 40}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": base, "grid": {"schedule.seed": [0, 1, 2]}}))
    out = tmp_path / "runs"
    proc = subprocess.Popen([*CLI, "sweep", str(path),
                             "--out", str(out), "--parallel", "2"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "seed=0" / "checkpoint.pt").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # as `kill` or a scheduler stops it (Ctrl-C alike)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "run the same command again to resume" in err
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout
    assert left.strip() == "", "no child outlives the sweep"
    assert not (out / "seed=2").exists(), "no new child started after Ctrl-C"
    ckpt = torch.load(out / "seed=0" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] >= 1
    assert os.path.exists(out / "seed=0" / "spec.json")


def test_only_runs_the_matching_children(tmp_path):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"base": BASE, "grid": {"threat.norm": ["Linf", "L2"],
                                                       "schedule.seed": [0, 1]}}))
    proc = _sweep_cli(path, tmp_path / "x", "--dry-run", "--only", "*seed=1", "--only",
                      "norm=L2_seed=0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["norm=Linf_seed=1", "norm=L2_seed=0", "norm=L2_seed=1", "3",
                                   "children"]
    proc = _sweep_cli(path, tmp_path / "x", "--dry-run", "--only", "nothing*")
    assert proc.returncode == 2 and "matches none of the 4 children" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_seconds_per_epoch_is_the_ordinary_epochs_cost():
    """A run paused for a while (SIGSTOP while the machine ran a test suite) or starved by a
    neighbour in one epoch keeps the seconds of its ordinary epochs."""
    from bulwark.contract.sweep import headline

    def report(seconds):
        return report_doc(history=[history_row(i + 1, train_seconds=s)
                                   for i, s in enumerate(seconds)])

    assert headline(report([15.0, 14.0, 16.0, 15.5, 1438.0]))["seconds_per_epoch"] == 15.5
    assert headline(report([10.0, 12.0]))["seconds_per_epoch"] == 11.0
    assert headline(report([]))["seconds_per_epoch"] is None
    # training seconds on the same terms: the ordinary epoch × the epochs run
    assert headline(report([15.0, 14.0, 16.0, 15.5, 1438.0]))["train_seconds"] == 15.5 * 5
    assert headline(report([10.0, 12.0]))["train_seconds"] == 22.0
    assert headline(report([]))["train_seconds"] is None
