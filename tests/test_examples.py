"""Every shipped example and study file is a valid spec (or sweep) whose data is found."""

from __future__ import annotations

from pathlib import Path

import pytest

from bulwark.contract.spec import load_spec_file
from bulwark.contract.sweep import expand, load_sweep, sweep_out
from bulwark.workers.engine.data import locate_dataset

pytestmark = pytest.mark.training  # trains real models: not in the fast lane

REPO = Path(__file__).resolve().parents[1]
def _is_sweep(path: Path) -> bool:
    import yaml

    return "base" in (yaml.safe_load(path.read_text()) or {})


STUDY_FILES = sorted((REPO / "experiments").rglob("*.yaml"))
SWEEPS = [p for p in STUDY_FILES if _is_sweep(p)]
SPECS = sorted((REPO / "examples").rglob("*.yaml")) + [p for p in STUDY_FILES
                                                       if not _is_sweep(p)]


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(REPO)))
def test_example_spec_is_valid_and_its_data_is_there(path, monkeypatch, tmp_path):
    monkeypatch.delenv("BULWARK_DATA_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./data: found in the repository's own data/
    spec = load_spec_file(str(path))
    assert "nowhere" not in locate_dataset(spec.dataset)
    assert not spec.dataset.download, "examples never download"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: str(p.relative_to(REPO)))
def test_study_sweep_expands(path):
    children = expand(load_sweep(path))
    assert children and len({c.name for c in children}) == len(children)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: str(p.relative_to(REPO)))
def test_a_studys_committed_runs_are_its_sweep_files_children(path):
    """Every finished run under a sweep's `out` is the spec the file gives that child today:
    a preset value changed since is caught here, not by the next `bulwark sweep` (which would
    refuse the folder)."""
    import json

    from bulwark.contract.spec import same_spec
    from bulwark.contract.sweep import sweep_out

    sweep = load_sweep(path)
    out = sweep_out(path, sweep)
    assert out is not None, f"{path.name}: name the folder of its runs (out:)"
    for child in expand(sweep):
        report = out / child.name / "report.json"
        if report.is_file():
            ran = json.loads(report.read_text())["spec"]
            assert same_spec(ran, child.spec.model_dump(mode="json")), child.name


def test_the_quick_start_jobs_differ_only_in_the_recipe():
    a = load_spec_file(str(REPO / "examples/quickstart/mnist-fgsm.yaml")).model_dump()
    for other in ("mnist-fgsm-elle-a", "mnist-fgsm-rs"):
        b = load_spec_file(str(REPO / f"examples/quickstart/{other}.yaml")).model_dump()
        assert {k for k in a if a[k] != b[k]} == {"name", "recipe"}, other


def _is_the_measured_child(example: str, sweep: str, child: str):
    """The shipped spec REPO/example, after asserting that it is (its name aside) the child
    `child` of the study file REPO/sweep whose committed results the docs quote for it."""
    from bulwark.contract.spec import same_spec

    children = {c.name: c.spec for c in expand(load_sweep(REPO / sweep))}
    shipped = load_spec_file(str(REPO / example))
    assert same_spec(shipped.model_dump(mode="json"),
                     children[child].model_dump(mode="json")), example
    return shipped


def test_the_shipped_quick_start_is_the_spec_the_study_measured():
    """examples/quickstart/*.yaml are exactly (names aside) the children of
    experiments/quickstart/published.yaml whose results the README and the examples quote."""
    for example, child in (("mnist-fgsm", "fgsm_seed=0"), ("mnist-fgsm-rs", "fgsm-rs_seed=0"),
                           ("mnist-fgsm-elle-a", "fgsm-elle-a_seed=0")):
        _is_the_measured_child(f"examples/quickstart/{example}.yaml",
                               "experiments/quickstart/published.yaml", child)


def test_the_margin_example_is_the_spec_the_margin_study_measured():
    """examples/mnist-fgsm-rs-margin.yaml is (its name aside) the mnist-margin child whose
    test-set figures docs/experiments.md quotes for it (the recipe chosen on validation)."""
    shipped = _is_the_measured_child("examples/mnist-fgsm-rs-margin.yaml",
                                     "experiments/mnist-margin/margin.yaml",
                                     "fgsm-rs-margin_seed=0")
    assert shipped.threat.training_epsilon == 0.40 and shipped.threat.epsilon == 0.3


def test_the_early_stopping_example_is_the_spec_the_target_study_measured():
    """examples/mnist-rs-aaer-margin-stop.yaml is (its name aside) the mnist-target-stop child
    whose figures docs/experiments.md quotes for the second recipe: AAER on the margin, the
    final suite on the monitor's best epoch."""
    shipped = _is_the_measured_child("examples/mnist-rs-aaer-margin-stop.yaml",
                                     "experiments/mnist-target-stop.yaml",
                                     "rs-aaer-margin-lam0.1_models=best_size=500_"
                                     "masking_gap=None_seed=0")
    assert shipped.evaluation.final.models == ["best"]
    assert shipped.evaluation.monitor.masking_gap is None


def test_the_gpu_runs_are_the_mnist_studys_children_with_a_larger_final_batch():
    """experiments/mnist-gpu/runs holds children of experiments/gpu_study.py: the CPU study's
    specs (mnist.yaml + mnist-seeds.yaml) with only the final suite's attack batch raised."""
    import importlib.util
    import json

    from bulwark.contract.spec import JobSpec, same_spec

    spec = importlib.util.spec_from_file_location("gpu_study", REPO / "experiments/gpu_study.py")
    gpu_study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_study)
    cpu = {c.name: c.spec for f in ("mnist.yaml", "mnist-seeds.yaml")
           for c in expand(load_sweep(REPO / "experiments" / f))}
    reports = sorted((REPO / "experiments/mnist-gpu/runs").glob("*/report.json"))
    assert reports
    for report in reports:
        ran = json.loads(report.read_text())
        name = report.parent.name
        assert name in cpu, name
        assert ran["environment"]["device"] == "cuda", name
        batch = ran["spec"]["evaluation"]["final"]["batch_size"]
        assert batch != cpu[name].evaluation.final.batch_size, name
        expected = cpu[name].model_dump(mode="json")
        expected["evaluation"]["final"]["batch_size"] = batch
        assert same_spec(ran["spec"], JobSpec.model_validate(expected).model_dump(mode="json"))
    assert gpu_study.gpu_sweep("mnist.yaml", 2500)["base"]["evaluation"]["final"][
        "batch_size"] == 2500


DOC_PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
             *sorted((REPO / "experiments").rglob("README.md"))]
# a repository path written in prose or code: examples/…, experiments/…, docs/…, bench/…, scripts/…
_REPO_PATH = r"(?<![\w/.-])((?:examples|experiments|docs|bench|scripts)/[\w./+=-]*\w)"


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_docs_name_only_files_that_exist(page):
    """Every relative link and every examples/, experiments/, docs/, bench/ or scripts/ path a
    page names is in the repository (a line that is a `python …` command is skipped: its
    arguments include the files it writes)."""
    import re

    text = page.read_text()
    missing = []
    for m in re.finditer(r"\]\(([^)#\s]+)", text):
        if not m.group(1).startswith(("http://", "https://", "mailto:")) and \
                not (page.parent / m.group(1)).exists():
            missing.append(m.group(1))
    for line in text.splitlines():
        if line.lstrip().startswith("python "):  # a command's arguments: its output paths
            continue
        for m in re.finditer(_REPO_PATH, line):
            path = m.group(1)
            if not any(c in path for c in "*<") and not (REPO / path).exists() \
                    and not (page.parent / path).exists():
                missing.append(path)
    assert not missing, f"{page.relative_to(REPO)} names files that do not exist: {missing}"


VERDICT_LINE = r"^# Verdict: (\w+)"
# the shipped MNIST examples' verdicts, read from the committed runs that measured them (each
# the same spec as the example, checked above): 10-17 epochs of MNIST are a study's, not a
# test's; the digits examples run here
MEASURED = {
    "examples/quickstart/mnist-fgsm.yaml": ("experiments/quickstart/published.yaml",
                                            "fgsm_seed="),
    "examples/quickstart/mnist-fgsm-rs.yaml": ("experiments/quickstart/published.yaml",
                                               "fgsm-rs_seed="),
    "examples/quickstart/mnist-fgsm-elle-a.yaml": ("experiments/quickstart/published.yaml",
                                                   "fgsm-elle-a_seed="),
    "examples/mnist-fgsm-rs-margin.yaml": ("experiments/mnist-margin/margin.yaml",
                                           "fgsm-rs-margin_seed="),
    "examples/mnist-rs-aaer-margin-stop.yaml": ("experiments/mnist-target-stop.yaml",
                                                "rs-aaer-margin-lam0.1_models=best_size=500"),
}
EXAMPLES = sorted((REPO / "examples").rglob("*.yaml"))


def stated_verdict(path: Path) -> str:
    import re

    from bulwark.contract.verdict import LABELS

    found = re.search(VERDICT_LINE, path.read_text(), re.MULTILINE)
    assert found, f"{path.relative_to(REPO)} states no '# Verdict: <label>' line"
    assert found.group(1) in LABELS, found.group(1)
    return found.group(1)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_example_states_the_verdict_it_produces(path, tmp_path):
    """Each example says what it makes; the digits ones are run here (CPU-sized, ~25 s), the
    MNIST ones are judged by every committed run of their exact spec."""
    import json

    from bulwark.contract.sweep import pool_key
    from bulwark.contract.verdict import verdict

    stated = stated_verdict(path)
    rel = str(path.relative_to(REPO))
    if rel in MEASURED:
        sweep, prefix = MEASURED[rel]
        out = sweep_out(REPO / sweep, load_sweep(REPO / sweep))
        shipped = load_spec_file(str(path)).model_dump(mode="json")
        runs = [json.loads(p.read_text()) for p in sorted(out.glob(f"{prefix}*/report.json"))]
        runs = [r for r in runs if pool_key(r["spec"]) == pool_key(shipped)]  # any seed
        assert len(runs) >= 3, rel
        assert {verdict(r)["label"] for r in runs} == {stated}, rel
        return
    from bulwark.workers.engine.runner import run_job

    report = run_job(load_spec_file(str(path)), tmp_path, progress=False)
    assert report["verdict"]["label"] == stated, report["verdict"]


def test_the_dashboards_default_form_makes_a_robust_model():
    """The dashboard's form as it loads (service/ui: digits, ε 0.1, preset n-aaer, no epochs:
    the preset's) is the spec of experiments/digits-smoke/form-default.yaml, whose every
    committed seed is robust (it submitted 1 epoch and ended at chance before)."""
    import json
    import re

    from bulwark.contract.spec import JobSpec
    from bulwark.contract.sweep import pool_key
    from bulwark.contract.verdict import verdict

    ui = (REPO / "service/ui/index.html").read_text()
    dataset = re.search(r"<option selected>(\w+)</option>", ui).group(1)
    epsilon = re.search(r'id="epsilon" value="([^"]+)"', ui).group(1)
    assert 'id="epochs" type="number" min="1" value=""' in ui, "epochs: the preset's"
    preset = re.search(r'o.selected = n === "([\w-]+)"',
                       (REPO / "service/ui/app.js").read_text()).group(1)
    form = JobSpec.model_validate({"dataset": {"name": dataset}, "recipe": preset,
                                   "threat": {"epsilon": epsilon}}).model_dump(mode="json")
    runs = [json.loads(p.read_text()) for p in sorted(
        (REPO / "experiments/digits-smoke/form-default-runs").glob("*/report.json"))]
    assert len(runs) == 3 and all(pool_key(r["spec"]) == pool_key(form) for r in runs)
    assert {verdict(r)["label"] for r in runs} == {"robust"}
