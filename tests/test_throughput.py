"""`fastfit profile` on CPU with the demo models: every section, the ablation table, the JSON fields, a trace."""

import json

import pytest

from fastfit.cli import main
from fastfit.config import load_config
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
                "--ablate",
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
    # On a CPU the speed switches are off already: the ablation says so rather than timing identical runs.
    notes = {row["without"]: row.get("note") for row in report["ablation"]}
    assert notes["bf16 autocast"] == "already off in this config on this device"
    trace = json.loads(open(report["trace"]).read())
    assert report["trace"].startswith(str(tmp_path / "profile_trace")) and trace["traceEvents"]


def test_profile_ablation_times_a_switch_that_is_on(tmp_path):
    cfg = load_config("demo_fmnist_student", [*TINY, f'run.output_dir="{tmp_path}"', "run.channels_last=true"])
    report = profile_throughput(cfg, steps=2, warmup=1, sections=("end_to_end",), ablate=True)
    rows = {row["without"]: row for row in report["ablation"]}
    assert rows["channels-last"]["img_s"] > 0 and "note" not in rows["channels-last"]
    assert rows["torch.compile"]["note"] == "already off in this config on this device"


def test_unknown_section_is_named(capsys):
    assert main(["profile", "--config", "demo_fmnist_student", "--sections", "warp_speed"]) == 2
    assert "unknown profile section 'warp_speed'; choose from naive, end_to_end" in capsys.readouterr().err
