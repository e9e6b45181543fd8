"""The three fuzz targets of fuzz/ run for a few seconds each, as the suite's smoke run.

Each target runs as its own process (atheris/libFuzzer owns the process: it
exits on the first crash, leak or hang) for ``SECONDS`` with a fixed seed,
starting from the committed seed corpus copied to a scratch directory (the
run adds inputs to its first corpus directory; the repository's stays as
committed).  A finding makes libFuzzer exit non-zero and write the input
as ``crash-*``/``timeout-*`` — the test fails naming it; fuzz/README.md says
how to turn it into a regression test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["codec", "session", "ring"]
SECONDS = 10
SEED = 20261201

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_runs_clean(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(ROOT / "fuzz" / "corpus" / target, corpus)
    seeds = len(list(corpus.iterdir()))
    env = dict(os.environ, PYVIRTIO_PURE_PYTHON="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / f"fuzz_{target}.py"), f"-seed={SEED}",
         f"-max_total_time={SECONDS}", "-timeout=20", "-rss_limit_mb=2048",
         f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    tail = "\n".join(proc.stderr.splitlines()[-30:])
    artifacts = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert proc.returncode == 0 and not artifacts, f"{target}: {artifacts}\n{tail}"
    done = re.search(r"^Done (\d+) runs in \d+ second", proc.stderr, re.M)
    assert done is not None, tail
    assert int(done.group(1)) > seeds  # it fuzzed, beyond replaying the seeds
    assert re.search(r"cov: (\d+)", proc.stderr) is not None  # coverage reached it
