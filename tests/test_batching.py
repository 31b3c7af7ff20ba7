"""Device-resident augmentation and batching against torchvision.

The crop/flip is checked twice: exactly, for given parameters, against
torchvision.transforms.functional; and in distribution, against torchvision's
RandomCrop(size, padding=p) + RandomHorizontalFlip() applied per sample, with a chi-square
test on the (offset, flip) histogram recovered from the outputs of an image whose pixel values
are all distinct.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from scipy.stats import chi2_contingency, chisquare

from coun_tune.core.batching import Augmenter, shuffled_batches, steps_per_epoch
from coun_tune.core.datasets import AugmentPolicy

SIZE, PAD = 8, 2
N_DRAWS = 20000
P_MIN = 1e-3


def _unique_image() -> torch.Tensor:
    """(1, 8, 8) uint8 with values 1..64 (0 is the padding), value = 1 + 8 * row + col."""
    return (torch.arange(SIZE * SIZE, dtype=torch.uint8) + 1).view(1, SIZE, SIZE)


def _recover(out: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top, left, flip) from (N, 8, 8) crops of `_unique_image()` (padding PAD).

    Pixels (3, 3) and (3, 4) are inside the image for every offset when PAD = 2; unflipped,
    the right one is the left one + 1, flipped it is - 1."""
    out = out.reshape(-1, SIZE, SIZE).long()
    a, b = out[:, 3, 3], out[:, 3, 4]
    assert bool(((b - a).abs() == 1).all()), "the centre of every crop must come from the image"
    flip = (b - a) == -1
    v = torch.where(flip, b, a) - 1  # the un-flipped crop's pixel (3, 3)
    i, j = v // SIZE, v % SIZE
    top, left = i - 3 + PAD, j - 3 + PAD
    return top.numpy(), left.numpy(), flip.numpy()


def _cells(top: np.ndarray, left: np.ndarray, flip: np.ndarray) -> np.ndarray:
    """Counts over the 2 * (2p+1)^2 (top, left, flip) cells."""
    k = 2 * PAD + 1
    return np.bincount((top * k + left) * 2 + flip.astype(int), minlength=2 * k * k)


# --------------------------------------------------------------------------- exact crop/flip


@pytest.mark.parametrize("padding", [1, 4])
def test_crop_flip_equals_torchvision_functional(padding):
    g = torch.Generator().manual_seed(padding)
    x = torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)
    combos = [
        (0, 0, False),
        (2 * padding, 2 * padding, True),
        (padding, padding, False),
        (0, 2 * padding, True),
        (2 * padding, 0, False),
        (1, padding, True),
    ]
    top = torch.tensor([c[0] for c in combos])
    left = torch.tensor([c[1] for c in combos])
    flip = torch.tensor([c[2] for c in combos])
    ours = Augmenter.crop_flip(x, padding, top, left, flip)
    for n, (t, l, f) in enumerate(combos):
        ref = TF.crop(TF.pad(x[n], [padding], fill=0), t, l, 32, 32)
        if f:
            ref = TF.hflip(ref)
        assert ours.dtype == torch.uint8
        assert torch.equal(ours[n], ref), (t, l, f)


def test_crop_flip_every_offset_small_image():
    x = _unique_image()[None].expand(2 * (2 * PAD + 1) ** 2, 1, SIZE, SIZE).contiguous()
    combos = list(itertools.product(range(2 * PAD + 1), range(2 * PAD + 1), (False, True)))
    top, left, flip = (torch.tensor(c) for c in zip(*combos))
    ours = Augmenter.crop_flip(x, PAD, top, left, flip)
    for n, (t, l, f) in enumerate(combos):
        ref = TF.crop(TF.pad(x[n], [PAD], fill=0), t, l, SIZE, SIZE)
        assert torch.equal(ours[n], TF.hflip(ref) if f else ref)
    # and the recovery helper used by the distribution test is right
    rt, rl, rf = _recover(ours)
    assert rt.tolist() == top.tolist() and rl.tolist() == left.tolist() and rf.tolist() == flip.tolist()


def test_padding_zero_only_flips():
    x = torch.randint(0, 256, (2, 1, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    z = torch.zeros(2, dtype=torch.long)
    out = Augmenter.crop_flip(x, 0, z, z, torch.tensor([False, True]))
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[1], x[1].flip(-1))


# ------------------------------------------------------------------------------ distribution


def test_distribution_matches_torchvision():
    img = _unique_image()
    policy = AugmentPolicy(crop_padding=PAD, flip=True, mean=(0.0,), std=(1.0,))
    aug = Augmenter(policy, "cpu")
    g = torch.Generator().manual_seed(1234)
    views = aug(img[None].expand(N_DRAWS, 1, SIZE, SIZE).contiguous(), g)  # one call, one batch
    ours = torch.round(views * 255.0).to(torch.uint8)
    o_top, o_left, o_flip = _recover(ours)

    torch.manual_seed(1234)
    tv = T.Compose([T.RandomCrop(SIZE, padding=PAD), T.RandomHorizontalFlip()])
    theirs = torch.stack([tv(img) for _ in range(N_DRAWS)])
    t_top, t_left, t_flip = _recover(theirs)

    ours_cells, theirs_cells = _cells(o_top, o_left, o_flip), _cells(t_top, t_left, t_flip)
    assert ours_cells.sum() == theirs_cells.sum() == N_DRAWS
    # both uniform over the (2p+1)^2 offsets x {flip, no flip}
    assert (ours_cells > 0).all() and (theirs_cells > 0).all()
    assert chisquare(ours_cells).pvalue > P_MIN
    assert chisquare(theirs_cells).pvalue > P_MIN
    # and the same distribution as each other (two-sample test)
    assert chi2_contingency(np.stack([ours_cells, theirs_cells])).pvalue > P_MIN
    # marginals: offsets in [0, 2p], flip rate 0.5 (4.5 sigma = 0.016 at 20000 draws)
    assert o_top.min() == 0 and o_top.max() == 2 * PAD and o_left.min() == 0 and o_left.max() == 2 * PAD
    assert abs(o_flip.mean() - 0.5) < 0.016
    assert abs(o_flip.mean() - t_flip.mean()) < 0.023
    # top and left are drawn independently (not top == left)
    assert np.mean(o_top == o_left) < 0.3


def test_views_are_per_sample():
    policy = AugmentPolicy(crop_padding=PAD, flip=True, mean=(0.0,), std=(1.0,))
    aug = Augmenter(policy, "cpu")
    g = torch.Generator().manual_seed(7)
    pair = _unique_image()[None].expand(2, 1, SIZE, SIZE).contiguous()
    differ = 0
    trials = 300
    for _ in range(trials):
        out = torch.round(aug(pair, g) * 255).to(torch.uint8)
        t, l, f = _recover(out)
        differ += (t[0], l[0], f[0]) != (t[1], l[1], f[1])
    # per-sample draws differ with probability 1 - 1/50; one draw per batch would never differ
    assert differ / trials > 0.9
    # two views of the same batch are independent draws too
    views_equal = sum(torch.equal(aug(pair, g), aug(pair, g)) for _ in range(50))
    assert views_equal < 5


def test_no_flip_policy_never_flips():
    policy = AugmentPolicy(crop_padding=PAD, flip=False, mean=(0.0,), std=(1.0,))
    aug = Augmenter(policy, "cpu")
    g = torch.Generator().manual_seed(0)
    top, left, flip = aug.sample_params(5000, g, torch.device("cpu"))
    assert not bool(flip.any())
    assert int(top.min()) == 0 and int(top.max()) == 2 * PAD and int(left.max()) == 2 * PAD
    out = torch.round(aug(_unique_image()[None].expand(5000, 1, SIZE, SIZE).contiguous(), g) * 255).to(torch.uint8)
    _, _, rf = _recover(out)
    assert not rf.any()


def test_digits_policy_has_no_flip(digits):
    assert digits.augment.flip is False
    assert digits.augment.crop_padding == 1


def test_same_seed_same_views():
    policy = AugmentPolicy(crop_padding=4, flip=True, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    aug = Augmenter(policy, "cpu")
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    c = aug(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ------------------------------------------------------------------------------- normalize


def test_normalize_matches_totensor_normalize():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    aug = Augmenter(AugmentPolicy(crop_padding=4, flip=True, mean=mean, std=std), "cpu")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    ref_t = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    ref = torch.stack([ref_t(np.ascontiguousarray(img.transpose(1, 2, 0))) for img in x])
    ours = aug.normalize(torch.from_numpy(x))
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # the input is not modified in place
    assert torch.equal(torch.from_numpy(x), torch.from_numpy(x.copy()))


# ----------------------------------------------------------------------------- batching


@pytest.mark.parametrize("n,bs", [(10, 4), (12, 4), (64, 64), (100, 7), (5, 3), (2, 2)])
def test_shuffled_batches_cover_every_index_once(n, bs):
    g = torch.Generator().manual_seed(0)
    batches = list(shuffled_batches(n, bs, g, torch.device("cpu")))
    flat = torch.cat(batches).tolist()
    assert sorted(flat) == list(range(n))
    assert all(len(b) <= bs for b in batches)
    assert len(batches) == steps_per_epoch(n, bs)


@pytest.mark.parametrize("n,bs", [(9, 4), (65, 64), (1, 4), (13, 3), (3, 2)])
def test_shuffled_batches_drop_final_batch_of_one(n, bs):
    g = torch.Generator().manual_seed(1)
    batches = list(shuffled_batches(n, bs, g, torch.device("cpu")))
    flat = torch.cat(batches).tolist() if batches else []
    assert len(flat) == n - 1 and len(set(flat)) == n - 1
    assert all(len(b) >= 2 for b in batches)
    assert len(batches) == steps_per_epoch(n, bs) == n // bs


def test_shuffled_batches_reshuffle_each_epoch_and_follow_seed():
    dev = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    e1 = torch.cat(list(shuffled_batches(50, 8, g, dev)))
    e2 = torch.cat(list(shuffled_batches(50, 8, g, dev)))
    assert not torch.equal(e1, e2)
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(torch.cat(list(shuffled_batches(50, 8, g2, dev))), e1)
