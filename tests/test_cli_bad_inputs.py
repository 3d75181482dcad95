"""Every subcommand against many bad inputs: exit code 2, one message naming the key or the file, no traceback.

Each case fails before any training starts (config and argument checks, or the first file a command opens), so the
whole table runs in-process in seconds. A case that would start training instead is stopped by an alarm and fails.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
import torch
from tiny_runs import write_config

from fastfit.cli import main
from fastfit.engine import checkpoint as ckpt

CHECKPOINT = Path(__file__).parent / "data" / "checkpoint-0.1.0-mmrazor-step3.pt"

# Bad values of config keys, shared by every subcommand that loads a config: (override, text the message names).
BAD_OVERRIDES = [
    ("optim.lr", "optim.lr"),
    ("optim..lr=1", "optim..lr=1"),
    ("=1", "=1"),
    ("optim=1", "optim"),
    ("optim.lr.x=1", "optim.lr"),
    ("optim.lrr=1", "optim.lrr"),
    ('optim.lr="fast"', "optim.lr"),
    ("optim.lr=nan", "optim.lr"),
    ("optim.lr=inf", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("optim.momentum=1", "optim.momentum"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay"),
    ("optim.epochs=0", "optim.epochs"),
    ("optim.epochs=2.5", "optim.epochs"),
    ("optim.gamma=0", "optim.gamma"),
    ("optim.gamma=1.5", "optim.gamma"),
    ("optim.warmup_epochs=500", "optim.warmup_epochs"),
    ("optim.batch_size=-8", "optim.batch_size"),
    ("optim.label_smoothing=1", "optim.label_smoothing"),
    ("optim.milestones=[2, 1]", "optim.milestones"),
    ("optim.milestones=3", "optim.milestones"),
    ("optim.fused=sometimes", "optim.fused"),
    ("data.image_size=0", "data.image_size"),
    ("data.val_resize=-1", "data.val_resize"),
    ("data.rrc_scale=[0, 1]", "data.rrc_scale[0]"),
    ("data.rrc_ratio=[1.5, 0.5]", "data.rrc_ratio"),
    ("data.std=[0.2, 0, 0.2]", "data.std[1]"),
    ("data.mean=[0.5]", "data.mean"),
    ("data.workers=-2", "data.workers"),
    ("data.dali_threads=-1", "data.dali_threads"),
    ("data.dali_hw_decoder_load=1.5", "data.dali_hw_decoder_load"),
    ("data.train_subset=-1", "data.train_subset"),
    ("data.backend=ffcv", "data.backend"),
    ("run.seed=-1", "run.seed"),
    ("run.log_interval=0", "run.log_interval"),
    ("run.eval_every=0", "run.eval_every"),
    ("run.keep_checkpoints=-1", "run.keep_checkpoints"),
    ("run.max_steps_per_epoch=-1", "run.max_steps_per_epoch"),
    ("run.nonfinite_check_every=0", "run.nonfinite_check_every"),
    ("run.device=tpu", "run.device"),
    ("recipe.ce_weight=-1", "recipe.ce_weight"),
    ("recipe.hint_epochs=-1", "recipe.hint_epochs"),
    ("recipe.hint_lr=0", "recipe.hint_lr"),
    ("recipe.name=kd", "recipe.name"),
    ("model.num_classes=0", "model.num_classes"),
    ("model.student=1", "model.student"),
]


def ref(name: str) -> str:
    """A placeholder for the fixture's file `name` in an argv template."""
    return "{" + name + "}"


CONFIGURED = {  # each subcommand that loads a config: its arguments before the overrides ({config} is the file)
    "train": ["train", "--config", "{config}", "{out}"],
    "eval": ["eval", "--config", "{config}", "{out}"],
    "profile": ["profile", "--steps", "1", "--warmup", "0", "--config", "{config}", "{out}"],
    "config": ["config", "show", "{config}", "{out}"],
    "demo": ["demo", "--out", "{tmp}/demo", "--device", "cpu", "--no-progress"],
    "study": ["study", "fmnist", "--out", "{tmp}/study", "--device", "cpu", "--no-progress"],
}
BAD_CONFIG_FILES = ["text", "folder", "not_utf8", "bad_toml", "binary", "missing_toml"]

# Inputs of one subcommand only: (argv, text the message must contain); {name} is a file of the fixture.
OWN_CASES = {
    "train": [
        (["--resume", "{text}"], "{text}"),
        (["--resume", "{binary}"], "{binary}"),
        (["--resume", "{empty}"], "{empty}"),
        (["--resume", "{truncated}"], "{truncated}"),
        (["--resume", "{flipped}"], "{flipped}"),
        (["--resume", "{plain}"], "{plain}"),
        (["--resume", "{a_list}"], "{a_list}"),
        (["--resume", "{folder}"], "{folder}"),
        (["--resume", "{tmp}/gone.pt"], "{tmp}/gone.pt"),
        (['model.student_weights="{text}"'], "{text}"),
        (['model.student_weights="{truncated}"'], "{truncated}"),
        (['model.student_weights="{a_list}"'], "{a_list}"),
        (['model.student_weights="{empty}"'], "{empty}"),
        (['model.teacher_weights="{folder}"'], "{folder}"),
        (['model.teacher_weights="{binary}"'], "{binary}"),
        (['run.output_dir="{text}"'], "{text}"),
        (['run.output_dir="{text}/run"'], "{text}"),
        (["data.dataset=imagefolder", 'data.root="{text}"'], "{text}"),
        (["model.student=no_such_net"], "no_such_net"),
        (["model.teacher_kwargs={{bogus = 1}}"], "bogus"),
        (['run.preemption_signals=["TERM9"]'], "run.preemption_signals"),
    ],
    "eval": [
        (["--weights", "{text}"], "{text}"),
        (["--weights", "{binary}"], "{binary}"),
        (["--weights", "{empty}"], "{empty}"),
        (["--weights", "{truncated}"], "{truncated}"),
        (["--weights", "{a_list}"], "{a_list}"),
        (["--weights", "{folder}"], "{folder}"),
        (["--weights", "{tmp}/gone.pt"], "{tmp}/gone.pt"),
        (["--weights", "{plain}"], "{plain}"),
    ],
    "profile": [
        (["--steps", "0"], "--steps"),
        (["--steps", "x"], "--steps"),
        (["--warmup", "-1"], "--warmup"),
        (["--trace-steps", "-1"], "--trace-steps"),
        (["--stage", "7"], "--stage"),
        (["--sections", "bogus"], "bogus"),
        (["--ablate-only", "nothing"], "nothing"),
        (["--json", "{text}/out.json"], "{text}"),
    ],
    "demo": [
        (["--budget", "huge"], "--budget"),
        (["--device", "tpu"], "--device"),
        (["--out", "{text}"], "{text}"),
        (["recipe.hints=[]"], "recipe"),
    ],
    "study": [
        (["--seeds", "a,b"], "--seeds"),
        (["--seeds", ","], "--seeds"),
        (["--seeds", "-1"], "run.seed"),
        (["--phase", "later"], "--phase"),
        (["--budget", "huge"], "--budget"),
        (["--out", "{text}"], "{text}"),
    ],
}

# Commands without a config: their whole argv.
STANDALONE = {
    "export": [
        *[
            (["export", ref(name), "{tmp}/out.pt"], ref(name))
            for name in (
                "text",
                "binary",
                "empty",
                "truncated",
                "flipped",
                "plain",
                "a_list",
                "folder",
                "not_utf8",
                "bad_toml",
            )
        ],
        *[(["export", ref(f"cut{i}"), "{tmp}/out.pt"], ref(f"cut{i}")) for i in range(12)],
        *[(["export", ref(f"flip{i}"), "{tmp}/out.pt"], ref(f"flip{i}")) for i in range(8)],
        (["export", "{tmp}/gone.pt", "{tmp}/out.pt"], "{tmp}/gone.pt"),
        (["export", "{checkpoint}", "{checkpoint}"], "{checkpoint}"),
        (["export", "{checkpoint}", "{folder}"], "{folder}"),
        (["export", "{checkpoint}", "{text}/student.pt"], "{text}"),
        (["export", "{checkpoint}", "{checksum}"], "would overwrite its input {checkpoint}"),
        (["export", "{checkpoint}"], "output"),
        (["export"], "checkpoint"),
        (["export", "{checkpoint}", "{tmp}/a.pt", "extra"], "extra"),
        (["export", "--bogus", "{checkpoint}", "{tmp}/a.pt"], "--bogus"),
        (["export", "{checkpoint}", ""], "folder"),
        (["export", "{tmp}/checkpoints", "{tmp}/out.pt"], "{tmp}/checkpoints"),
        (["export", "{config}", "{tmp}/out.pt"], "{config}"),
    ],
    "data": [
        (["data"], "data_command"),
        (["data", "bogus"], "bogus"),
        (["data", "check"], "dir"),
        (["data", "check", "{tmp}/gone"], "{tmp}/gone"),
        (["data", "check", "{text}"], "{text}"),
        (["data", "check", "{folder}"], "{folder}"),
        (["data", "check", "{images}", "--workers", "0"], "--workers"),
        (["data", "check", "{images}", "--workers", "-3"], "--workers"),
        (["data", "check", "{images}", "--workers", "x"], "--workers"),
        (["data", "check", "{images}", "--workers", "1.5"], "--workers"),
        (["data", "check", "{images}", "--json", "{folder}"], "{folder}"),
        (["data", "check", "{images}", "--json", "{text}/report.json"], "{text}"),
        (["data", "check", "{images}", "--bogus"], "--bogus"),
        (["data", "check", "{images}", "--image-size", "0"], "--image-size"),
        (["data", "check", "{images}", "--image-size", "x"], "--image-size"),
        (["data", "synth"], "dir"),
        (["data", "synth", "{tmp}/s"], "--n"),
        (["data", "synth", "{tmp}/s", "--n", "-1"], "--n"),
        (["data", "synth", "{tmp}/s", "--n", "x"], "--n"),
        (["data", "synth", "{tmp}/s", "--n", "1e3"], "--n"),
        (["data", "synth", "{tmp}/s", "--n", ""], "--n"),
        (["data", "synth", "{tmp}/s", "--n", "4", "--classes", "0"], "--classes"),
        (["data", "synth", "{tmp}/s", "--n", "4", "--classes", "-3"], "--classes"),
        (["data", "synth", "{tmp}/s", "--n", "4", "--classes", "1.5"], "--classes"),
        (["data", "synth", "{tmp}/s", "--n", "4", "--val", "-1"], "--val"),
        (["data", "synth", "{tmp}/s", "--n", "4", "--val", "x"], "--val"),
        (["data", "synth", "{tmp}/s", "--n", "4", "--seed", "x"], "--seed"),
        (["data", "synth", "{tmp}/s", "--n", "4", "--seed", "1.5"], "--seed"),
        (["data", "synth", "{tmp}/s", "--n", "4", "--workers", "0"], "--workers"),
        (["data", "synth", "{tmp}/s", "--n", "4", "--workers", "x"], "--workers"),
        (["data", "synth", "{text}", "--n", "4"], "{text}"),
        (["data", "synth", "{text}/sub", "--n", "4"], "{text}"),
        (["data", "synth", "{tmp}/s", "--n", "4", "--bogus"], "--bogus"),
        (["data", "check", "{images}", "{images}"], "unrecognized"),
        (["data", "synth", "{tmp}/s", "--n", "4", "--classes", "0x"], "--classes"),
        (["data", "check", "{images}", "--json"], "--json"),
        (["data", "synth", "{tmp}/s", "--n"], "--n"),
        (["data", "synth", "{tmp}/s", "--n", "4", "--val"], "--val"),
        (["data", "check", "{images}", "--workers"], "--workers"),
        (["data", "synth", "{tmp}/s", "--n", "4", "--classes"], "--classes"),
    ],
    "config": [
        (["config"], "action"),
        (["config", "bogus"], "bogus"),
        (["config", "show"], "config"),
        (["config", "list", "extra"], "extra"),
    ],
}


def _cases() -> list:
    cases = []
    for command, head in CONFIGURED.items():
        for override, text in BAD_OVERRIDES:
            cases.append(pytest.param(command, [*head, override], text, id=f"{command}: {override}"))
        if command not in ("demo", "study"):
            for name in BAD_CONFIG_FILES:
                argv = [word.replace("{config}", ref(name)) for word in head]
                cases.append(pytest.param(command, argv, ref(name), id=f"{command}: config file {name}"))
        for own, text in OWN_CASES.get(command, []):
            cases.append(pytest.param(command, [*head, *own], text, id=f"{command}: {' '.join(own)}"))
    for command, table in STANDALONE.items():
        for argv, text in table:
            cases.append(pytest.param(command, argv, text, id=f"{command}: {' '.join(argv[1:])}"))
    return cases


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "text.txt").write_text("hello, not a checkpoint\n")
    (tmp / "binary.pt").write_bytes(bytes(range(256)) * 4)
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "folder").mkdir()
    (tmp / "not_utf8.toml").write_bytes(b"[optim]\nlr = 0.1 # \xff\xfe caf\xe9\n")
    (tmp / "bad.toml").write_text("[optim\nlr = 1\n")
    torch.save({"weight": torch.zeros(2)}, tmp / "plain.pt")
    torch.save([1, 2, 3], tmp / "list.pt")
    # A checkpoint with its checksum file, as this fastfit writes them (the stored one predates checksums).
    checkpoint = ckpt.save_checkpoint(tmp / "checkpoints", ckpt.load_checkpoint(CHECKPOINT), keep=0)
    data = checkpoint.read_bytes()
    paths = {
        "tmp": tmp,
        "config": write_config(tmp, "mmrazor"),
        "out": f'run.output_dir="{tmp / "run"}"',
        "text": tmp / "text.txt",
        "binary": tmp / "binary.pt",
        "empty": tmp / "empty.pt",
        "folder": tmp / "folder",
        "not_utf8": tmp / "not_utf8.toml",
        "bad_toml": tmp / "bad.toml",
        "missing_toml": tmp / "missing.toml",
        "plain": tmp / "plain.pt",
        "a_list": tmp / "list.pt",
        "checkpoint": checkpoint,
        "checksum": ckpt.checksum_path(checkpoint),
        "images": tmp / "folder",
    }
    for i in range(12):  # cut at 0 %, 8 %, …, 92 % of the file (a full disk or a copy stopped midway)
        paths[f"cut{i}"] = tmp / f"cut{i}.pt"
        paths[f"cut{i}"].write_bytes(data[: len(data) * i // 12])
    for i in range(8):  # one flipped byte in different parts of the zip: headers, pickle, tensor data, directory
        flipped = bytearray(data)
        flipped[(len(data) - 1) * i // 7] ^= 0xFF
        paths[f"flip{i}"] = tmp / f"flip{i}.pt"
        paths[f"flip{i}"].write_bytes(bytes(flipped))
        shutil.copy(ckpt.checksum_path(checkpoint), ckpt.checksum_path(paths[f"flip{i}"]))
    paths["truncated"], paths["flipped"] = paths["cut6"], paths["flip3"]
    return {name: str(value) for name, value in paths.items()}


class _StartedWork(Exception):
    pass


def _alarm(signum, frame):
    raise _StartedWork("still running after 20 s: the bad input did not stop the command before its work")


@pytest.mark.parametrize("command, argv, text", _cases())
def test_bad_input_is_one_message_naming_it_and_exit_code_2(files, capsys, monkeypatch, command, argv, text):
    argv = [word.format(**files) for word in argv]
    text = text.format(**files)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(20)
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert code == 2, output
    assert "Traceback" not in output, output
    assert text in output, output
    # argparse's catch-all must not pass for a case meant to reach fastfit's own checks
    assert "unrecognized arguments" not in output or text in ("--bogus", "extra", "unrecognized"), output
