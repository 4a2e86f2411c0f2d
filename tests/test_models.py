import pytest
import torch

from shoestring.models import PRESETS, build_model, preset_args
from shoestring.models.presets import PUBLISHED_PARAMS


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_published_parameter_counts(name):
    model = build_model(PRESETS[name], "meta")  # shapes only: no memory
    assert abs(model.num_params() / PUBLISHED_PARAMS[name] - 1) < 0.01


def test_tiny_forward_shapes_and_causality():
    args = preset_args("tiny", vocab_size=64, max_seq_len=32)
    torch.manual_seed(0)
    model = build_model(args)
    x = torch.randint(0, 64, (2, 16))
    h = model(x)
    assert h.shape == (2, 16, args.dim)
    # Changing a later token must not change earlier positions (causal mask).
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 64
    h2 = model(x2)
    assert torch.allclose(h[:, :10], h2[:, :10], atol=1e-6)
    assert not torch.allclose(h[:, 10:], h2[:, 10:])


def test_tied_embeddings_share_storage():
    model = build_model(preset_args("tiny", vocab_size=64))
    assert model.lm_head.weight is model.embed_tokens.weight


def test_meta_build_then_materialise_matches_direct_build():
    args = preset_args("tiny", vocab_size=64, max_seq_len=32)
    torch.manual_seed(0)
    direct = build_model(args)
    meta = build_model(args, "meta")
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.init_weights()
    for (n, a), (_, b) in zip(direct.state_dict().items(), meta.state_dict().items()):
        assert torch.equal(a, b), n
    assert torch.equal(direct.inv_freq, meta.inv_freq)


def test_sequence_longer_than_context_is_refused():
    model = build_model(preset_args("tiny", vocab_size=64, max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
