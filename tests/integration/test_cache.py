"""Several processes on one node converting the bundled model at once (Ray workers
starting together) leave one valid cache, built once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow

WORKER = """
import os, sys, time
from pathlib import Path
from fedpeft import models
from fedpeft.models import ModelConfig

cache, log, start = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
real = models._convert_smollm2

def counted(gguf, out):
    with log.open("a") as fh:
        fh.write(f"{os.getpid()}\\n")
    real(gguf, out)

models._convert_smollm2 = counted
while time.time() < start:  # every process reaches the cache at the same moment
    time.sleep(0.01)
print(models._smollm2_dir(ModelConfig(name="smollm2-135m", cache_dir=cache)))
"""


def test_concurrent_conversions_leave_one_valid_cache(tmp_path: Path) -> None:
    cache, log, n = tmp_path / "cache", tmp_path / "builds.txt", 4
    start = time.time() + 25  # after every interpreter has imported torch and transformers
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(cache), str(log), str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    outs = [p.communicate(timeout=600) for p in procs]

    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert time.time() > start  # they really did start together
    paths = {o[0].strip().splitlines()[-1] for o in outs}
    target = cache / "models" / "smollm2-135m"
    assert paths == {str(target)}
    assert len(log.read_text().split()) == 1  # one process built it; the others waited
    assert [p.name for p in target.parent.iterdir() if p.is_dir()] == ["smollm2-135m"]
    model = AutoModelForCausalLM.from_pretrained(target)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
