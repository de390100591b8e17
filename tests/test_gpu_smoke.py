"""benchmarks/gpu_smoke.sh's CPU dry run: every path of the GPU smoke test runs on CPU at tiny sizes
and passes (the script itself is checked where no GPU is)."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ["moco_v2_fp32_tf32_on_cl_on", "moco_v2_fp32_tf32_on_cl_off", "moco_v2_fp32_tf32_off_cl_on",
         "moco_v2_fp32_tf32_off_cl_off", "moco_v3_fp16_lars_b8", "moco_v3_fp16_lars_b16",
         "loader_8_workers", "pretrain_1rank_group", "pretrain_sigterm_resume", "convert", "lincls",
         "voc_r50_c4_extranorm", "coco_eval"]


@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_cpu_dry_run_lists_every_path_with_pass(tmp_path):
    env = {**os.environ, "GPU_SMOKE_CPU": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "GPU_SMOKE_LIMIT_S": "900"}  # a loaded 2-core machine takes 3-8 minutes
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_smoke.sh"),
                           str(tmp_path / "smoke")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=960)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout[proc.stdout.index("=== gpu_smoke summary"):].splitlines()
    verdicts = {line.split()[0]: line.split()[1] for line in summary[1:-1]}
    assert verdicts == {name: "PASS" for name in PATHS}, summary
    assert summary[-1] == "failed paths: 0"
    # --nproc-per-node 1: a gloo group of 1 with DDP, bit for bit the run without a group, each with
    # the 8 iterations its 128 images give at batch 16; v3 with SyncBN under DDP in the group
    smoke = tmp_path / "smoke"
    group_log = open(smoke / "pretrain_1rank_group.log").read()
    assert (f"RESULT compare PASS {smoke}/full vs {smoke}/nogroup (bit for bit): iteration 8 vs 8; "
            "max |difference| optimizer 0, queue 0, state_dict 0; full: world 1, process group "
            "gloo, DDP True; nogroup: world 1, process group none, DDP False\n") in group_log
    assert ("DistributedDataParallel over base_encoder, predictor (process group gloo of 1); 45 "
            "synchronised BN layers") in group_log
    # the resumed run's whole state is the uninterrupted run's
    resume_log = open(smoke / "pretrain_sigterm_resume.log").read()
    assert (f"RESULT compare PASS {smoke}/full vs {smoke}/stopped (bit for bit): iteration 8 vs 8; "
            "max |difference| optimizer 0, queue 0, state_dict 0; full: world 1, process group "
            "gloo, DDP True; stopped: world 1, process group gloo, DDP True\n") in resume_log
