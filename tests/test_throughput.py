"""`fastfit profile` on CPU with the demo models: every section, the ablation table, the JSON fields, a trace."""

import json

import pytest

from fastfit.cli import main
from fastfit.config import load_config
from fastfit.data.auto import cpus_per_rank
from fastfit.perf.profiler import SECTIONS, profile_throughput

TINY = [
    "data.workers=0",
    "run.progress=false",
    "run.tensorboard=false",
    "run.device=cpu",
    "data.train_subset=256",
    "data.val_subset=64",
    "optim.batch_size=32",
    "model.teacher=wide_cnn",
    "recipe.name=mmrazor",
    'recipe.hints=[{student="stage2", teacher="stage2"}]',
]


@pytest.mark.slow
def test_profile_reports_every_section_with_ratios_and_phases(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert (
        main(
            [
                "profile",
                "--config",
                "demo_fmnist_student",
                *TINY,
                f'run.output_dir="{tmp_path}"',
                "--steps",
                "3",
                "--warmup",
                "1",
                "--ablate-only",
                "bf16 autocast,CUDA graphs,loader threads",
                "--trace-steps",
                "2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    for section in SECTIONS:
        assert section in printed, section
    assert "per-phase (ms/step): teacher_forward" in printed and "sum of parts" in printed
    report = json.loads(out.read_text())
    assert {"gpu", "end_to_end_img_s", "compute_only_img_s", "naive_img_s", "environment"} <= set(report)
    sections = report["sections"]
    assert set(sections) == set(SECTIONS)
    for value in sections.values():
        assert value["img_s"] > 0 and value["x_naive"] == pytest.approx(value["img_s"] / report["naive_img_s"])
    assert 0.0 <= sections["end_to_end"]["loader_wait_fraction"] <= 1.0
    assert {"teacher_forward", "student_forward_losses", "backward", "optimizer"} == set(
        sections["compute_only"]["phases_ms"]
    )
    # On a CPU auto leaves bf16 off, so the ablation times the run with it; what cannot run here says why.
    rows = {row["variant"].removesuffix(" (auto's choice)"): row for row in report["ablation"]}
    assert rows["with bf16 autocast"]["img_s"] > 0
    assert rows["with bf16 autocast"]["x_end_to_end"] == pytest.approx(
        rows["with bf16 autocast"]["img_s"] / report["end_to_end_img_s"]
    )
    assert rows["with CUDA graphs"]["note"] == "needs CUDA"
    # The loader sweep times every thread count and marks the one auto picks (the rank's cores, at most 8).
    share = cpus_per_rank()
    dali = [name for name in rows if name.startswith("dali data.dali_threads=")]
    assert sorted(int(name.rsplit("=", 1)[1]) for name in dali) == sorted(
        {1, max(1, share // 2), share, min(2 * share, 16)}
    )
    assert f"dali data.dali_threads={min(share, 8)} (auto's choice)" in {r["variant"] for r in report["ablation"]}
    assert any(name.startswith("torchvision data.workers=") for name in rows)
    trace = json.loads(open(report["trace"]).read())
    assert report["trace"].startswith(str(tmp_path / "profile_trace")) and trace["traceEvents"]


def test_profile_ablation_times_a_switch_that_is_on(tmp_path):
    cfg = load_config("demo_fmnist_student", [*TINY, f'run.output_dir="{tmp_path}"', "run.channels_last=true"])
    report = profile_throughput(
        cfg, steps=2, warmup=1, sections=("end_to_end",), ablate=("channels-last", "fused optimizer")
    )
    rows = {row["variant"]: row for row in report["ablation"] if "loader" not in row["variant"]}
    assert rows["without channels-last"]["img_s"] > 0 and "note" not in rows["without channels-last"]
    assert "with channels-last" not in rows
    assert rows["with fused optimizer"]["img_s"] > 0  # auto leaves it off on a CPU: timed with it


def test_unknown_section_is_named(capsys):
    assert main(["profile", "--config", "demo_fmnist_student", "--sections", "warp_speed"]) == 2
    assert "unknown profile section 'warp_speed'; choose from naive, end_to_end" in capsys.readouterr().err


def test_unknown_ablation_switch_is_named(capsys):
    assert main(["profile", "--config", "demo_fmnist_student", "--ablate-only", "DALI,warp drive"]) == 2
    err = capsys.readouterr().err
    assert "unknown --ablate switch 'warp drive'" in err and "loader threads" in err
