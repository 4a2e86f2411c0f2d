import errno

import pytest

from shoestring import checkpoint as ckpt
from shoestring.errors import RunError


def _save(root, step, payload=b"x" * 1000, keep=2):
    return ckpt.save_checkpoint(root, step, {"a.bin": payload, "b.bin": payload[::-1]}, keep_last=keep)


def test_save_seals_prunes_and_points_latest(tmp_path):
    for step in (10, 20, 30):
        ref = _save(tmp_path, step)
    assert [r.step for r in ckpt.find_checkpoints(tmp_path)] == [20, 30]
    assert (tmp_path / ckpt.LATEST).read_text() == ref.path.name
    ckpt.verify(ref)


def test_half_written_save_is_invisible_and_cleaned(tmp_path):
    _save(tmp_path, 10)
    stale = tmp_path / ".tmp-step_00000020-abc"
    stale.mkdir()
    (stale / "a.bin").write_bytes(b"partial")
    assert [r.step for r in ckpt.find_checkpoints(tmp_path)] == [10]
    _save(tmp_path, 20)
    assert not stale.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damage_is_named_and_fallback_finds_previous(tmp_path, damage):
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    target = newest.path / "b.bin"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:10])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[5] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        target.unlink()
    with pytest.raises(RunError, match="b.bin"):
        ckpt.verify(newest)
    with pytest.raises(RunError, match="--resume auto"):
        ckpt.resolve_resume(tmp_path, fallback=False, warn=print)
    warnings = []
    ref = ckpt.resolve_resume(tmp_path, fallback=True, warn=warnings.append)
    assert ref.step == 10 and "b.bin" in warnings[0]


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 10)

    def no_space(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_bytes_durably", no_space)
    with pytest.raises(RunError) as err:
        _save(tmp_path, 20)
    assert "No space left" in err.value.problem and "step_00000010" in err.value.fix
    monkeypatch.undo()
    assert [r.step for r in ckpt.find_checkpoints(tmp_path)] == [10]
    assert not list(tmp_path.glob(".tmp-*"))
    ckpt.verify(ckpt.latest_complete(tmp_path))
