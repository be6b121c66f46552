"""cctr.metrics against medpy (the reference definition) and against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from medpy.metric import binary as mb
from scipy import ndimage

from cctr.errors import CctrError
from cctr.metrics import case_metrics, dice_per_class, summarize


def _medpy(pred: np.ndarray, gt: np.ndarray, c: int, spacing) -> tuple[float, float, float]:
    a, b = pred == c, gt == c
    return mb.dc(a, b), mb.hd95(a, b, voxelspacing=spacing), mb.asd(a, b, voxelspacing=spacing)


def _random_labels(rng: np.random.Generator, shape, num_classes: int, sigma: float) -> np.ndarray:
    """Blobby random label map: smoothed noise quantised into classes; blobs reach the volume border."""
    noise = ndimage.gaussian_filter(rng.random(shape), sigma)
    edges = np.quantile(noise, np.linspace(0, 1, num_classes + 1)[1:-1])
    return np.digitize(noise, edges).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_masks_match_medpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape, k = (20, 40, 40), 4
    gt = _random_labels(rng, shape, k, 2.0)
    pred = gt.copy()
    flip = ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.56  # blobs of wrong labels
    pred[flip] = rng.integers(0, k, int(flip.sum()))
    spacing = (2.5, 0.7, 1.1) if seed % 2 else (1.0, 1.0, 1.0)
    res = case_metrics(pred, gt, spacing, k)
    touches = False
    for c in range(1, k):
        ref = _medpy(pred, gt, c, spacing)
        assert abs(res["dice"][c - 1] - ref[0]) < 1e-6
        assert abs(res["hd95"][c - 1] - ref[1]) < 1e-6
        assert abs(res["asd"][c - 1] - ref[2]) < 1e-6
        m = gt == c
        touches |= bool(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, :, -1].any())
    assert touches  # the border case (erosion with outside = background) is really exercised


def test_mask_filling_a_border_slab_matches_medpy() -> None:
    """A mask that is the whole first slice: every voxel is surface only because of the border."""
    gt = np.zeros((8, 12, 10), np.uint8)
    gt[0] = 1
    gt[3:6, 2:9, 2:8] = 2
    pred = np.zeros_like(gt)
    pred[0:2, 1:, :] = 1
    pred[4:7, 3:10, 1:7] = 2
    spacing = (3.0, 0.8, 1.2)
    res = case_metrics(pred, gt, spacing, 3)
    for c in (1, 2):
        ref = _medpy(pred, gt, c, spacing)
        np.testing.assert_allclose([res[m][c - 1] for m in ("dice", "hd95", "asd")], ref, atol=1e-6, rtol=0)


def test_analytic_sphere_vs_cube_anisotropic() -> None:
    z, y, x = np.ogrid[:20, :40, :40]
    spacing = (2.0, 0.5, 0.75)
    # a sphere of radius 8 mm around the centre, in mm coordinates
    sphere = ((z - 10) * 2.0) ** 2 + ((y - 20) * 0.5) ** 2 + ((x - 20) * 0.75) ** 2 <= 64
    cube = np.zeros((20, 40, 40), bool)
    cube[6:15, 8:33, 12:29] = True
    pred = sphere.astype(np.uint8) + 2 * np.roll(cube, 3, axis=2).astype(np.uint8) * (~sphere)
    gt = np.roll(sphere, 2, axis=1).astype(np.uint8)
    gt[cube & (gt == 0)] = 2
    res = case_metrics(pred, gt, spacing, 3)
    for c in (1, 2):
        ref = _medpy(pred, gt, c, spacing)
        np.testing.assert_allclose([res[m][c - 1] for m in ("dice", "hd95", "asd")], ref, atol=1e-6, rtol=0)
    # a pure 2-voxel shift along y (1 mm) of a sphere: no surface distance exceeds 1 mm
    assert 0 < res["hd95"][0] <= 1.0 + 1e-9


def test_identical_masks() -> None:
    gt = np.zeros((6, 9, 9), np.uint8)
    gt[1:5, 2:7, 3:8] = 1
    res = case_metrics(gt, gt.copy(), (5.0, 1.0, 1.0), 2)
    assert res["dice"][0] == 1.0 and res["hd95"][0] == 0.0 and res["asd"][0] == 0.0


def test_dice_hand_count() -> None:
    pred = np.array([[[0, 1, 1, 2, 2, 2, 0, 0]]], np.uint8)
    gt = np.array([[[0, 1, 0, 2, 2, 0, 0, 1]]], np.uint8)
    # class 1: |P|=2, |G|=2, both=1 -> 0.5; class 2: |P|=3, |G|=2, both=2 -> 0.8; class 3: absent
    d = dice_per_class(pred, gt, 4)
    np.testing.assert_allclose(d[:2], [0.5, 0.8])
    assert np.isnan(d[2])
    np.testing.assert_allclose(case_metrics(pred, gt, (1, 1, 1), 4)["dice"][:2], [0.5, 0.8])


def test_dice_per_class_matches_case_metrics() -> None:
    rng = np.random.default_rng(5)
    gt = _random_labels(rng, (10, 20, 20), 4, 1.5)
    pred = _random_labels(rng, (10, 20, 20), 4, 1.5)
    np.testing.assert_allclose(dice_per_class(pred, gt, 4), case_metrics(pred, gt, (1, 1, 1), 4)["dice"])


def _one_sided(pred_has: bool, gt_has: bool) -> tuple[np.ndarray, np.ndarray]:
    pred = np.zeros((6, 10, 12), np.uint8)
    gt = np.zeros_like(pred)
    pred[1:3, 2:5, 2:5] = 2  # class 2 always present in both: the untouched control
    gt[1:3, 2:5, 3:6] = 2
    if pred_has:
        pred[4:6, 6:9, 6:9] = 1
    if gt_has:
        gt[4:6, 6:9, 7:10] = 1
    return pred, gt


def test_empty_masks_strict() -> None:
    spacing = (4.0, 1.5, 0.5)
    diag = float(np.sqrt((6 * 4.0) ** 2 + (10 * 1.5) ** 2 + (12 * 0.5) ** 2))
    for pred_has, gt_has in ((False, True), (True, False)):
        res = case_metrics(*_one_sided(pred_has, gt_has), spacing, 3)
        assert res["dice"][0] == 0.0
        assert res["hd95"][0] == pytest.approx(diag) and res["asd"][0] == pytest.approx(diag)
    res = case_metrics(*_one_sided(False, False), spacing, 3)
    assert np.isnan(res["dice"][0]) and np.isnan(res["hd95"][0]) and np.isnan(res["asd"][0])
    pred, gt = _one_sided(False, False)
    np.testing.assert_allclose(res["hd95"][1], mb.hd95(pred == 2, gt == 2, voxelspacing=spacing), atol=1e-6)


@pytest.mark.parametrize("convention", ["ssl4mis", "transunet"])
def test_empty_masks_peer_conventions(convention: str) -> None:
    expected = {(True, False): (1.0, 0.0, 0.0), (False, True): (0.0, 0.0, 0.0), (False, False): (0.0, 0.0, 0.0)}
    for (pred_has, gt_has), want in expected.items():
        res = case_metrics(*_one_sided(pred_has, gt_has), (4.0, 1.5, 0.5), 3, convention=convention)
        assert (res["dice"][0], res["hd95"][0], res["asd"][0]) == want
    # both present: medpy in voxel units, the given spacing ignored
    pred, gt = _one_sided(True, True)
    res = case_metrics(pred, gt, (4.0, 1.5, 0.5), 3, convention=convention)
    for c in (1, 2):
        np.testing.assert_allclose(
            [res[m][c - 1] for m in ("dice", "hd95", "asd")], _medpy(pred, gt, c, None), atol=1e-6, rtol=0
        )
    assert res["hd95"][0] == pytest.approx(1.0)  # one-voxel shift along x


def test_summarize_nan_handling() -> None:
    nan = np.nan
    rows = [
        {"dice": np.array([0.8, nan, 0.6]), "hd95": np.array([2.0, nan, 4.0]), "asd": np.array([1.0, nan, 1.0])},
        {"dice": np.array([0.4, 0.2, nan]), "hd95": np.array([nan, nan, nan]), "asd": np.array([3.0, 5.0, nan])},
    ]
    s = summarize(rows)
    assert s["n_cases"] == 2
    assert s["dice"] == pytest.approx((0.7 + 0.3) / 2)  # classes first (0.7, 0.3), then cases
    assert s["hd95"] == pytest.approx(3.0)  # the all-NaN case is skipped, not counted as 0
    assert s["asd"] == pytest.approx((1.0 + 4.0) / 2)
    np.testing.assert_allclose(s["dice_per_class"], [0.6, 0.2, 0.6])
    empty = summarize([{"dice": np.array([nan]), "hd95": np.array([nan]), "asd": np.array([nan])}])
    assert np.isnan(empty["dice"]) and np.isnan(summarize([])["hd95"])


def test_bad_inputs() -> None:
    a = np.zeros((4, 5, 6), np.uint8)
    with pytest.raises(CctrError, match="shape"):
        case_metrics(a, np.zeros((4, 5, 7), np.uint8), (1, 1, 1), 3)
    with pytest.raises(CctrError, match="label value 5"):
        case_metrics(a, a + 5, (1, 1, 1), 3)
    with pytest.raises(CctrError, match="convention"):
        case_metrics(a, a, (1, 1, 1), 3, convention="nnunet")
    with pytest.raises(CctrError, match="spacing"):
        case_metrics(a, a, (1, 0, 1), 3)
    with pytest.raises(CctrError, match="integer"):
        dice_per_class(a.astype(np.float32), a, 3)
