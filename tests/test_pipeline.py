"""`mocobench pipeline`: a shrunken demo end to end, then resume, skip and stage-boundary errors."""
import json
import os

import pytest

from mocobench import pipeline
from mocobench.errors import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "pipeline", "tiny_cpu.yaml")


def run(out, *opts):
    return pipeline.main(["--config-file", TINY, "OUTPUT_DIR", str(out), *opts])


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    assert run(out) == 0
    return out


def test_shrunken_demo_runs_every_stage_and_reports(finished_run):
    out = finished_run
    m = manifest(out)
    names = ["data", "pretrain", "supervised", "convert_moco", "convert_supervised",
             "transfer_moco", "transfer_supervised", "transfer_random", "report"]
    assert list(m["stages"]) == names
    assert all(m["stages"][n]["status"] == "done" for n in names)
    assert m["versions"]["torch"] and "git_commit" in m
    assert m["stages"]["convert_moco"]["outputs"]["verified"] > 0
    assert m["stages"]["convert_supervised"]["outputs"]["source"] == "torchvision"
    pretrain_sha = m["stages"]["convert_moco"]["inputs"]["checkpoint_sha256"]
    assert pretrain_sha == pipeline.sha256(m["stages"]["pretrain"]["outputs"]["checkpoint"])
    report = json.loads((out / "report.json").read_text())
    [table] = report["tables"].values()
    assert list(table["rows"]) == ["random", "supervised", "moco"]
    assert all(table["rows"][i]["cells"]["bbox/AP"]["n"] == 2 for i in table["rows"])  # 2 seeds each
    for init in ("moco", "supervised", "random"):
        seeds = {json.loads((out / "transfer" / init / f"seed{i}" / "results.json").read_text())["seed"]
                 for i in range(2)}
        assert len(seeds) == 2
    md = (out / "report.md").read_text()
    assert "| moco |" in md and "(n=2)" in md
    assert (out / "ap.png").stat().st_size > 0 and (out / "pretrain.png").stat().st_size > 0


def test_rerun_skips_done_stages_and_resumes_an_interrupted_one(finished_run, capsys):
    out = finished_run
    m = manifest(out)
    # interrupt transfer_random: its second seed never finished, the manifest says it was running
    (out / "transfer" / "random" / "seed1" / "results.json").unlink()
    m["stages"]["transfer_random"]["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(m))
    before = {n: s["started"] for n, s in m["stages"].items()}
    assert run(out) == 0
    printed = capsys.readouterr().out
    after = manifest(out)["stages"]
    for name in ("data", "pretrain", "supervised", "convert_moco", "transfer_moco"):
        assert after[name]["started"] == before[name], f"{name} ran again"
        assert f"{name}: done earlier" in printed
    assert after["transfer_random"]["status"] == "done" and "transfer_random (resuming)" in printed
    assert (out / "transfer" / "random" / "seed1" / "results.json").exists()


def test_changed_inputs_are_refused_not_mixed(finished_run):
    with pytest.raises(UsageError, match="stage 'transfer_moco' ran .* with other inputs \\(changed: seeds\\)"):
        run(finished_run, "TRANSFER.SEEDS", "3")


def test_missing_checkpoint_is_caught_at_the_stage_boundary(finished_run, tmp_path):
    m = manifest(finished_run)
    ckpt = m["stages"]["pretrain"]["outputs"]["checkpoint"]
    os.rename(ckpt, ckpt + ".moved")
    try:
        with pytest.raises(UsageError, match="moco checkpoint .* does not exist"):
            run(finished_run)
    finally:
        os.rename(ckpt + ".moved", ckpt)


def test_bad_pipeline_config_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="TRANSFER.INITS"):
        run(tmp_path / "x", "TRANSFER.INITS", "['moco', 'imagenet21k']")
    with pytest.raises(UsageError, match="Non-existent key: TRANSFER.NOPE"):
        run(tmp_path / "x", "TRANSFER.NOPE", "1")
