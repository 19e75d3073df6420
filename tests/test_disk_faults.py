"""A full disk (RLIMIT_FSIZE) and a read-only output folder while a stage writes: one line,
a non-zero exit, the earlier outputs intact byte for byte, and no half-written file left."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # subprocess pipelines (README, Tests)

REPO = Path(__file__).resolve().parents[1]
PREPARED = Path("data/prepared")


def _params(split_seed: int) -> str:
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["data"]["split_seed"] = split_seed
    return yaml.safe_dump(p, sort_keys=False)


def _run_prepare(cwd: Path, split_seed: int, preexec=None) -> subprocess.CompletedProcess:
    (cwd / "params.yaml").write_text(_params(split_seed))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DDPM_PARAMS", None)
    return subprocess.run([sys.executable, "-m", "pipeline.prepare"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, preexec_fn=preexec)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "params.yaml"}


@pytest.fixture
def workdir():
    # a folder every user can enter (the read-only case may run as `nobody`)
    d = Path(tempfile.mkdtemp(prefix="ddpm-disk-"))
    d.chmod(0o755)
    yield d
    for p in [d, *d.rglob("*")]:
        if p.is_dir():
            p.chmod(0o755)
    shutil.rmtree(d)


def _assert_one_line_failure(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    for w in words:
        assert w in lines[0], lines[0]


def test_disk_full_while_writing_leaves_the_earlier_split_intact(workdir):
    r = _run_prepare(workdir, 0)
    assert r.returncode == 0, r.stderr
    before = _snapshot(workdir)
    assert "data/prepared/train.npy" in before

    def limit_file_size():  # writes past 64 KiB fail with EFBIG (SIGXFSZ ignored)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    r = _run_prepare(workdir, 1, limit_file_size)
    _assert_one_line_failure(r, "data/prepared", "disk has free space")
    assert _snapshot(workdir) == before, "earlier outputs changed or half-written files left"


def test_read_only_output_folder_is_one_line_and_leaves_the_earlier_split_intact(workdir):
    r = _run_prepare(workdir, 0)
    assert r.returncode == 0, r.stderr
    before = _snapshot(workdir)
    data = workdir / "data"
    if os.geteuid() == 0:  # root ignores file modes: mount the folder read-only instead
        assert shutil.which("unshare"), "util-linux `unshare` is needed to test as root"
        (workdir / "params.yaml").write_text(_params(1))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("DDPM_PARAMS", None)
        r = subprocess.run(
            ["unshare", "-rm", "sh", "-c",
             f'mount --bind -o ro "{data}" "{data}" && exec "{sys.executable}" -m '
             "pipeline.prepare"], cwd=workdir, env=env, capture_output=True, text=True,
            timeout=300)
    else:
        for p in [data, *data.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        r = _run_prepare(workdir, 1)
    _assert_one_line_failure(r, "data/prepared", "writable")
    assert _snapshot(workdir) == before
