import pytest

from shoestring.config import load_config
from shoestring.errors import UserError


def test_default_config_file_loads():
    cfg = load_config("configs/tiny.toml")
    assert cfg.model.preset == "tiny" and cfg.precision.mode == "auto"


def test_overrides_parse_toml_literals_and_bare_strings():
    cfg = load_config("configs/tiny.toml", ["train.lr=1e-4", "precision.mode=fp32", "train.compile=true",
                                            "checkpointing.mode=every:2"])
    assert cfg.train.lr == 1e-4 and cfg.precision.mode == "fp32" and cfg.train.compile is True
    assert cfg.checkpointing.mode == "every:2"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lrr=1", "train.lrr: unknown key"),
        ("train.lr=-1", "train.lr"),
        ("train.steps=many", "train.steps"),
        ("precision.mode=fp64", "precision.mode"),
        ("checkpointing.mode=every:0", "checkpointing.mode"),
        ("model.preset=gpt5", "unknown preset"),
        ("train.grad_accum=3", "divisible"),
        ("data.seq_len=100000", "longer than the model's context"),
        ("nosection=1", "section and a key"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(UserError) as err:
        load_config("configs/tiny.toml", [override])
    assert needle in err.value.line()


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(bad)
