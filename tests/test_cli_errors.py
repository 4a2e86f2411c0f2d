"""Bad input ends as one line naming the problem and the fix: exit 2 for user mistakes, 1 for
run-time failures, never a traceback (unless --debug)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shoestring import checkpoint as ckpt
from shoestring.cli import main
from tests.runs import write_config


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def assert_one_line_error(code: int, out: str, expected_code: int, *needles: str) -> None:
    assert code == expected_code, out
    assert "Traceback" not in out
    error_lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, out
    text = " ".join(out.split())
    for needle in needles:
        assert needle in text, out


@pytest.fixture
def cfg_file(make_config, tmp_path):
    def make(**overrides) -> Path:
        return write_config(make_config, tmp_path / "cfg.toml", **overrides)

    return make


@pytest.mark.parametrize("override, needle", [
    ("train.lrr=1", "train.lrr: unknown key"),
    ("train.lr=-0.1", "train.lr: Input should be greater than 0"),
    ("train.steps=\"ten\"", "train.steps"),
    ("train.grad_accum=3", "divisible"),
    ("data.seq_len=4096", "longer than the model's context"),
    ("train.budget=3 minutes", "train.budget: '3 minutes' is not a budget"),
    ("train.budget=\"$0\"", "train.budget: '$0' is not a budget"),
])
def test_bad_config_values(capsys, cfg_file, override, needle):
    assert_one_line_error(*run_cli(capsys, "train", str(cfg_file()), "--set", override), 2, needle)


def test_missing_config_file(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "train", str(tmp_path / "none.toml")), 2, "not found")


def _bad_corpus(tmp_path: Path, kind: str) -> Path:
    d = tmp_path / f"corpus-{kind}"
    d.mkdir()
    f = d / "a.txt"
    if kind == "empty":
        f.write_text("")
    elif kind == "binary":
        f.write_bytes(b"hello\x00\x01\x02world" * 10)
    elif kind == "latin1":
        f.write_bytes("caf\u00e9 ".encode("latin-1") * 10)
    elif kind == "tiny":
        f.write_text("To be, or not to be. " * 20)
    return d


@pytest.mark.parametrize("kind, needle", [
    ("missing", "no such file"), ("empty", "empty"), ("binary", "binary"), ("latin1", "UTF-8"), ("tiny", "are needed"),
])
def test_bad_data(capsys, cfg_file, tmp_path, kind, needle):
    corpus = tmp_path / "nope" if kind == "missing" else _bad_corpus(tmp_path, kind)
    cfg = cfg_file(data__corpus=str(corpus), data__prepared_dir=str(tmp_path / "prep"), data__vocab_size=256)
    code, out = run_cli(capsys, "train", str(cfg))
    assert_one_line_error(code, out, 2, needle)
    assert "a.txt" in out or kind in ("missing", "tiny")


def test_tokenizer_that_does_not_match_shards(capsys, cfg_file, prepared, tmp_path):
    copy = tmp_path / "prep-copy"
    shutil.copytree(prepared, copy)
    tok = json.loads((copy / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zzzz"] = 99999
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    code, out = run_cli(capsys, "train", str(cfg_file(data__prepared_dir=str(copy))))
    assert_one_line_error(code, out, 2, "tokenizer")


def test_run_dir_with_another_run_is_refused(capsys, cfg_file, tmp_path):
    assert run_cli(capsys, "train", str(cfg_file(train__steps=2)))[0] == 0
    code, out = run_cli(capsys, "train", str(cfg_file(train__steps=2, train__lr=1e-4)))
    assert_one_line_error(code, out, 2, "different run", "--overwrite")
    assert run_cli(capsys, "train", str(cfg_file(train__steps=2, train__lr=1e-4)), "--overwrite")[0] == 0


def test_unwritable_checkpoint_dir_fails_cleanly(capsys, cfg_file, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("a file where the checkpoint directory should be")
    code, out = run_cli(capsys, "train", str(cfg_file(train__steps=2)))
    assert_one_line_error(code, out, 1, "could not write checkpoint")


def test_damaged_checkpoint_named_then_auto_falls_back(capsys, cfg_file, tmp_path):
    cfg = cfg_file(train__steps=8, run__save_every=4)
    assert run_cli(capsys, "train", str(cfg))[0] == 0
    newest = ckpt.latest_complete(tmp_path / "run" / "checkpoints")
    target = newest.path / "strategy.pt"
    target.write_bytes(target.read_bytes()[:100])
    code, out = run_cli(capsys, "train", str(cfg_file(train__steps=12, run__save_every=4)), "--resume", str(tmp_path / "run"))
    assert_one_line_error(code, out, 1, "strategy.pt is truncated", "--resume auto")
    code, out = run_cli(capsys, "train", str(cfg_file(train__steps=12, run__save_every=4)), "--resume", "auto")
    assert code == 0 and "falling back" in out and "resumed from" in out and "step_00000004" in out


def test_debug_shows_the_traceback(cfg_file):
    with pytest.raises(Exception, match="unknown key"):
        main(["--debug", "train", str(cfg_file()), "--set", "train.lrr=1"])


def test_report_writes_plots(capsys, cfg_file, tmp_path):
    assert run_cli(capsys, "train", str(cfg_file(train__steps=4)))[0] == 0
    code, out = run_cli(capsys, "report", str(tmp_path / "run"))
    assert code == 0
    for name in ("loss.png", "throughput.png", "memory.png"):
        assert (tmp_path / "run" / name).stat().st_size > 1000
