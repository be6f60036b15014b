import json

import pytest
import torch

import pglm.train.checkpoint as ck
from pglm.errors import UserError
from pglm.models import build_model, model_config
from pglm.train.checkpoint import (
    find_checkpoint,
    load_optimizer,
    load_weights,
    prepare_out_dir,
    save_checkpoint,
)


def tiny(arch="gpt"):
    torch.manual_seed(0)
    return build_model(model_config(arch, "tiny", vocab_size=13, n_layer=1, d_model=16, block_size=8))


def make_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {}}))
    return run


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_roundtrip_with_tied_weights_and_optimizer(tmp_path, arch):
    run = make_run(tmp_path)
    model = tiny(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 13, (2, 5))).sum().backward()
    opt.step()
    save_checkpoint(run, 3, model, opt, {"elapsed": 1.5})
    _, ckpt = find_checkpoint(run)
    assert ckpt.name == "step_3"
    other = tiny(arch)
    for p in other.parameters():
        torch.nn.init.zeros_(p)
    load_weights(other, ckpt)
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    load_optimizer(opt2, ckpt)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_crash_in_the_middle_of_a_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    model = tiny()
    save_checkpoint(run, 1, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def crash(*args, **kwargs):  # the process dies after the weights are written, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(run, 2, model)
    monkeypatch.undo()
    assert list((run / "checkpoints").glob(".tmp-step_2-*")), "the half-written checkpoint stays under its temporary name"
    _, ckpt = find_checkpoint(run)
    assert ckpt.name == "step_1"
    fresh = tiny()
    load_weights(fresh, ckpt)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    save_checkpoint(run, 2, model)  # the next write cleans up the debris
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert find_checkpoint(run)[1].name == "step_2"


def test_truncated_safetensors_is_one_clear_error(tmp_path):
    run = make_run(tmp_path)
    save_checkpoint(run, 1, tiny())
    f = run / "checkpoints" / "step_1" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserError, match="is damaged or incomplete"):
        load_weights(tiny(), find_checkpoint(run)[1])


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="is not a pglm run or checkpoint"):
        find_checkpoint(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        find_checkpoint(tmp_path / "missing")
    run = make_run(tmp_path)
    with pytest.raises(UserError, match="no finished checkpoint"):
        find_checkpoint(run)


def test_out_dir_protection(tmp_path):
    run = make_run(tmp_path)
    (run / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        prepare_out_dir(run, resume=False, overwrite=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a pglm run"):
        prepare_out_dir(other, resume=False, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="holds no run to resume"):
        prepare_out_dir(tmp_path / "new", resume=True, overwrite=False)
    assert prepare_out_dir(run, resume=False, overwrite=True).is_dir()
    assert not (run / "keep.txt").exists()


def test_rewriting_a_step_survives_a_crash_between_the_renames(tmp_path, monkeypatch):
    import os

    run = make_run(tmp_path)
    model = tiny()
    save_checkpoint(run, 1, model)
    real_replace = os.replace
    calls = {"n": 0}

    def replace(a, b):
        calls["n"] += 1
        if calls["n"] == 2:  # the old step_1 is set aside; the process dies before the new one moves in
            raise KeyboardInterrupt
        return real_replace(a, b)

    monkeypatch.setattr(ck.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(run, 1, model)
    monkeypatch.undo()
    _, ckpt = find_checkpoint(run)  # puts the old copy back
    assert ckpt.name == "step_1"
    load_weights(tiny(), ckpt)
