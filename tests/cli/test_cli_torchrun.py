"""``torchrun --nproc-per-node 2 -m eva init ...``: two gloo ranks on this CPU share the lines,
compute together, and rank 0 alone prints and writes one result that used every token once."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch.distributed as dist

import eva
from eva.cli.text_data import bundled_calibration_path, bundled_model_path, read_lines

pytestmark = [pytest.mark.distributed, pytest.mark.filterwarnings("ignore:EVA stopped:UserWarning")]

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

COMMON = ["--target-modules", "query,value", "--rank", "2", "--tau", "1.0", "--batch-size", "4", "--max-length", "24", "--device",
          "cpu", "--quiet"]


@pytest.fixture(scope="module")
def lines_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text("\n".join(read_lines(bundled_calibration_path())[:22]) + "\n", encoding="utf-8")
    return path


def test_torchrun_two_ranks_write_one_result_from_every_token(tmp_path, lines_file):
    out = tmp_path / "dist.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "eva", "init",
         "--model", bundled_model_path(), "--data", str(lines_file), "--out", str(out), *COMMON],
        capture_output=True, text=True, timeout=180, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1 and proc.stdout.count("total rank") == 1  # rank 0 alone
    assert "22 lines dealt to 2 ranks" in proc.stdout
    assert "gather_distributed_inputs" not in proc.stdout + proc.stderr  # an option the CLI does not have
    assert "2 ranks:" in proc.stdout and "all-reducing the statistics would be" in proc.stdout
    sd = eva.load_eva_state_dict(str(out))
    run = sd.metadata["run"]
    assert run["distributed"] and run["communication"]["bytes_total"] > 0
    # every line on exactly one rank: the tokens equal a one-process run on all the lines
    single = tmp_path / "single.safetensors"
    from eva.cli import main
    assert main(["init", "--model", bundled_model_path(), "--data", str(lines_file), "--out", str(single),
                 *COMMON]) == 0
    ref = eva.load_eva_state_dict(str(single))
    for name, info in sd.metadata["layers"].items():
        assert info["tokens"] == ref.metadata["layers"][name]["tokens"], name
