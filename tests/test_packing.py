"""Packed instruction rows: several examples per row, each computed exactly as if alone.

A document mask in our attention (eager and compiled) and RoPE positions that restart per
document make a packed row's logits, loss and gradients those of its documents run one by one;
rows are filled best-fit; targets never cross a document boundary; the trainer counts real
tokens and reports the padding; a packed run on 2 ranks (fsdp2) follows the single-process one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from rich.console import Console

from shoestring.data.instruct import ChatFormatter, InstructSampler, build_rows, pack
from shoestring.models import ModelArgs, attention, build_model
from shoestring.models.rope import document_positions
from shoestring.models.loss import IGNORE_INDEX, cross_entropy_from_hidden
from shoestring.train.trainer import Trainer
from tests.hf_fixtures import CHAT_TEMPLATE, reverse_examples, toy_tokenizer, write_jsonl
from tests.test_attention import _grads, _qkv, _reference


def _doc_ids(b: int, s: int, seed: int = 0) -> torch.Tensor:
    """(b, s) contiguous runs of random lengths (1 to s/2) numbered 0, 1, ..."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        lengths = []
        while sum(lengths) < s:
            lengths.append(int(torch.randint(1, s // 2, (), generator=g)))
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:s])
    return torch.stack(rows)


def _masked_reference(q, k, v, scale, window, softcap, doc):
    """`_reference` with the documents as separate rows: run each document alone and stitch."""
    out = torch.empty_like(q)
    for r in range(q.shape[0]):
        for d in doc[r].unique():
            idx = (doc[r] == d).nonzero().squeeze(1)
            part = _reference(q[r : r + 1, :, idx], k[r : r + 1, :, idx], v[r : r + 1, :, idx], scale, window, softcap)
            out[r, :, idx] = part[0]
    return out


def test_document_positions_restart_per_document():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 2]])
    assert document_positions(doc).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 0]]


# (scale, window, softcap): plain (the CPU flash kernel with the mask), a window, a cap (the blocked forward)
@pytest.mark.parametrize("variant", [(None, 0, None), (None, 5, None), (0.3, 0, 1.5)], ids=["plain", "window", "softcap"])
def test_document_mask_is_each_document_alone(variant, monkeypatch):
    """Forward and gradients equal each document's own attention, with query blocks that cross
    document boundaries (7 queries a block)."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", 7)
    scale, window, softcap = variant
    qkv, do = _qkv(2, 4, 2, 37, 16, torch.float32)
    doc = _doc_ids(2, 37)
    ours = _grads(lambda q, k, v: attention.causal_attention(q, k, v, scale, window, softcap, doc), qkv, do)
    ref = _grads(lambda q, k, v: _masked_reference(q, k, v, scale or 16 ** -0.5, window, softcap, doc), qkv, do)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    unmasked = attention.causal_attention(*qkv, scale, window, softcap)
    assert (ours[0] - unmasked).abs().max() > 1e-2  # the mask changed the result: the test proves something


def test_compiled_document_mask_without_graph_breaks():
    """Inside torch.compile (as in compiled blocks): the same custom op, gradients as eager."""
    torch._dynamo.reset()
    qkv, do = _qkv(2, 4, 2, 40, 16, torch.float32)
    doc = _doc_ids(2, 40, seed=1)
    fn = lambda q, k, v: attention.causal_attention(q, k, v, None, 0, None, doc)  # noqa: E731
    ours = _grads(torch.compile(fn, fullgraph=True), qkv, do)
    for a, r in zip(ours, _grads(fn, qkv, do)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


# Every layer-level switch a packed row has to get right: GQA, a sliding window on one layer
# with its own RoPE base, soft-capped scores.
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=97, max_seq_len=64,
                 sliding_window=4, sliding_layers=(True, False), local_rope_theta=1000.0, attn_softcap=30.0)


def test_packed_row_is_each_document_alone():
    """Logits, per-document losses and the gradients of a packed row's loss equal those of its
    documents run alone (fp32, to rounding): no attention across documents, positions restart."""
    torch.manual_seed(0)
    model = build_model(ARGS)
    lengths = [9, 5, 12]
    docs = [torch.randint(0, 97, (n + 1,)) for n in lengths]  # tokens; each document's last is only a target
    pad = 30 - sum(lengths)
    x = torch.cat([d[:-1] for d in docs] + [torch.zeros(pad, dtype=torch.long)])[None]
    y = torch.cat([d[1:] for d in docs] + [torch.full((pad,), IGNORE_INDEX)])[None]
    doc = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths + [pad]))[None]

    packed = model.logits(model(x, doc))[0]
    loss = cross_entropy_from_hidden(model(x, doc), model.lm_head.weight, y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    at, alone_loss = 0, 0.0
    for d, n in zip(docs, lengths):
        alone = model.logits(model(d[None, :-1]))[0]
        torch.testing.assert_close(packed[at : at + n], alone, rtol=1e-5, atol=1e-5)
        own = torch.nn.functional.cross_entropy(packed[at : at + n], d[1:])
        torch.testing.assert_close(own, torch.nn.functional.cross_entropy(alone, d[1:]), rtol=1e-5, atol=1e-6)
        alone_loss = alone_loss + cross_entropy_from_hidden(model(d[None, :-1]), model.lm_head.weight, d[None, 1:]) * n
        at += n
    alone_loss = alone_loss / sum(lengths)  # the packed loss is the token mean over all documents
    torch.testing.assert_close(loss, alone_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, torch.autograd.grad(alone_loss, list(model.parameters()))):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    # Without the document ids the later documents see the earlier ones: not the same logits.
    assert (model.logits(model(x))[0, lengths[0]:] - packed[lengths[0]:]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_checkpointed_blocks_take_the_document_ids(mode):
    """Recomputed blocks get the ids again (selective keeps the masked attention's outputs)."""
    from shoestring.levers.checkpointing import apply_checkpointing

    torch.manual_seed(0)
    plain = build_model(ARGS)
    wrapped = build_model(ARGS)
    wrapped.load_state_dict(plain.state_dict())
    apply_checkpointing(wrapped, mode)
    x, doc = torch.randint(0, 97, (2, 24)), _doc_ids(2, 24, seed=2)
    y = torch.randint(0, 97, (2, 24))
    grads = [torch.autograd.grad(cross_entropy_from_hidden(m(x, doc), m.lm_head.weight, y), list(m.parameters()))
             for m in (plain, wrapped)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_best_fit_fills_rows():
    lengths = [7, 6, 5, 4, 3, 3, 2, 1, 9, 8]
    rows = pack(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 5  # 48 tokens in rows of 10: five, the fewest there can be
    assert pack([4, 4, 4], 4) == [[0], [1], [2]] and pack([], 8) == []
    assert pack([1, 3, 2, 4], 5) == [[0, 3], [1, 2]]  # rows in the order of their first example


def _formatter():
    return ChatFormatter(toy_tokenizer(), CHAT_TEMPLATE, {"eos_token": "<|im_end|>"})


def test_packed_loss_mask_stays_inside_each_document():
    """Packed rows hold exactly the padded rows' inputs and targets, cut at document
    boundaries: the target at a document's last position is its own end token, never the next
    document's first; the padding tail is its own document with no targets."""
    fmt = _formatter()
    convs = [[{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["response"]}]
             for p in reverse_examples(7)]
    convs[3] = [*convs[3], {"role": "user", "content": "reverse: w1 w2"}, {"role": "assistant", "content": "w2 w1"}]
    padded, packed = build_rows(convs, fmt, 40, 0), build_rows(convs, fmt, 40, 0, packing=True)
    assert len(packed) < len(padded) and packed.doc is not None and padded.doc is None
    eos = fmt.tokenizer.token_to_id("<|im_end|>")
    pieces = []
    for r in range(len(packed)):
        at = 0
        for d, n in enumerate(packed.lengths[r]):
            assert (packed.doc[r, at : at + n] == d).all()
            assert packed.y[r, at + n - 1] == eos  # the document's own end, not the next one's start
            pieces.append((tuple(packed.x[r, at : at + n]), tuple(packed.y[r, at : at + n])))
            at += n
        assert (packed.y[r, at:] == IGNORE_INDEX).all() and (packed.doc[r, at:] == len(packed.lengths[r])).all()
    alone = [(tuple(padded.x[i, :n]), tuple(padded.y[i, :n])) for i, (n,) in enumerate(padded.lengths)]
    assert sorted(pieces) == sorted(alone)
    assert (padded.y[:, :][np.arange(40) >= np.array(padded.lengths)] == IGNORE_INDEX).all()


def test_one_example_a_row_packs_into_the_padded_rows():
    convs = [[{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["response"]}]
             for p in reverse_examples(9)]
    padded, packed = build_rows(convs, _formatter(), 16, 0), build_rows(convs, _formatter(), 16, 0, packing=True)
    assert np.array_equal(padded.x, packed.x) and np.array_equal(padded.y, packed.y)
    assert packed.lengths == padded.lengths == [[12]] * 9


def test_sampler_counts_each_steps_documents():
    """`documents(step)`: the lengths of the examples in that step's global batch, which are
    exactly its non-padding positions."""
    rows = build_rows([[{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["response"]}]
                       for p in reverse_examples(20)], _formatter(), 40, 0, packing=True)
    sampler = InstructSampler(rows, global_batch=2, seed=1)
    x, y, doc = sampler.batch(3)
    entries = sampler._entries(3 * 2, 2)
    docs = sampler.documents(3)
    assert docs.tolist() == [n for r in entries for n in rows.lengths[r]]
    n_docs = torch.tensor([len(rows.lengths[r]) for r in entries])
    assert docs.sum() == int((doc < n_docs[:, None]).sum()) < x.numel()


# ---- end to end ----------------------------------------------------------------------------------
def _instruct_tree(tmp_path, source, data, packing, **train):
    return {"model": {"source": f"hf:{source}"},
            "data": {"format": "instruct", "corpus": str(data), "seq_len": 40, "val_fraction": 0.1, "packing": packing},
            "train": {"steps": 4, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "weight_decay": 0.0,
                      "eval_every": 4, "eval_batches": 2, "log_every": 2, "seed": 0, "device": "cpu", **train},
            "precision": {"mode": "fp32"}, "run": {"dir": str(tmp_path / f"run-{packing}"), "save_every": 0}}


@pytest.fixture(scope="module")
def hf_data(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.hf_fixtures import make_hf_llama

    root = tmp_path_factory.mktemp("packing")
    return make_hf_llama(root / "model"), write_jsonl(root / "data.jsonl", reverse_examples(120))


@pytest.mark.parametrize("packing", [True, False])
def test_summary_counts_padding_and_real_tokens(hf_data, tmp_path, packing):
    from shoestring.config import build_config
    from shoestring.train.metrics import read_metrics

    source, data = hf_data
    trainer = Trainer(build_config(_instruct_tree(tmp_path, source, data, packing)), console=Console(quiet=True))
    summary = trainer.run()
    records = [r for r in read_metrics(tmp_path / f"run-{packing}" / "metrics.jsonl") if "loss" in r]
    assert summary["tokens_processed"] == 4 * 4 * 40 == summary["tokens"] + summary["padding_tokens"]
    assert sum(r["tokens"] for r in records) == summary["tokens"]
    assert all(r["tokens"] + r["pad_tokens"] == 4 * 40 for r in records)
    per_example = 12  # "<|im_start|> user reverse: a b c <|im_end|> <|im_start|> assistant c b a <|im_end|>", less one
    if packing:  # three 12-position examples per row of 40: 4 of 40 padding
        assert summary["padding_tokens"] == 4 * 4 * 4
    else:  # one per row: 28 of 40
        assert summary["tokens"] == 4 * 4 * per_example
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["wall_s"])


@pytest.mark.slow
def test_packed_run_on_two_fsdp2_ranks_follows_single(hf_data, tmp_path):
    """Packed rows (3-tuples with document ids) through a sharded strategy: the loss curve of the
    single-process packed run, to fp32 rounding."""
    from shoestring.config import build_config
    from tests.test_parallel import FP32_REL, assert_same_curve, curve, to_toml, train_cli

    source, data = hf_data
    single = _instruct_tree(tmp_path / "single", source, data, True, log_every=1)
    Trainer(build_config(single), console=Console(quiet=True)).run()
    sharded = _instruct_tree(tmp_path / "fsdp2", source, data, True, log_every=1)
    sharded["parallel"] = {"strategy": "fsdp2"}
    cfg = tmp_path / "fsdp2.toml"
    cfg.write_text(to_toml(sharded))
    code, out = train_cli(cfg)
    assert code == 0, out
    ref, got = curve(tmp_path / "single" / "run-True"), curve(tmp_path / "fsdp2" / "run-True")
    assert_same_curve(ref, got, FP32_REL)
    summary = json.loads((tmp_path / "fsdp2" / "run-True" / "summary.json").read_text())
    assert summary["devices"] == 2 and summary["padding_tokens"] == 4 * 4 * 4
