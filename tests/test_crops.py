"""Random-crop training (`data.crop_sizes`): the crops are windows of the photographs' scales, a function of
(seed, step); a run on crops resumes exactly; `run.init_from` starts from a model file's weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vdm.checkpoint import save_model
from vdm.config import ConfigError, TrainConfig, apply_overrides, build_config
from vdm.model import VDM
from vdm.train import TrainingError, train
from vdm.train.crops import CropSampler, batch_for_size


def coded_photo(ident: int, h: int, w: int) -> np.ndarray:
    """An H×W×3 image whose pixel (y, x) is (y, x, ident): every crop says where it came from."""
    y, x = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([y, x, np.full_like(y, ident)], axis=-1).astype(np.uint8)


PHOTOS = {"a": [coded_photo(10, 60, 90), coded_photo(11, 30, 45), coded_photo(12, 15, 22)],
          "b": [coded_photo(20, 40, 40), coded_photo(21, 20, 20)]}


def test_batch_size_keeps_the_pixels_per_step():
    assert batch_for_size(64, 32, 32) == 64
    assert batch_for_size(64, 32, 16) == 256
    assert batch_for_size(64, 32, 48) == 28  # floor(64·1024/2304)
    assert batch_for_size(64, 32, 48, world_size=8) == 24
    assert batch_for_size(2, 32, 256, world_size=4) == 4  # at least one crop per process


def test_crops_are_windows_of_the_scales_that_hold_them():
    sampler = CropSampler(PHOTOS, [16, 24], batch_size=8, base=16, seed=3)
    seen_ids, flips, sizes = [], [], set()
    for step in range(40):
        x = sampler.batch(step).numpy()  # (B, 3, s, s)
        s = x.shape[-1]
        sizes.add(s)
        assert x.shape == (batch_for_size(8, 16, s), 3, s, s) and x.dtype == np.uint8
        for crop in x:
            ident = int(crop[2, 0, 0])
            assert (crop[2] == ident).all()
            img = {10: PHOTOS["a"][0], 11: PHOTOS["a"][1], 12: PHOTOS["a"][2],
                   20: PHOTOS["b"][0], 21: PHOTOS["b"][1]}[ident]
            assert min(img.shape[:2]) >= s  # only scales that hold the crop
            y0, x0 = int(crop[0, 0, 0]), int(crop[1, 0, :].min())
            flipped = crop[1, 0, 0] > crop[1, 0, -1]
            window = img[y0:y0 + s, x0:x0 + s].transpose(2, 0, 1)
            np.testing.assert_array_equal(crop, window[:, :, ::-1] if flipped else window)
            seen_ids.append(ident)
            flips.append(flipped)
    assert sizes == {16, 24}
    ids = np.array(seen_ids)
    assert 12 not in ids and 21 in ids  # 15×22 holds no crop; 20×20 holds the 16-crops only (checked above)
    assert abs(np.mean(ids // 10 == 1) - 0.5) < 0.08  # photographs drawn uniformly, whatever their size
    assert abs(np.mean(flips) - 0.5) < 0.08


def test_crops_depend_on_seed_and_step_only():
    a = CropSampler(PHOTOS, [16], batch_size=8, base=16, seed=3)
    b = CropSampler(PHOTOS, [16], batch_size=8, base=16, seed=3)
    for step in (5, 0, 5):  # any order, any instance
        assert torch.equal(a.batch(step), b.batch(step))
    assert not torch.equal(a.batch(1), a.batch(2))
    assert not torch.equal(a.batch(1), CropSampler(PHOTOS, [16], batch_size=8, base=16, seed=4).batch(1))


def test_a_crop_larger_than_a_photograph_is_refused():
    with pytest.raises(ValueError, match="crop size 48 is larger than every scale of b"):
        CropSampler(PHOTOS, [48], batch_size=8, base=16, seed=0)


def test_crop_settings_are_checked():
    with pytest.raises(ConfigError, match="whole photographs"):
        build_config("quick", [], ["data.name=cifar10", "data.crop_sizes=[32]"])
    with pytest.raises(ConfigError, match=r"\[8, 256\]"):
        build_config("quick", [], ["data.crop_sizes=[4]"])


# --- training on crops of the embedded photos ----------------------------------------------------------------
@pytest.fixture
def crops_config() -> TrainConfig:
    return build_config(None, [], [
        "model.image_size=8", "model.n_embd=8", "model.n_layer=1", "model.gamma_type=learned_linear",
        "optim.warmup_steps=2", "data.name=photos", "data.crop_sizes=[8,16]", "data.test_images=8",
        "run.batch_size=4", "run.eval_every=0", "run.checkpoint_every=2", "run.log_every=1",
        "run.eval_batch_size=8", "run.progress=false", "run.tensorboard=false", "run.precision=fp32"])


def test_training_on_crops_resumes_exactly(crops_config, tmp_path):
    whole = train(crops_config, tmp_path / "whole", max_steps=4)
    train(crops_config, tmp_path / "split", max_steps=2)
    split = train(crops_config, tmp_path / "split", resume=True, max_steps=4)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(whole["checkpoint"] + "/" + name), load_file(split["checkpoint"] + "/" + name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    records = [json.loads(line) for line in (Path(whole["checkpoint"]).parents[1] / "metrics.jsonl").open()]
    train_recs = [r for r in records if "bpd" in r]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4]
    # 4 crops of 8×8 or 1 of 16×16 per step: the same pixels either way
    assert all(r["pixels_per_s"] / r["images_per_s"] in (64.0, 256.0) for r in train_recs)


def test_init_from_copies_the_weights_and_refuses_another_model(crops_config, tmp_path):
    torch.manual_seed(7)
    source = VDM(crops_config.model)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    save_model(source, tmp_path / "start.safetensors")
    config = apply_overrides(crops_config, [f"run.init_from={(tmp_path / 'start.safetensors').as_posix()}"])
    out = train(config, tmp_path / "run", max_steps=0)
    for name in ("model.safetensors", "ema.safetensors"):
        w = load_file(out["checkpoint"] + "/" + name)
        for k, v in source.state_dict().items():
            assert torch.equal(w[k], v), (name, k)
    other = apply_overrides(config, ["model.n_embd=16"])
    with pytest.raises(TrainingError, match="model.n_embd: file 8, run 16"):
        train(other, tmp_path / "other", max_steps=0)
    missing = apply_overrides(crops_config, [f"run.init_from={(tmp_path / 'nope.safetensors').as_posix()}"])
    with pytest.raises(TrainingError, match="run.init_from"):
        train(missing, tmp_path / "missing", max_steps=0)
