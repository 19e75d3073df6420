"""dvc.yaml cannot go stale: every stage depends on the whole library and on every pipeline file
its script imports (transitively), every output is in DVC's cache (so the run cache can restore
any stage and `dvc checkout` can undo a failed repro), per-variant stages read only their own
variant's params, and DVC never hashes byte code."""

from __future__ import annotations

import ast

import pytest
import yaml
from helpers import REPO

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = {name: st.get("do", st) for name, st in DVC["stages"].items()}


def pipeline_imports(module: str) -> set[str]:
    """pipeline/<module>.py and every pipeline file it imports, transitively (any scope)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        tree = ast.parse((REPO / "pipeline" / f"{mod}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
                todo.append(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                todo += [a.name.split(".")[1] for a in node.names
                         if a.name.startswith("pipeline.")]
    return {f"pipeline/{m}.py" for m in seen}


def test_the_import_walk_finds_what_it_must():
    # a direct check of the helper on a module with known imports (function-local ones too)
    assert {"pipeline/train.py", "pipeline/common.py", "pipeline/records.py",
            "pipeline/tracking.py"} <= pipeline_imports("train")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_depends_on_the_library_and_every_pipeline_file_it_imports(stage):
    st = STAGES[stage]
    script = st["cmd"].split()[2]
    assert st["cmd"].startswith("python3 pipeline/run.py ") and script == stage
    deps = set(st["deps"])
    assert "ddpm_core" in deps, f"{stage} must depend on the whole library"
    missing = (pipeline_imports(stage) | {"pipeline/run.py"}) - deps
    assert not missing, f"{stage}: dvc.yaml deps lack {sorted(missing)}"


def test_every_output_is_cached_and_nothing_persists():
    for name, st in STAGES.items():
        for key in ("outs", "metrics", "plots"):
            for out in st.get(key, []):
                if isinstance(out, dict):
                    (path, opts), = out.items()
                    assert opts.get("cache", True) and not opts.get("persist"), (name, path)
        assert not st.get("always_changed") or name == "track"


def test_per_variant_stages_read_only_their_own_variant():
    for name in ("train", "gamma", "nnhead", "sample", "bpd", "nll", "fid"):
        st = DVC["stages"][name]
        assert st["foreach"] == "${variants}", name
        params = st["do"].get("params", [])
        assert "variants" not in params, f"{name} would re-run when another variant changes"
        assert all(p == "variants.${key}" for p in params if str(p).startswith("variants"))
        assert "${key}" not in st["do"]["cmd"]  # the variant comes from DVC_STAGE


def test_prepare_depends_on_the_raw_data_and_dvc_ignores_byte_code():
    assert "data/raw" in STAGES["prepare"]["deps"]
    assert (REPO / "data" / "raw").is_dir()
    ignored = (REPO / ".dvcignore").read_text().split()
    assert "__pycache__/" in ignored and "*.pyc" in ignored


def test_every_output_lies_in_a_folder_git_ignores():
    # DVC writes a .gitignore into an output's folder unless git already ignores it; those files
    # clutter `git add -A` (and break the folder plots), so .gitignore names every output folder
    import subprocess

    outs = {o if isinstance(o, str) else next(iter(o)) for st in STAGES.values()
            for kind in ("outs", "metrics", "plots") for o in st.get(kind, [])}
    assert outs
    for out in sorted(outs):
        path = out.replace("${key}", "simple")
        path += "" if "." in path.rsplit("/", 1)[-1] else "/"  # a folder output
        r = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO)
        assert r.returncode == 0, f"{path} is not ignored by .gitignore; add its folder"


def test_no_command_holds_text_from_params_yaml():
    # a variant name is text from params.yaml: in a command it would reach the shell
    # (`x;touch FILE`); pipeline/run.py reads a foreach stage's variant from DVC_STAGE instead
    for name, st in STAGES.items():
        assert "${" not in st["cmd"] and "$(" not in st["cmd"], (name, st["cmd"])
        assert st["cmd"] == f"python3 pipeline/run.py {name}", (name, st["cmd"])


def test_run_py_takes_the_variant_from_dvc_stage_or_the_command_line():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run", REPO / "pipeline" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    assert run.stage_args(["train"], "train@x;touch F") == ["x;touch F"]  # one exec argument
    assert run.stage_args(["train"], "sub/dvc.yaml:train@a b") == ["a b"]
    assert run.stage_args(["train", "simple"], "train@vlb") == ["simple"]  # by hand: as given
    assert run.stage_args(["prepare"], "prepare") == []
    assert run.stage_args(["train"], None) == []
    assert run.stage_args(["train"], "gamma@simple") == []  # not this stage's name
