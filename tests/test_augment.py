"""Augmentation with conditioning (the official cifar10_aug pipelines) and its use in training."""

import pytest
import torch

from vdm.config import ConfigError, apply_overrides, load_preset
from vdm.train.augment import augment


def candidates(img: torch.Tensor) -> dict[tuple[bool, int], torch.Tensor]:
    """Every result of (flip?, then rotation by k·90°) of one (C, H, W) image, counter-clockwise like
    tf.image.rot90 / np.rot90 on (H, W)."""
    out = {}
    for flip in (False, True):
        base = img.flip(-1) if flip else img
        for k in range(4):
            out[(flip, k)] = torch.rot90(base, k, dims=(-2, -1))
    return out


def test_flip_and_rotation_draws_follow_the_official_pipeline():
    torch.manual_seed(0)
    B = 4000
    x = torch.randint(0, 256, (B, 3, 5, 5), dtype=torch.uint8)  # random images have no symmetry
    out, cond = augment(x, "flip_rot90", torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype and cond.shape == (B,)
    counts = {}
    for i in range(B):
        hits = [key for key, c in candidates(x[i]).items() if torch.equal(c, out[i])]
        assert len(hits) == 1, i
        flip, k = hits[0]
        assert cond[i].item() == float(flip or k > 0)  # conditioning 1 exactly when the image was changed
        counts[hits[0]] = counts.get(hits[0], 0) + 1
    # P(no flip, no rotation) = 1/4; every (flip, k ≥ 1) has probability 1/2 · 1/2 · 1/3 = 1/12
    expected = {(f, k): (0.25 if k == 0 else 1 / 12) for f in (False, True) for k in range(4)}
    for key, p in expected.items():
        sd = (B * p * (1 - p)) ** 0.5
        assert abs(counts.get(key, 0) - B * p) < 5 * sd, (key, counts.get(key, 0), B * p)


def test_channel_permutation_variant():
    torch.manual_seed(0)
    B = 4000
    x = torch.randint(0, 256, (B, 3, 4, 4), dtype=torch.uint8)
    out, cond = augment(x, "flip_rot90_channels", torch.Generator().manual_seed(2))
    changed = 0
    for i in range(B):
        # some permutation of the channels of one of the flip/rotation candidates
        ok = [key for key, c in candidates(x[i]).items()
              if sorted(map(bytes, c.flatten(1).numpy())) == sorted(map(bytes, out[i].flatten(1).numpy()))]
        assert ok, i
        changed += not torch.equal(out[i], x[i])
    # P(conditioning 1) = 1 − ½·½·½ = 7/8; the unchanged images are among those with conditioning 0 or an
    # identity permutation drawn (1/6 of permutations)
    frac = cond.mean().item()
    assert abs(frac - 7 / 8) < 5 * (7 / 8 * 1 / 8 / B) ** 0.5
    assert changed <= cond.sum().item()


def test_no_augmentation_and_bad_input():
    x = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)
    out, cond = augment(x, "none", torch.Generator())
    assert out is x and torch.equal(cond, torch.zeros(3))
    with pytest.raises(ValueError, match="square"):
        augment(torch.zeros(2, 3, 4, 6, dtype=torch.uint8), "flip_rot90", torch.Generator())
    with pytest.raises(ValueError, match="mixup"):
        augment(x, "mixup", torch.Generator())


def test_config_and_presets():
    assert load_preset("cifar10_aug").data.augment == "flip_rot90"
    paper = load_preset("cifar10_aug_paper")
    assert (paper.model.attention, paper.model.gamma_type, paper.run.batch_size) == (True, "learned_nnet", 1024)
    with pytest.raises(ConfigError, match="mixup"):
        apply_overrides(load_preset("quick"), ["data.augment=mixup"])


def test_sampling_and_evaluation_take_the_conditioning():
    """--conditioning reaches the network: 0 is the default, another value changes what a network that reads
    its conditioning input produces (here a perturbed small model)."""
    from vdm import VDM
    from vdm.evaluate import evaluate
    from vdm.sample_run import sample_images

    torch.manual_seed(0)
    model = VDM(image_size=8, n_embd=32, n_layer=1, dropout=0.0).eval()
    with torch.no_grad():
        for p in model.score_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    base = sample_images(model, 2, sampler="ddim", steps=4)
    assert torch.equal(base, sample_images(model, 2, sampler="ddim", steps=4, conditioning=0.0))
    assert not torch.equal(base, sample_images(model, 2, sampler="ddim", steps=4, conditioning=1.0))
    assert "eps_hat" not in model.__dict__  # the model is left as it was
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    r0, r1 = (evaluate(model, x, progress=False, conditioning=c)["bpd"] for c in (0.0, 1.0))
    assert r0 != r1
