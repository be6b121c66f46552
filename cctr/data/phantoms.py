"""Built-in procedural phantoms: ACDC-like cardiac MRI and Synapse-like abdominal CT (DESIGN §3).

They exist so that every command runs with nothing downloaded, and so that the few-label setting is
a real problem on them: every case is a different "patient" (anatomy size, pose, shape, body habitus,
contrast and organ intensities all vary), and tissues that carry different labels overlap in intensity
(texture, noise, bias field, partial-volume blur, unlabelled look-alike tissues), so a segmenter has to
learn shape and context, not grey levels.

Everything is built implicitly on the voxel grid: each structure is an inequality on physical (mm)
coordinates that were first moved by a smooth random deformation, then painted in anatomical order into
a tissue map; labels and intensities are looked up from the tissue map. All randomness comes from one
generator seeded by (seed, index, kind), so a case is a pure function of its arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from scipy.ndimage import gaussian_filter

from cctr.data.case import Case, normalize_ct, normalize_mri
from cctr.errors import CctrError

PHANTOM_CASES: int = 40

_KINDS = {"phantom-cardiac": (1, "pc"), "phantom-abdomen": (2, "pa")}

F = np.float32
Coords = tuple[np.ndarray, np.ndarray, np.ndarray]


# ----------------------------------------------------------------------------- shared tools


def _interp_matrix(n_out: int, n_ctrl: int) -> np.ndarray:
    """Rows of normalised Gaussian weights: a smooth 1D upsampling from n_ctrl knots to n_out samples."""
    pos = np.linspace(0.0, n_ctrl - 1.0, n_out)
    w = np.exp(-0.5 * ((pos[:, None] - np.arange(n_ctrl)[None, :]) / 0.75) ** 2)
    return (w / w.sum(1, keepdims=True)).astype(F)


def _unit(f: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Zero mean, unit std over `axes`, estimated on a subsample (the fields are smooth, it is enough)."""
    sub = f[(Ellipsis, slice(None, None, 3), slice(None, None, 3))]
    f -= sub.mean(axis=axes, keepdims=True)
    f /= sub.std(axis=axes, keepdims=True) + 1e-6
    return f


def _smooth_fields(rng: np.random.Generator, shape: tuple[int, int, int], ctrl: tuple[int, int, int],
                   n: int) -> np.ndarray:
    """n smooth random fields of unit std: random knots on a coarse grid, upsampled separably.

    Separable upsampling (one contraction per axis) is far cheaper than filtering full-size volumes.
    """
    knots = rng.standard_normal((n, *ctrl)).astype(F)
    mz, my, mx = (_interp_matrix(s, c) for s, c in zip(shape, ctrl))
    f = np.einsum("nabc,xc->nabx", knots, mx)
    f = np.einsum("nabx,yb->nayx", f, my)
    return _unit(np.einsum("nayx,za->nzyx", f, mz), (1, 2, 3))


def _fine_texture(rng: np.random.Generator, shape: tuple[int, int, int], sigma: float) -> np.ndarray:
    """In-plane correlated noise of unit std: tissue texture (speckle, lobulation, trabeculation)."""
    t = gaussian_filter(rng.standard_normal(shape, dtype=F), sigma=(0.0, sigma, sigma))
    return _unit(t, (0, 1, 2))


def _rot(yaw: float = 0.0, tilt: float = 0.0) -> np.ndarray:
    """Rotation whose rows are the local axes (z, y, x): yaw about z (in-plane), then tilt in z-x."""
    cy, sy = np.cos(yaw), np.sin(yaw)
    ct, st = np.cos(tilt), np.sin(tilt)
    r_yaw = np.array([[1, 0, 0], [0, cy, sy], [0, -sy, cy]])
    r_tilt = np.array([[ct, 0, st], [0, 1, 0], [-st, 0, ct]])
    return r_tilt @ r_yaw


def _ell(p: Coords, c: tuple[float, float, float], a: tuple[float, float, float],
         rot: np.ndarray | None = None) -> np.ndarray:
    """Normalised ellipsoid radius (< 1 inside) of centre c, semi-axes a (mm), optional rotation."""
    d = [p[i] - F(c[i]) for i in range(3)]
    if rot is not None:
        d = [F(rot[k, 0]) * d[0] + F(rot[k, 1]) * d[1] + F(rot[k, 2]) * d[2] for k in range(3)]
    return np.sqrt((d[0] / F(a[0])) ** 2 + (d[1] / F(a[1])) ** 2 + (d[2] / F(a[2])) ** 2)


class _Space:
    """Deformed physical coordinates (mm) of every voxel, with cheap sub-block lookup.

    Most structures are small: evaluating them only inside the block of voxels whose (deformed)
    coordinates fall in their bounding box is what keeps a whole dataset build within seconds.
    """

    def __init__(self, p: Coords) -> None:
        self.p = p
        self.shape: tuple[int, int, int] = p[0].shape  # type: ignore[assignment]
        # per index along each axis, the range of each coordinate over the other two axes
        self._ext = [[(a.min(axis=tuple(o for o in range(3) if o != ax)),
                       a.max(axis=tuple(o for o in range(3) if o != ax))) for a in p] for ax in range(3)]

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """A block (conservative) holding every voxel whose coordinates lie in [lo, hi]."""
        out = []
        for ax in range(3):
            ok = np.ones(self.shape[ax], bool)
            for c in range(3):
                mn, mx = self._ext[ax][c]
                ok &= (mx >= lo[c]) & (mn <= hi[c])
            hit = np.flatnonzero(ok)
            if not len(hit):
                return None
            out.append(slice(int(hit[0]), int(hit[-1]) + 1))
        return tuple(out)  # type: ignore[return-value]

    def sub(self, sl: tuple[slice, slice, slice]) -> Coords:
        return tuple(a[sl] for a in self.p)  # type: ignore[return-value]


Region = tuple[tuple[slice, slice, slice], np.ndarray]


def _ell_in(sp: _Space, c: tuple[float, float, float], a: tuple[float, float, float],
            rot: np.ndarray | None = None, pert: np.ndarray | None = None, amp: float = 0.0) -> Region | None:
    """Normalised radius of a (perturbed) ellipsoid, evaluated on its bounding block only."""
    reach = np.asarray(a, float) * (1 + 3 * amp) if rot is None else np.full(3, max(a) * (1 + 3 * amp))
    sl = sp.box(np.asarray(c) - reach, np.asarray(c) + reach)
    if sl is None:
        return None
    r = _ell(sp.sub(sl), c, a, rot)
    if pert is not None:
        r += F(amp) * pert[sl]
    return sl, r


def _curve(knots: np.ndarray, radii: np.ndarray, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense samples of a smooth curve through knots (piecewise linear, then smoothed), and radii."""
    t = np.linspace(0.0, len(knots) - 1.0, samples)
    pts = np.stack([np.interp(t, np.arange(len(knots)), knots[:, i]) for i in range(3)], 1)
    pts = gaussian_filter(pts, sigma=(samples / (4.0 * len(knots)), 0), mode="nearest")
    return pts, np.interp(t, np.arange(len(radii)), radii)


def _tube(sp: _Space, knots: np.ndarray, radii: np.ndarray, samples: int = 28, slack: float = 0.0
          ) -> Region | None:
    """Signed distance (mm, < 0 inside) to a tube of varying radius along a smooth curve, on its block.

    The tube is the union of balls along the curve; `slack` widens the block for later perturbation.
    """
    pts, rad = _curve(knots, radii, samples)
    sl = sp.box(pts.min(0) - rad.max() - slack, pts.max(0) + rad.max() + slack)
    if sl is None:
        return None
    z, y, x = sp.sub(sl)
    out = np.full(z.shape, np.inf, dtype=F)
    for q, r in zip(pts, rad):
        d = np.sqrt((z - F(q[0])) ** 2 + (y - F(q[1])) ** 2 + (x - F(q[2])) ** 2) - F(r)
        np.minimum(out, d, out=out)
    return sl, out


def _paint(tissue: np.ndarray, reg: Region | None, inside: Callable[[np.ndarray], np.ndarray], tid: int,
           allowed: np.ndarray | None = None) -> None:
    """Set tissue `tid` on a region where `inside(values)` holds (and `allowed`, a full-size mask)."""
    if reg is None:
        return
    sl, v = reg
    m = inside(v)
    if allowed is not None:
        m &= allowed[sl]
    tissue[sl][m] = tid


def _grid(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Coords:
    """Physical coordinates (mm) of every voxel, z from the first slice, y/x from the image centre."""
    nz, h, w = shape
    z = (np.arange(nz, dtype=F) * F(spacing[0]))[:, None, None]
    y = ((np.arange(h, dtype=F) - h / 2) * F(spacing[1]))[None, :, None]
    x = ((np.arange(w, dtype=F) - w / 2) * F(spacing[2]))[None, None, :]
    return tuple(np.broadcast_to(a, shape).astype(F) for a in (z, y, x))  # type: ignore[return-value]


def _render(tissue: np.ndarray, means: np.ndarray, tex_amp: np.ndarray, textures: np.ndarray,
            hetero: np.ndarray) -> np.ndarray:
    """Intensity from the tissue map: per-tissue mean, plus per-tissue texture and slow heterogeneity."""
    img = means[tissue].astype(F)
    img += tex_amp[tissue, 0] * textures[0] + tex_amp[tissue, 1] * textures[1]
    img += tex_amp[tissue, 2] * hetero
    return img


def _affine(spacing: tuple[float, float, float]) -> np.ndarray:
    return np.diag([*spacing, 1.0]).astype(np.float64)


# ----------------------------------------------------------------------------- cardiac (ACDC-like)

# tissue ids -> label (0 bg, 1 RV, 2 Myo, 3 LV)
_C_AIR, _C_LUNG, _C_FAT, _C_MUSCLE, _C_MYO, _C_LV, _C_RV, _C_PAP, _C_TRAB, _C_LIVER, _C_MARROW, \
    _C_CORTEX, _C_CSF, _C_AORTA, _C_RVWALL, _C_STOMACH = range(16)
_C_LABEL = np.zeros(16, np.uint8)
_C_LABEL[[_C_LV, _C_PAP, _C_TRAB]] = 3
_C_LABEL[_C_MYO] = 2
_C_LABEL[_C_RV] = 1


def _cardiac(rng: np.random.Generator, case_id: str) -> Case:
    """Short-axis cine-MRI-like stack, base (slice 0) to apex, with the LV, its myocardium and the RV."""
    s = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    nz = int(rng.integers(8, 15))
    h, w = (int(rng.integers(56, 73)) * 2 for _ in range(2))
    dxy = s(1.3, 1.75)
    dz = s(8.5, 10.5)
    spacing = (round(dz, 3), round(dxy, 3), round(dxy, 3))
    shape = (nz, h, w)
    _, y0, x0 = _grid(shape, spacing)

    # pose: in-plane rotation of the whole view (short-axis planes are prescribed by hand), then a
    # smooth in-plane deformation
    th = s(-0.5, 0.5)
    deform = _smooth_fields(rng, shape, (3, 5, 5), 2) * F(s(2.0, 5.0))
    y = F(np.cos(th)) * y0 - F(np.sin(th)) * x0 + deform[0]
    x = F(np.sin(th)) * y0 + F(np.cos(th)) * x0 + deform[1]
    del deform
    noise = _smooth_fields(rng, shape, (3, 6, 6), 4)
    tex = np.stack([_fine_texture(rng, shape, 1.0), _fine_texture(rng, shape, 2.5)])

    # long-axis position t per slice: 1 at the base, 0 at the apex
    t = np.linspace(s(0.88, 1.0), s(-0.08, 0.12), nz).astype(F)[:, None, None]

    # heart centre drifts across slices (the long axis is not perpendicular to the slices)
    c0 = rng.uniform(-12, 12, 2)
    drift = rng.uniform(-10, 10, 2)
    hy = y - F(c0[0]) - F(drift[0]) * (1 - t)
    hx = x - F(c0[1]) - F(drift[1]) * (1 - t)
    rho = np.sqrt(hy**2 + hx**2)
    phi = np.arctan2(hy, hx)

    # LV cavity and epicardium: truncated super-ellipsoid profiles along the long axis; end-diastole
    # (large cavity, thin wall) to end-systole (small cavity, thick wall)
    r_cav = s(15.0, 30.0)
    wall = s(6.0, 11.0) * (1.3 - 0.5 * (r_cav - 15) / 15)
    p_exp = s(1.6, 2.6)
    h_cav = s(0.82, 0.95)

    def profile(radius: float, height: float) -> np.ndarray:
        q = np.clip((1 - t) / F(height), 0, 1)
        return F(radius) * (1 - q**p_exp) ** (1 / p_exp)

    shape_mod = F(1.0) + F(s(0.02, 0.09)) * np.cos(2 * (phi - F(s(0, np.pi)))) \
        + F(s(0.0, 0.04)) * np.cos(3 * (phi - F(s(0, np.pi)))) + F(0.04) * noise[0]
    r_c = profile(r_cav, h_cav) * shape_mod
    r_e = profile(r_cav + wall, 1.0) * shape_mod * (1 + F(0.05) * noise[1])
    r_e = np.where(r_c > 0, np.maximum(r_e, r_c + F(3.0)), r_e)  # the wall never opens
    cav = rho < r_c
    myo = (rho < r_e) & ~cav

    # RV: crescent hugging the epicardium on one side, vanishing towards the apex
    phi_rv = s(2.8, 3.9)
    t_rv = s(0.1, 0.35)
    g = np.clip((t - F(t_rv)) / F(1 - t_rv), 0, 1) ** 0.6
    half = F(s(1.2, 1.8)) * (0.55 + 0.45 * g)
    dphi = np.abs(np.remainder(phi - F(phi_rv) + F(np.pi), F(2 * np.pi)) - F(np.pi))
    in_arc = dphi < half
    taper = np.sqrt(np.clip(np.cos(F(np.pi / 2) * np.minimum(dphi / half, 1)), 0, 1))
    thick = F(s(14.0, 34.0)) * g * taper * (1 + F(0.15) * noise[2])
    outside = rho - r_e
    rv_wall_w = F(s(2.0, 4.0))
    rv = (outside > 0) & (outside < thick) & in_arc
    rv_wall = (outside > 0) & (outside < thick + rv_wall_w) & (dphi < half * 1.1) & ~rv & (thick > 0.5)
    heart_out = np.where(dphi < half * 1.1, thick + rv_wall_w, 0) + r_e
    heart_fat = (rho - heart_out < np.clip(F(s(1.0, 6.0)) + F(3.0) * noise[3], 0, None)) & (r_e > 0)

    # thorax: body ellipse posterior and to the patient's right of the heart, anterior wall close to it
    sub_fat, muscle_w = s(4.0, 18.0), s(7.0, 14.0)
    ay, ax = s(95, 125), s(125, 165)
    by = c0[0] - (r_cav + wall) - s(8, 30) - sub_fat - muscle_w + ay
    bx = c0[1] + s(-50, -15)
    by_, bx_ = y - F(by), x - F(bx)
    rb = np.sqrt((by_ / F(ay)) ** 2 + (bx_ / F(ax)) ** 2)
    depth = (1 - rb) * np.sqrt(by_**2 + bx_**2) / np.maximum(rb, F(1e-3))  # mm inside the skin
    inner = depth > sub_fat + muscle_w

    tissue = np.zeros(shape, np.uint8)
    tissue[depth > 0] = _C_FAT
    tissue[depth > sub_fat] = _C_MUSCLE
    tissue[inner] = _C_LUNG

    # spine, spinal canal, paraspinal muscles and the descending aorta at the back of the thorax
    vb_r = s(13.0, 17.0)
    vy, vx = by + ay - sub_fat - s(45, 60), bx + s(-8, 8)
    tissue[(_ell((t, y, x), (0, vy + vb_r + 14, vx), (1e9, 24, 40)) < 1) & (depth > sub_fat)] = _C_MUSCLE
    vb = np.sqrt((y - F(vy)) ** 2 + (x - F(vx)) ** 2)
    tissue[vb < vb_r] = _C_CORTEX
    tissue[vb < vb_r - 2.0] = _C_MARROW
    canal = np.sqrt((y - F(vy + vb_r + 9)) ** 2 + (x - F(vx)) ** 2)
    tissue[(canal < 10.0) & (canal >= 6.5)] = _C_CORTEX
    tissue[canal < 6.5] = _C_CSF
    ao_r = s(9.0, 13.0)
    ao_c = (vy - s(0, 0.7) * (vb_r + ao_r), vx + (vb_r + ao_r + 3) * s(0.6, 1.0))
    ao = np.sqrt((y - F(ao_c[0])) ** 2 + (x - F(ao_c[1])) ** 2)
    tissue[ao < ao_r + 2.5] = _C_FAT
    tissue[ao < ao_r] = _C_AORTA

    # liver (and sometimes the stomach) under the diaphragm, entering towards the apex
    grow = np.clip((F(s(0.3, 0.75)) - t) / F(0.35), 0, 1) ** 0.5
    lc = (c0[0] + s(45, 80), c0[1] + s(-70, -25))
    r_liv = F(s(45, 80)) * grow * (1 + F(0.08) * noise[3])
    tissue[inner & (np.sqrt((y - F(lc[0])) ** 2 + (x - F(lc[1])) ** 2) < r_liv)] = _C_LIVER
    sc = (c0[0] + s(30, 60), c0[1] + s(50, 90))
    r_st = F(s(0, 35)) * grow
    tissue[inner & (np.sqrt((y - F(sc[0])) ** 2 + (x - F(sc[1])) ** 2) < r_st)] = _C_STOMACH

    # the heart, painted last: fat pad, RV wall, myocardium, blood pools, trabeculae, papillary muscles
    tissue[heart_fat & (depth > sub_fat)] = _C_FAT
    tissue[rv_wall] = _C_RVWALL
    tissue[myo] = _C_MYO
    tissue[cav] = _C_LV
    tissue[rv] = _C_RV
    tissue[cav & (rho > 0.8 * r_c) & (tex[1] > 0.6)] = _C_TRAB
    pap_on = (t > 0.3) & (t < 0.85)
    for k in (-1, 1):
        pa = phi_rv + np.pi + k * 0.8 + s(-0.3, 0.3)
        pr = s(2.5, 5.5)
        dist = np.sqrt((F(0.68 * np.sin(pa)) * r_c - hy) ** 2 + (F(0.68 * np.cos(pa)) * r_c - hx) ** 2)
        tissue[cav & pap_on & (dist < pr)] = _C_PAP

    # bSSFP-like contrast, drawn per patient: blood and fat bright, muscle/myocardium dark, lungs black
    blood = s(0.65, 1.0)
    myo_i = s(0.15, 0.35)
    means = np.zeros(16, F)
    means[_C_LUNG] = s(0.02, 0.09)
    means[_C_FAT] = s(0.5, 0.95)
    means[_C_MUSCLE] = myo_i * s(0.8, 1.3)
    means[_C_MYO] = myo_i
    means[_C_LV] = blood
    means[_C_RV] = blood * s(0.8, 1.05)
    means[_C_PAP] = myo_i * s(0.9, 1.3)
    means[_C_TRAB] = 0.5 * (myo_i + blood)
    means[_C_LIVER] = s(0.2, 0.42)
    means[_C_MARROW] = s(0.3, 0.6)
    means[_C_CORTEX] = 0.04
    means[_C_CSF] = s(0.6, 1.0)
    means[_C_AORTA] = blood * s(0.55, 1.0)
    means[_C_RVWALL] = myo_i * s(0.9, 1.3)
    means[_C_STOMACH] = s(0.3, 0.8)
    tex_amp = np.zeros((16, 3), F)
    tex_amp[:, 0] = 0.03
    tex_amp[[_C_LV, _C_RV, _C_AORTA], 1] = 0.06  # flow-related inhomogeneity of blood
    tex_amp[[_C_FAT, _C_LIVER, _C_STOMACH, _C_LUNG], 1] = 0.05
    tex_amp[[_C_LV, _C_RV, _C_MYO, _C_LIVER, _C_FAT], 2] = 0.05
    img = _render(tissue, means, tex_amp, tex, noise[2])
    # slow flow darkens the blood towards the apex
    blood_px = (tissue == _C_LV) | (tissue == _C_RV)
    img[blood_px] *= (F(0.75) + F(0.25) * np.broadcast_to(t, shape))[blood_px]

    # acquisition: partial volume, coil shading (smooth multiplicative bias), Rician noise
    img = gaussian_filter(img, sigma=(0.0, s(0.5, 0.9), s(0.5, 0.9)))
    gdir = s(0, 2 * np.pi)
    ramp = (F(np.cos(gdir)) * y0 + F(np.sin(gdir)) * x0) / F(100.0)
    img *= np.exp(F(s(0.1, 0.3)) * noise[1][::-1] + F(s(0.0, 0.35)) * ramp)
    sd = F(s(0.02, 0.06) * blood)
    n1 = rng.standard_normal(shape, dtype=F) * sd
    n2 = rng.standard_normal(shape, dtype=F) * sd
    img = np.sqrt((img + n1) ** 2 + n2**2)

    return Case(case_id, normalize_mri(img), _C_LABEL[tissue], spacing, _affine(spacing))


# ----------------------------------------------------------------------------- abdomen (Synapse-like)

# tissue ids -> label (0 bg, 1 aorta, 2 gallbladder, 3 L kidney, 4 R kidney, 5 liver, 6 pancreas,
# 7 spleen, 8 stomach). Image x grows to the patient's left (radiological), y grows posterior.
(_A_AIR, _A_FAT, _A_MUSCLE, _A_CORTEX, _A_MARROW, _A_CSF, _A_AORTA, _A_IVC, _A_VEIN, _A_LIVER,
 _A_LIVVES, _A_GB, _A_LKC, _A_LKM, _A_RKC, _A_RKM, _A_SINUS, _A_SPLEEN, _A_STWALL, _A_STFLUID,
 _A_STAIR, _A_PANC, _A_BOWEL, _A_BOWCONT, _A_GAS, _A_STOOL, _A_VISFAT) = range(27)
_A_N = 27
_A_LABEL = np.zeros(_A_N, np.uint8)
for _t, _l in ((_A_AORTA, 1), (_A_GB, 2), (_A_LKC, 3), (_A_LKM, 3), (_A_RKC, 4), (_A_RKM, 4),
               (_A_LIVER, 5), (_A_LIVVES, 5), (_A_PANC, 6), (_A_SPLEEN, 7), (_A_STWALL, 8),
               (_A_STFLUID, 8), (_A_STAIR, 8)):
    _A_LABEL[_t] = _l


def _abdomen(rng: np.random.Generator, case_id: str) -> Case:
    """Axial contrast CT from the liver dome to below the kidneys, built in Hounsfield units."""
    s = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731

    # habitus first, then a field of view that frames it (as a CT operator would)
    nz = int(rng.integers(24, 41))
    dz = float(np.clip(rng.uniform(130, 190) / nz, 2.5, 5.0))
    n_xy = int(rng.integers(64, 81)) * 2
    bx_half = s(125, 185)
    by_half = bx_half / s(1.2, 1.55)
    dxy = float(np.clip(2 * bx_half / (s(0.76, 0.92) * n_xy), 2.0, 3.2))
    bx_half = min(bx_half, n_xy * dxy / 2 - 6)
    spacing = (round(dz, 3), round(dxy, 3), round(dxy, 3))
    shape = (nz, n_xy, n_xy)
    zi, yi, xi = _grid(shape, spacing)
    span = nz * dz * s(0.9, 1.1)  # anatomical length the scan covers
    z0 = nz * dz * s(-0.06, 0.04)
    org = (bx_half / 155) ** 0.4 * s(0.9, 1.1)  # organ scale, loosely tied to body size

    # pose (table offset, small in-plane rotation) and a smooth non-rigid deformation of the whole anatomy
    cy, cx = s(-10, 10), s(-10, 10)
    th = s(-0.12, 0.12)
    y0, x0 = yi - F(cy), xi - F(cx)
    deform = _smooth_fields(rng, shape, (4, 5, 5), 3) * F(s(3.0, 8.0))
    z = zi + deform[0] * F(0.5)
    y = F(np.cos(th)) * y0 - F(np.sin(th)) * x0 + deform[1]
    x = F(np.sin(th)) * y0 + F(np.cos(th)) * x0 + deform[2]
    del deform, y0, x0
    u = (z - F(z0)) / F(span)  # 0 at the liver dome, 1 below the kidneys
    noise = _smooth_fields(rng, shape, (4, 6, 6), 6)
    sp = _Space((z, y, x))

    # body wall: superellipse (flatter back), subcutaneous fat, muscle wall, peritoneal cavity
    rb = ((np.abs(y) / F(by_half)) ** 2.3 + (np.abs(x) / F(bx_half)) ** 2.3) ** F(1 / 2.3)
    depth = (1 - rb) * np.sqrt(y**2 + x**2) / np.maximum(rb, F(1e-3))  # mm inside the skin
    fat_mean = s(5.0, 35.0)
    sub_fat = fat_mean * (1 + F(0.25) * noise[0])
    wall_w = s(7.0, 15.0)
    cav_d = sub_fat + F(wall_w)
    cav_y, cav_x = by_half - fat_mean - wall_w, bx_half - fat_mean - wall_w
    inside = depth > cav_d

    tissue = np.zeros(shape, np.uint8)
    tissue[depth > 0] = _A_FAT
    tissue[depth > sub_fat] = _A_MUSCLE
    tissue[inside] = _A_VISFAT

    # ribs: oblique bands in the wall of the upper abdomen, seen as arcs in axial slices
    band = (depth > sub_fat + 1) & (depth < cav_d + 1) & (u < 0.6) & (y > -0.4 * by_half)
    ang = np.arctan2(y[band] / F(by_half), x[band] / F(bx_half))
    phase = np.cos(2 * np.pi * (z[band] + F(s(18, 30)) * ang) / F(s(24, 32)))
    band[band] = phase > 0.8
    tissue[band] = _A_CORTEX

    # spine, canal, spinous process, paraspinal and psoas muscles
    vb_r = s(15, 20)
    vy = by_half - fat_mean - s(45, 60)
    vx = s(-4, 4)
    for side in (-1, 1):
        _paint(tissue, _ell_in(sp, (0, vy + 32, vx + side * 30), (1e9, 22, 27)), lambda r: r < 1, _A_MUSCLE,
               depth > sub_fat)
        ps = _ell_in(sp, (0, vy + 2, vx + side * (vb_r + 13)), (1e9, 22, 22))
        if ps is not None:
            sl, r = ps
            grow = np.clip((u[sl] - 0.35) / 0.5, 0, 1)
            tissue[sl][r < grow] = _A_MUSCLE
    vb = _ell_in(sp, (0, vy, vx), (1e9, vb_r * 0.9, vb_r))
    _paint(tissue, vb, lambda r: r < 1, _A_CORTEX)
    _paint(tissue, vb, lambda r: r < 0.85, _A_MARROW)
    canal = _ell_in(sp, (0, vy + vb_r + 10, vx), (1e9, 13, 13))
    _paint(tissue, canal, lambda r: r < 1, _A_CORTEX)
    _paint(tissue, canal, lambda r: r < 0.55, _A_CSF)
    _paint(tissue, _ell_in(sp, (0, vy + vb_r + 28, vx), (1e9, 12, 5)), lambda r: r < 1, _A_CORTEX)

    # great vessels: aorta anterior and slightly left of the spine, IVC on the right
    ao_r = s(8.5, 13.0)
    ao_y, ao_x = vy - vb_r - ao_r - s(1, 5), vx + s(5, 16)
    _paint(tissue, _ell_in(sp, (0, ao_y, ao_x), (1e9, ao_r, ao_r), None, noise[1], 0.04), lambda r: r < 1, _A_AORTA)
    ivc_y, ivc_x = ao_y - s(0, 10), vx - s(20, 32)
    ivc = _ell_in(sp, (0, ivc_y, ivc_x), (1e9, s(8, 11), s(11, 15)))
    if ivc is not None:
        tissue[ivc[0]][(ivc[1] < 1) & (u[ivc[0]] > 0.08)] = _A_IVC

    # organs only displace visceral fat, never bone, muscle or the great vessels
    soft = tissue == _A_VISFAT

    # liver: right lobe + left lobe, filling the right upper quadrant up to the wall
    ls = org * s(0.85, 1.15)
    right = _ell(sp.p, (z0 + span * s(0.26, 0.32), s(-0.15, 0.05) * cav_y, -s(0.4, 0.5) * cav_x),
                 (span * 0.33 * ls, 0.85 * cav_y * ls, 0.6 * cav_x * ls), _rot(s(-0.2, 0.2)))
    left_lobe = _ell(sp.p, (z0 + span * s(0.16, 0.25), -s(0.4, 0.6) * cav_y, s(-0.05, 0.15) * cav_x),
                     (span * 0.18 * ls, 0.35 * cav_y * ls, 0.5 * cav_x * s(0.8, 1.2)), _rot(s(-0.3, 0.1)))
    liver_m = (np.minimum(right, left_lobe) + F(0.07) * noise[2] < 1) & soft
    del right, left_lobe
    tissue[liver_m] = _A_LIVER
    # intrahepatic vessels (labelled liver in the reference annotations, enhanced like blood)
    hil = np.array([z0 + span * 0.4, -0.15 * cav_y, -0.25 * cav_x])
    for _ in range(int(rng.integers(4, 8))):
        tip = hil + np.array([s(-0.35, 0.1) * span, s(-0.6, 0.6) * cav_y, s(-0.75, 0.05) * cav_x])
        mid = 0.5 * (hil + tip) + rng.uniform(-12, 12, 3)
        _paint(tissue, _tube(sp, np.stack([hil, mid, tip]), np.array([s(3.5, 5.5), s(2.5, 3.5), 1.5]), 14),
               lambda d: d < 0, _A_LIVVES, liver_m)

    # stomach: fundus under the left diaphragm + body sweeping anteriorly; air-fluid level
    st = org * s(0.7, 1.3)
    fund = _ell(sp.p, (z0 + span * s(0.1, 0.2), s(-0.15, 0.15) * cav_y, s(0.3, 0.45) * cav_x),
                (span * 0.14 * st, 38 * st, 36 * st))
    body = _ell(sp.p, (z0 + span * s(0.28, 0.4), -s(0.35, 0.55) * cav_y, s(0.05, 0.25) * cav_x),
                (span * 0.14 * st, 24 * st, 50 * st), _rot(s(-0.5, 0.1)))
    stomach = np.minimum(fund, body) + F(0.06) * noise[3]
    del fund, body
    st_m = (stomach < 1) & soft
    tissue[st_m] = _A_STWALL
    lumen = st_m & (stomach < 1 - s(4.0, 7.0) / (36 * st))
    tissue[lumen] = _A_STFLUID
    if lumen.any():
        air_level = np.quantile(yi[lumen], s(0.0, 0.4))  # gravity: gas rises to the front (image top)
        tissue[lumen & (yi < air_level)] = _A_STAIR

    # spleen: crescent against the left posterolateral wall
    ss = org * s(0.75, 1.3)
    sp_c = (z0 + span * s(0.22, 0.34), vy - s(-10, 25), s(0.6, 0.75) * cav_x)
    sp_rot = _rot(s(-0.9, -0.5))
    spleen = _ell_in(sp, sp_c, (span * 0.17 * ss, 50 * ss, 22 * ss), sp_rot, noise[4], 0.06)
    if spleen is not None:
        sl, r = spleen
        notch = _ell(sp.sub(sl), (sp_c[0], sp_c[1] - 12, sp_c[2] - 28 * ss), (span * 0.2, 40 * ss, 18 * ss), sp_rot)
        tissue[sl][(r < 1) & (notch > 1) & soft[sl]] = _A_SPLEEN

    # kidneys: bean shapes beside the spine, the right one lower; cortex, medulla, sinus fat
    for side, cort, med, zk in ((1, _A_LKC, _A_LKM, s(0.48, 0.58)), (-1, _A_RKC, _A_RKM, s(0.56, 0.68))):
        ks = org * s(0.85, 1.15)
        kc = (z0 + span * zk, vy - s(0, 12), vx + side * (vb_r + s(40, 55)))
        krot = _rot(side * s(0.35, 0.8), side * s(0.05, 0.25))
        kid = _ell_in(sp, kc, (span * 0.26 * ks, 24 * ks, 30 * ks), krot, noise[5], 0.04)
        if kid is None:
            continue
        sl, r = kid
        # the sinus sits on the medial (hilar) side: shift it in the kidney's own frame
        sinus = _ell(sp.sub(sl), tuple(np.asarray(kc) + krot.T @ np.array([0, 0, -side * 19 * ks])),
                     (span * 0.14 * ks, 11 * ks, 16 * ks), krot)
        view, ok = tissue[sl], soft[sl]
        view[(r < 1) & (sinus > 1) & ok] = cort
        view[(r < s(0.55, 0.75)) & (sinus > 1) & ok] = med
        view[(r < 1) & (sinus <= 1) & ok] = _A_SINUS

    # gallbladder under the liver, anterior
    gs = org * s(0.7, 1.3)
    gb = _ell_in(sp, (z0 + span * s(0.45, 0.56), -s(0.3, 0.55) * cav_y, -s(0.2, 0.42) * cav_x),
                 (span * 0.1 * gs, 14 * gs, 19 * gs), _rot(s(-0.8, 0.8), s(-0.4, 0.4)))
    _paint(tissue, gb, lambda r: r < 1, _A_GB, soft)

    # pancreas: head by the duodenum, neck over the vessels, tail to the splenic hilum
    pk = np.array([
        [z0 + span * s(0.52, 0.6), ao_y - s(10, 25), vx - s(25, 40)],
        [z0 + span * s(0.46, 0.53), ao_y - ao_r - s(14, 24), vx + s(-5, 8)],
        [z0 + span * s(0.4, 0.48), ao_y - s(5, 15), vx + s(35, 55)],
        [z0 + span * s(0.34, 0.43), sp_c[1] - s(5, 20), sp_c[2] - s(25, 38)],
    ])
    prad = org * np.array([s(12, 17), s(7, 10), s(8, 12), s(7, 11)])
    panc = _tube(sp, pk, prad, slack=6.0)
    if panc is not None:
        panc[1][:] += F(2.0) * noise[2][panc[0]]
    _paint(tissue, panc, lambda d: d < 0, _A_PANC, soft)
    _paint(tissue, _tube(sp, pk[1:] + np.array([0, 9.0, 0]), np.array([4.5, 4.0, 3.5]), 16), lambda d: d < 0,
           _A_VEIN, tissue == _A_VISFAT)

    # duodenum, small bowel, colon: unlabelled, with intensities overlapping the organs
    tex = np.stack([_fine_texture(rng, shape, 0.8), _fine_texture(rng, shape, 2.0)])
    free = inside & (tissue == _A_VISFAT)
    bowel = np.zeros(shape, bool)
    duo = _tube(sp, pk[0] + np.array([[-span * 0.08, -12, 12], [0, -6, -24], [span * 0.12, 6, -4],
                                      [span * 0.15, 4, 40]]), np.array([11.0, 12, 11, 10]), 20)
    if duo is not None:
        bowel[duo[0]] |= duo[1] < 0
    for _ in range(int(rng.integers(8, 16))):
        loop = _ell_in(sp, (z0 + span * s(0.55, 1.05), s(-0.85, 0.2) * cav_y, s(-0.7, 0.7) * cav_x),
                       (s(12, 25), s(10, 20), s(10, 20)))
        if loop is not None:
            bowel[loop[0]] |= loop[1] < 1
    bowel &= free
    tissue[bowel] = _A_BOWEL
    tissue[bowel & (noise[3] + F(0.5) * tex[1] > 0.3)] = _A_BOWCONT
    colon = np.zeros(shape, bool)
    for side in (-1, 1):
        c = _ell_in(sp, (0, -s(0.15, 0.5) * cav_y, side * s(0.68, 0.8) * cav_x), (1e9, 19, 19))
        if c is not None:
            colon[c[0]] |= (c[1] < 1) & (u[c[0]] > s(0.35, 0.55))
    tc = _ell_in(sp, (z0 + span * s(0.6, 0.75), -s(0.6, 0.8) * cav_y, 0), (span * 0.06, 18, 0.9 * cav_x))
    if tc is not None:
        colon[tc[0]] |= tc[1] < 1
    colon &= inside & np.isin(tissue, (_A_VISFAT, _A_BOWEL, _A_BOWCONT))
    tissue[colon] = _A_STOOL
    tissue[colon & (noise[4] > 0.0)] = _A_GAS

    # contrast phase and per-patient organ intensities (HU)
    phase = s(0, 1)  # 0 late arterial .. 1 portal venous
    hu = {
        _A_AIR: -1000.0, _A_FAT: s(-115, -85), _A_MUSCLE: s(35, 60), _A_CORTEX: s(550, 850),
        _A_MARROW: s(150, 300), _A_CSF: s(0, 20), _A_AORTA: 280 - 90 * phase + s(-40, 40),
        _A_IVC: 60 + 110 * phase + s(-20, 20), _A_LIVER: 45 + 30 * phase + s(-10, 15),
        _A_GB: s(-5, 25), _A_SINUS: s(-90, -20), _A_SPLEEN: 50 + 20 * phase + s(-20, 20),
        _A_STWALL: s(35, 75), _A_STFLUID: s(0, 40), _A_STAIR: s(-1000, -850),
        _A_PANC: s(25, 65), _A_BOWEL: s(30, 70), _A_BOWCONT: s(-10, 45), _A_GAS: s(-1000, -800),
        _A_STOOL: s(-150, 40), _A_VISFAT: s(-110, -80),
    }
    hu[_A_VEIN] = hu[_A_IVC] + s(-20, 20)
    hu[_A_LIVVES] = hu[_A_IVC] * s(0.7, 1.0) + s(0, 30)
    for c_id, m_id in ((_A_LKC, _A_LKM), (_A_RKC, _A_RKM)):
        hu[c_id] = s(140, 220)
        hu[m_id] = hu[c_id] - (1 - phase) * s(40, 90) - s(0, 20)
    means = np.zeros(_A_N, F)
    for k, v in hu.items():
        means[k] = v
    tex_amp = np.zeros((_A_N, 3), F)
    tex_amp[:, 0] = 6.0
    tex_amp[[_A_PANC, _A_STOOL, _A_BOWCONT, _A_MARROW], 0] = (18.0, 80.0, 20.0, 40.0)
    tex_amp[[_A_FAT, _A_VISFAT, _A_BOWEL, _A_STFLUID], 1] = 10.0
    tex_amp[[_A_LIVER, _A_SPLEEN, _A_PANC, _A_LKC, _A_RKC, _A_STWALL], 2] = \
        (s(3, 10), s(3, 15), s(3, 10), s(5, 15), s(5, 15), 8.0)
    img = _render(tissue, means, tex_amp, tex, noise[5])

    # acquisition: partial volume, smooth gain drift on attenuation, quantum noise
    img = gaussian_filter(img, sigma=(0.35, s(0.5, 0.85), s(0.5, 0.85)))
    gain = F(1.0) + F(s(0.005, 0.02)) * noise[0][::-1]
    img = (img + F(1000)) * gain - F(1000)
    img += gaussian_filter(rng.standard_normal(shape, dtype=F), sigma=(0, 0.5, 0.5)) * F(s(8, 22) * 1.8)

    label = _A_LABEL[tissue]
    return Case(case_id, normalize_ct(img), label, spacing, _affine(spacing))


# ----------------------------------------------------------------------------- public API

_BUILDERS: dict[str, Callable[[np.random.Generator, str], Case]] = {
    "phantom-cardiac": _cardiac, "phantom-abdomen": _abdomen,
}


def generate_case(name: str, index: int, seed: int = 0) -> Case:
    """Case number `index` of phantom `name` ("phantom-cardiac" | "phantom-abdomen"), a pure function
    of (name, index, seed); case ids are "pc0007" / "pa0007"."""
    if name not in _KINDS:
        raise CctrError(f"unknown phantom '{name}'; known: {', '.join(_KINDS)}")
    if int(index) < 0 or int(seed) < 0:
        raise CctrError(f"phantom index and seed must be >= 0, got index={index} seed={seed}")
    kind, prefix = _KINDS[name]
    rng = np.random.default_rng([int(seed), int(index), kind])
    return _BUILDERS[name](rng, f"{prefix}{int(index):04d}")


def generate_cases(name: str, n: int, seed: int = 0) -> Iterator[Case]:
    """The first `n` cases of phantom `name`, generated lazily (the cache writer streams them)."""
    if name not in _KINDS:
        raise CctrError(f"unknown phantom '{name}'; known: {', '.join(_KINDS)}")
    if int(n) < 1:
        raise CctrError(f"number of phantom cases must be >= 1, got {n}")
    for i in range(int(n)):
        yield generate_case(name, i, seed)
