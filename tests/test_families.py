"""Every supported family, proven on a tiny random model built with transformers (tests/families.py):
our logits equal transformers' on a right-padded batch; each of the family's switches changes the
logits (so the equality is not vacuous); the GGUF file llama.cpp would write loads to the same
model; a fine-tuning run through the family's chat template exports a directory transformers
loads with the same logits; configs we do not compute are refused with the reason."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from shoestring.errors import UserError
from shoestring.models import build_model
from shoestring.models.hf import args_from_hf_config, hf_config_from_args, load_llama, read_source

transformers = pytest.importorskip("transformers")
from tests.families import FAMILIES, SEQ, make_family, padded_batch  # noqa: E402
from tests.gguf_fixtures import gguf_state_matches, write_gguf  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
NAMES = sorted(FAMILIES)

# The switches of each family that do not add parameters: turning one off must change the logits.
OFF = {"rope_scaling": None, "sliding_window": 0, "attn_softcap": None, "final_softcap": None, "attn_scale": None,
       "embed_scale": False, "norm_offset": 0.0, "local_rope_theta": None, "mlp_act": "silu"}
SWITCHES = {
    "llama": ["rope_scaling"], "mistral": ["sliding_window"], "qwen2": ["rope_scaling", "sliding_window"],
    "qwen3": ["rope_scaling"], "phi3": ["sliding_window"],
    "gemma2": ["sliding_window", "attn_softcap", "final_softcap", "attn_scale", "embed_scale", "norm_offset", "mlp_act"],
    "gemma3_text": ["rope_scaling", "sliding_window", "final_softcap", "attn_scale", "embed_scale", "norm_offset",
                    "local_rope_theta", "mlp_act"],
}
# What a GGUF file can say the way llama.cpp writes it (tests/gguf_fixtures.py): Gemma's query
# scale and Gemma 3's local base and layer pattern are llama.cpp's fixed ones; Qwen's window is not stored.
GGUF_FIT = {
    "gemma2": dict(query_pre_attn_scalar=24),
    "gemma3_text": dict(query_pre_attn_scalar=24, num_hidden_layers=6, layer_types=None, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "qwen2": dict(use_sliding_window=False),
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: make_family(root / name, name, seed=i) for i, name in enumerate(NAMES)}


def _ours_and_ref(path):
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return load_llama(read_source(f"hf:{path}")).eval(), ref


@pytest.mark.parametrize("family", NAMES)
def test_logits_equal_transformers_on_a_padded_batch(family_dirs, family):
    ours, ref = _ours_and_ref(family_dirs[family])
    x, mask = padded_batch(ours.args.vocab_size)
    valid = mask.bool()
    with torch.no_grad():
        expected = ref(input_ids=x, attention_mask=mask).logits[valid]
        got = ours.logits(ours(x))[valid]
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
        for switch in SWITCHES[family]:
            off = build_model(dataclasses.replace(ours.args, **{switch: OFF[switch]}))
            off.load_state_dict(ours.state_dict())
            assert (off.logits(off(x))[valid] - expected).abs().max() > 1e-2, f"{switch} has no effect: the test proves nothing"


def test_mistral_without_a_window(tmp_path):
    """Mistral v0.2+ (`sliding_window` null): plain causal attention."""
    path = make_family(tmp_path / "mistral", "mistral", sliding_window=None)
    ours, ref = _ours_and_ref(path)
    assert ours.args.sliding_window == 0
    x, mask = padded_batch(ours.args.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(x))[mask.bool()], ref(input_ids=x, attention_mask=mask).logits[mask.bool()],
                                   atol=2e-5, rtol=1e-4)


def test_every_family_switch_window_is_shorter_than_the_rows(family_dirs):
    for family in NAMES:
        args = read_source(f"hf:{family_dirs[family]}").args
        assert 0 < args.sliding_window < SEQ or "sliding_window" not in SWITCHES[family], family


@pytest.mark.parametrize("family", NAMES)
def test_config_round_trip_through_our_export_config(family_dirs, family):
    """A run that did not start from HF writes a config of the right family that maps back."""
    args = read_source(f"hf:{family_dirs[family]}").args
    assert args_from_hf_config(hf_config_from_args(args, torch.float32, {})) == args


def test_a_gguf_files_tokenizer_is_rebuilt_once_per_file_version(tmp_path, monkeypatch):
    """transformers' rebuild of the vocabulary is cached by path, size and mtime: a second read
    never calls it and gives the same tokenizer; a rewritten file is rebuilt."""
    from shoestring.models import hf

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    file = write_gguf(make_family(tmp_path / "llama", "llama"), tmp_path / "llama.gguf")
    first = read_source(f"gguf:{file}")
    cached = tmp_path / "cache" / "shoestring" / "gguf-tokenizers"
    assert len(list(cached.glob("*.json"))) == 1
    with monkeypatch.context() as m:
        m.setattr(hf, "_transformers", lambda: pytest.fail("the tokenizer was rebuilt"))
        second = read_source(f"gguf:{file}")
    text = "<|im_start|>user\n w1 w2 hello<|im_end|>"
    assert second.tokenizer.encode(text).ids == first.tokenizer.encode(text).ids
    assert (second.config, second.tokenizer_config) == (first.config, first.tokenizer_config)
    os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 10**9))
    read_source(f"gguf:{file}")
    assert len(list(cached.glob("*.json"))) == 2


@pytest.mark.parametrize("family", NAMES)
def test_gguf_file_loads_to_the_same_model(tmp_path, family):
    path = make_family(tmp_path / family, family, **GGUF_FIT.get(family, {}))
    file = write_gguf(path, tmp_path / f"{family}.gguf")
    assert gguf_state_matches(path, file) == []
    hf, gg = read_source(f"hf:{path}"), read_source(f"gguf:{file}")
    # llama3 scaling comes back as the equivalent parameters solved from `rope_freqs` (models/gguf.py)
    assert dataclasses.replace(gg.args, rope_scaling=None) == dataclasses.replace(hf.args, rope_scaling=None)
    text = "<|im_start|>user\n w1 w2 hello<|im_end|>"
    assert gg.tokenizer.encode(text, add_special_tokens=False).ids == hf.tokenizer.encode(text, add_special_tokens=False).ids
    assert gg.chat_template == hf.chat_template
    a, b = load_llama(hf).eval(), load_llama(gg).eval()
    x, _ = padded_batch(a.args.vocab_size)
    torch.testing.assert_close(b.inv_freq, a.inv_freq, atol=0, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(b.logits(b(x)), a.logits(a(x)), atol=1e-5, rtol=0)


# ---- refused -------------------------------------------------------------------------------------
BASE = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "vocab_size": 32}


@pytest.mark.parametrize("change, words", [
    ({"model_type": "gpt2"}, "cannot be mapped"),
    ({"model_type": "mixtral"}, "mixture-of-experts"),
    ({"model_type": "qwen3_moe"}, "mixture-of-experts"),
    ({"model_type": "qwen2_vl"}, "M-RoPE"),
    ({"model_type": "gpt_oss"}, "attention sinks"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "longrope"),
    ({"model_type": "phi3", "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.75}}, "partial rotary"),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "bidirectional"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"layer_types": ["chunked_attention", "full_attention"]}, "layer types"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantized"),
])
def test_what_we_do_not_compute_is_refused_with_the_reason(change, words):
    with pytest.raises(UserError, match=words):
        args_from_hf_config({**BASE, **change})


def test_gemma3_multimodal_config_loads_its_text_part(tmp_path, family_dirs):
    """A `gemma3` (image + text) checkpoint: the text model under `model.language_model.` (or the
    hub's older `language_model.model.`), the image tower skipped, exported as Gemma3ForCausalLM."""
    from safetensors.torch import load_file, save_file

    from shoestring.models.hf import text_config

    src = family_dirs["gemma3_text"]
    text = json.loads((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    for prefix in ("model.language_model.", "language_model.model."):
        out = tmp_path / prefix.strip(".")
        out.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (out / name).write_text((src / name).read_text())
        (out / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text,
                                                     "vision_config": {"hidden_size": 8}}))
        mm = {prefix + k.removeprefix("model."): v for k, v in state.items()}
        mm["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(2, 2)
        save_file(mm, str(out / "model.safetensors"))
        ours, ref = load_llama(read_source(f"hf:{out}")).eval(), load_llama(read_source(f"hf:{src}")).eval()
        x, _ = padded_batch(ours.args.vocab_size)
        with torch.no_grad():
            assert torch.equal(ours.logits(ours(x)), ref.logits(ref(x)))
        assert text_config(json.loads((out / "config.json").read_text()))["model_type"] == "gemma3_text"


# ---- fine-tuning through the family's chat template, and export -----------------------------------
def _pairs(n: int) -> list[dict[str, str]]:
    words = [f"w{i}" for i in range(6)]
    return [{"prompt": f"{a} {b}", "response": f"{b} {a}"} for a in words for b in words if a != b][:n]


def _finetune(tmp_path, source, **sections):
    from rich.console import Console

    from shoestring.config import build_config
    from shoestring.train.trainer import Trainer
    from tests.hf_fixtures import write_jsonl

    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(24))
    tree = {"model": {"source": f"hf:{source}"},
            "data": {"format": "instruct", "corpus": str(data), "seq_len": 72, "val_fraction": 0.1},
            "train": {"steps": 2, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0, "eval_every": 2, "eval_batches": 1,
                      "log_every": 1, "seed": 0, "device": "cpu"},
            "precision": {"mode": "fp32"}, "run": {"dir": str(tmp_path / "run"), "save_every": 0}}
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return Trainer(build_config(tree), console=Console(quiet=True)).run()


@pytest.mark.parametrize("family", NAMES)
def test_finetune_exports_what_transformers_loads(family_dirs, tmp_path, family):
    """Two steps of full fine-tuning on chat-templated data, then `export_hf`: transformers loads
    the export (config of the family, Phi-3's projections fused back) with our run's logits."""
    from shoestring.export_hf import export_hf
    from shoestring.export import load_run

    summary = _finetune(tmp_path, family_dirs[family])
    assert summary["final_train_loss"] == summary["final_train_loss"]  # finite
    out = export_hf(tmp_path / "run", tmp_path / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == json.loads((family_dirs[family] / "config.json").read_text())["architectures"][0]
    ours = load_run(tmp_path / "run").model
    x, mask = padded_batch(ours.args.vocab_size)
    with torch.no_grad():
        expected = ours.logits(ours(x))[mask.bool()]
        torch.testing.assert_close(hf(input_ids=x, attention_mask=mask).logits[mask.bool()], expected, atol=2e-5, rtol=1e-4)
        base = load_llama(read_source(f"hf:{family_dirs[family]}")).eval()
        assert (base.logits(base(x))[mask.bool()] - expected).abs().max() > 1e-4  # the run changed the weights


def test_phi3_lora_on_split_projections_merges_into_the_fused_export(family_dirs, tmp_path):
    """LoRA targets name our split projections (q/k/v, gate/up) for Phi-3 too; the merged export
    fuses them back into qkv_proj / gate_up_proj."""
    from shoestring.export_hf import export_hf
    from shoestring.export import load_run

    _finetune(tmp_path, family_dirs["phi3"], lora={"enabled": True, "rank": 4, "targets": ["q_proj", "v_proj", "up_proj"]},
              train={"lr": 0.05})
    out = export_hf(tmp_path / "run", tmp_path / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_run(tmp_path / "run").model
    x, _ = padded_batch(ours.args.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours.logits(ours(x)), atol=2e-5, rtol=1e-4)


def test_chat_template_refusals_are_user_errors():
    """A template's raise_exception (Gemma 2 refuses a system turn) and a template that does not
    render conversations as growing prefixes (Qwen3's think block moves with the last user turn)
    stop with a one-line error, not a traceback."""
    from shoestring.data.instruct import ChatFormatter
    from tests.families import TEMPLATES, byte_tokenizer

    tok = byte_tokenizer()
    special = {"bos_token": "<bos>", "eos_token": "<end_of_turn>"}
    system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(UserError, match="System role not supported"):
        ChatFormatter(tok, TEMPLATES["gemma2"], special).tokens(system)
    ids, target = ChatFormatter(tok, TEMPLATES["gemma3_text"], special).tokens(system)  # Gemma 3 folds it into the user turn
    assert any(target) and tok.decode(ids).count("be brief") == 1
    two_turns = system[1:] * 2
    fmt = ChatFormatter(tok, TEMPLATES["qwen3"], special)
    assert any(fmt.tokens(system[1:])[1])  # one turn: fine
    with pytest.raises(UserError, match="growing prefixes"):
        fmt.tokens(two_turns)
