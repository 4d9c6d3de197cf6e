"""Tensor parallelism on CUDA (skipped without a device): the same benchmark script the GPU check
runs, on a tiny shape, must give TP2 greedy tokens identical to TP1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tp2_on_cuda_matches_tp1(tmp_path):
    out = tmp_path / "tp.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "tp_decode.py"), "--shape", "tiny", "--device", "cuda"]
    subprocess.run([*argv, "--tp", "1,2", "--steps", "4", "--json", str(out)], check=True, timeout=600)
    results = list(json.loads(out.read_text()).values())
    assert results[0]["tokens"] == results[-1]["tokens"]
