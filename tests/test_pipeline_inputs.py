"""User text never reaches the shell: a variant name from params.yaml (a file pulled from a
colleague's experiment) names DVC stages and paths, but the stage commands do not contain it, so
a name like `x;touch FILE;` runs nothing and is refused in one line by the first stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import DVC, pipeline_env, pipeline_repo, sh, tiny_params

pytestmark = pytest.mark.slow  # subprocess pipelines (README, Tests)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict, dict]:
    p = tiny_params()
    p["variants"] = {"simple": p["variants"]["simple"]}
    env = pipeline_env()
    root = pipeline_repo(tmp_path_factory.mktemp("inputs"), p, env)
    sh([DVC, "repro", "prepare"], root, env)  # up to date: the variant's stages run first
    return root, env, p


@pytest.mark.parametrize("name", ["x;touch FILE;", "a b", "$(touch FILE)", "`touch FILE`"])
def test_a_variant_name_runs_no_command_and_is_one_line_naming_it(repo, name):
    root, env, good = repo
    (root / "FILE").unlink(missing_ok=True)
    bad = {**good, "variants": {name: good["variants"]["simple"]}}
    (root / "params.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
    try:
        r = sh([DVC, "repro"], root, env, ok=False, timeout=300)
    finally:
        (root / "params.yaml").write_text(yaml.safe_dump(good, sort_keys=False))
    assert r.returncode != 0
    assert not (root / "FILE").exists(), "a command from the variant name ran"
    out = r.stdout + r.stderr
    errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert errors == [f"error: variants.{name}: a variant name must be letters, digits, '-' or "
                      "'_' (it names the DVC stages and files)"], out
    assert "Traceback" not in out


def test_a_symlinked_data_file_under_data_raw_is_a_real_dependency(repo, tmp_path):
    # why a symlinked file under data/raw is accepted: DVC hashes its content
    import numpy as np

    root, env, good = repo
    target = tmp_path / "x.npz"
    rng = np.random.default_rng(0)
    np.savez(target, images=rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8))
    link = root / "data" / "raw" / "x.npz"
    link.symlink_to(target)
    p = {**good, "data": {**good["data"], "dataset": "npz", "path": "data/raw/x.npz"}}
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    try:
        sh([DVC, "repro", "prepare"], root, env)
        assert "up to date" in sh([DVC, "status", "prepare"], root, env).stdout
        np.savez(target, images=rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8))
        status = sh([DVC, "status", "prepare"], root, env).stdout
        assert "modified" in status and "data/raw" in status, status
    finally:
        link.unlink()
        (root / "params.yaml").write_text(yaml.safe_dump(good, sort_keys=False))
        sh([DVC, "repro", "prepare"], root, env)
