"""A procedural axial lumbar MRI phantom: virtual patients with exact label maps.

Each slice is built in three steps.

1. A *plan*: every random choice for the slice, in millimetres (patient, level and slice parameters:
   shapes, sizes, where the slice cuts the vertebra, bowel loops, nerve roots, marrow foci, ...).
2. The anatomy: a *tissue map* (fat, muscle, marrow, cortex, CSF, nerve roots, ligaments, disc, vessels,
   bowel, ...) and the label map (0 background, 1 vertebral body, 2 vertebral foramen, 3 lamina) painted
   from the plan by a list of small painters, soft tissue first, then bone, then the canal contents.
   A painter that comes after a labelled structure paints only outside it, so every label covers only
   its own tissues (:data:`STRUCTURE_TISSUES`).
3. The appearance: every tissue gets an intensity from a contrast table (T2 FSE by default; other
   sequences or fully random intensities for domain randomisation), smooth texture, a thick-slice blend
   with the anatomy a few millimetres above and below (partial volume through the slice), in-plane
   blur, a posterior surface-coil profile, a multiplicative bias field, optional Gibbs ringing and
   motion ghosts, and Rician noise.

The through-plane position is continuous: ``height`` (mm above the midplane of the disc below the
vertebra) runs from the disc itself (no vertebral body at all) through the concave endplate (the disc
shows in the middle of the body) and the lower body (the canal opens into the intervertebral foramina)
up to the pedicles.

Image convention: rows run anterior -> posterior, columns run patient right -> patient left.
All randomness comes from ``numpy.random.default_rng`` seeded with ``(seed, patient, ...)``, so the
same (seed, patient, slice) always gives the same slice, byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from ..anatomy import AREA_RANGES_MM2, area_range  # noqa: F401  (re-exported for callers of the phantom)
from ..preprocess.morphology import largest_component

LEVELS = ("L1", "L2", "L3", "L4", "L5")
# slice positions from the disc midplane upwards, and how often a slice falls in each. A disc (8-12 mm) is about
# a quarter of a motion segment's height, and clinical axial blocks are angled through the discs, so a quarter
# of the slices cut the disc (at 14 % the models learnt to label the disc as body: README, "Disc level")
POSITIONS = ("disc", "endplate", "infrapedicular", "pedicle")
POSITION_P = (0.25, 0.20, 0.20, 0.35)
POSITION_P_BEFORE_2026_11 = (0.14, 0.22, 0.24, 0.40)  # the mix before: `--positions` with it remakes older phantoms
CONTRASTS = ("t2", "t2fs", "water", "fat", "t1")

# tissue codes of the tissue map
AIR, FAT, MUSCLE, SKIN, MARROW, CORTEX, CSF, NERVE, EPIFAT, LIGAMENT, NUCLEUS, ANNULUS, AORTA, IVC, \
    BOWEL_FLUID, BOWEL_WALL, GAS, KIDNEY, JOINT_FLUID, MODIC, FASCIA, YELLOW_MARROW, BASIVERTEBRAL_VEIN = range(23)
N_TISSUES = 23
TISSUE_NAMES = ("air", "fat", "muscle", "skin", "marrow", "cortex", "csf", "nerve", "epidural_fat", "ligament",
                "nucleus", "annulus", "aorta", "ivc", "bowel_fluid", "bowel_wall", "gas", "kidney", "joint_fluid",
                "modic", "fascia", "yellow_marrow", "basivertebral_vein")

# the tissues each labelled structure is made of: a label never covers anything else (PHANTOM.md acceptance)
STRUCTURE_TISSUES = {
    1: (CORTEX, MARROW, MODIC, YELLOW_MARROW, BASIVERTEBRAL_VEIN),  # vertebral body
    2: (CSF, NERVE, EPIFAT),  # the canal space: dural sac (CSF, cauda equina) and epidural fat
    3: (CORTEX, MARROW),  # laminae
}

# relative intensities per sequence (fat = ~1 on T2 FSE). Marrow deliberately overlaps muscle on T2 texture.
_CONTRAST_TABLES = {
    #        air   fat   musc  skin  marr  cort  csf   nerve epif  lig   nucl  annu  aorta ivc   bflu  bwal  gas   kidn  jflu  modic fasc  ymarr bvein
    "t2":   (0.00, 0.95, 0.20, 0.55, 0.42, 0.05, 1.00, 0.30, 0.88, 0.08, 0.85, 0.16, 0.04, 0.22, 0.90, 0.35, 0.01, 0.62, 0.85, 0.70, 0.10, 0.82, 0.75),
    "t2fs": (0.00, 0.12, 0.28, 0.35, 0.18, 0.04, 1.00, 0.35, 0.14, 0.07, 0.80, 0.15, 0.04, 0.30, 0.95, 0.40, 0.01, 0.70, 0.90, 0.75, 0.10, 0.12, 0.80),
    "water": (0.00, 0.08, 0.55, 0.40, 0.30, 0.05, 0.95, 0.50, 0.12, 0.10, 0.85, 0.30, 0.10, 0.60, 0.95, 0.50, 0.01, 0.80, 0.90, 0.70, 0.15, 0.10, 0.70),
    "fat":  (0.00, 1.00, 0.10, 0.40, 0.70, 0.04, 0.05, 0.05, 0.95, 0.05, 0.04, 0.05, 0.03, 0.05, 0.05, 0.20, 0.01, 0.10, 0.05, 0.85, 0.30, 0.95, 0.05),
    "t1":   (0.00, 1.00, 0.35, 0.60, 0.75, 0.05, 0.12, 0.40, 0.95, 0.10, 0.30, 0.20, 0.05, 0.30, 0.15, 0.40, 0.01, 0.45, 0.15, 0.90, 0.15, 0.95, 0.30),
}
# texture amplitude per tissue (relative modulation by smooth noise); marrow is mottled
_TEXTURE = np.array([0.0, 0.03, 0.10, 0.08, 0.16, 0.05, 0.03, 0.05, 0.06, 0.05, 0.10, 0.08, 0.05, 0.06,
                     0.10, 0.15, 0.0, 0.08, 0.04, 0.10, 0.05, 0.08, 0.08])


@dataclass
class PhantomSlice:
    image: np.ndarray  # (H, W) int16, MR-like arbitrary units
    label: np.ndarray  # (H, W) uint8 in {0,1,2,3}
    tissue: np.ndarray  # (H, W) uint8 tissue codes
    spacing: tuple[float, float]
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- shapes

def _in_ellipse(x, y, a, b, ang=0.0):
    if ang:
        c, s = np.cos(ang), np.sin(ang)
        x, y = c * x + s * y, -s * x + c * y
    return (x / a) ** 2 + (y / b) ** 2 <= 1.0


def _seg_dist(u, v, p1, p2):
    """Distance from every grid point to the segment p1-p2."""
    d = np.subtract(p2, p1)
    L2 = float(d @ d) or 1e-9
    t = np.clip(((u - p1[0]) * d[0] + (v - p1[1]) * d[1]) / L2, 0.0, 1.0)
    return np.hypot(u - (p1[0] + t * d[0]), v - (p1[1] + t * d[1]))


def _body_shape(u, v, a, b, p, concav, grow=0.0):
    """Kidney-bean vertebral body centred at (0, 0): a superellipse whose posterior border is pushed in."""
    U = u / (a + grow)
    V = v / (b + grow)
    V = V + concav * np.clip(1.0 - U ** 2, 0, None) * (V > 0)
    return np.abs(U) ** p + np.abs(V) ** p <= 1.0


def _canal_profile(t, s):
    """Half-width profile of the canal along AP (t: 0 anterior .. 1 posterior).

    s = 0: oval; s = 1: triangular / trefoil (wide anteriorly with lateral recesses, narrow apex behind).
    """
    oval = np.sqrt(np.clip(1.0 - (2 * t - 1) ** 2, 0, None))
    tri = np.clip(1.0 - t, 0, None) ** 0.9 * np.clip(t * 7.0, 0, 1) ** 0.5
    trefoil = tri * (1.0 + 0.18 * np.exp(-((t - 0.18) / 0.1) ** 2))
    return (1 - s) * oval + s * trefoil


def _canal_shape(u, v, a, b, s):
    t = (v + b) / (2 * b)
    inside_t = (t >= 0) & (t <= 1)
    return inside_t & (np.abs(u) <= a * _canal_profile(np.clip(t, 0, 1), s))


def _canal_masks(u, v, a, b, s, cp):
    """Canal sub-structures in the spine frame (canal centre at the origin): a dict of boolean masks."""
    canal = _canal_shape(u, v, a, b, s)
    t_lf = cp["lf_t"]
    inner = _canal_shape(u, v + t_lf * 0.5, max(a - t_lf, 1.0), max(b - t_lf * 0.5, 1.0), s)
    lf = canal & ~inner & (v > -0.1 * b)
    pll = canal & (v < -b + 0.8)
    prot = np.zeros_like(canal)
    if cp["protrusion"]:
        pu, pr = cp["prot_u"], cp["prot_r"]
        prot = canal & _in_ellipse(u - pu, v + b + pr * 0.25, pr * 1.3, pr)
    label = canal & ~lf & ~pll & ~prot
    # dural sac: an oval of variable fill touching the anterior wall; epidural fat around it
    sf = cp["sac_fill"]
    sac = _in_ellipse(u, v + (0.18 + 0.2 * (1 - sf)) * b, 0.8 * a * (1 - 0.3 * s) * sf, 0.74 * b * sf) & label
    return {"canal": canal, "lf": lf, "pll": pll, "prot": prot, "label": label, "sac": sac}


def _fit_canal(cp):
    """Choose canal semi-axes so that the labelled canal area hits its sampled target (Newton steps)."""
    g = np.arange(-25, 25, 0.2)
    U, V = np.meshgrid(g, g)
    target = cp["canal_area"]
    a = np.sqrt(target / (np.pi * cp["canal_aspect"]))
    for _ in range(3):
        b = a * cp["canal_aspect"]
        area = _canal_masks(U, V, a, b, cp["canal_s"], cp)["label"].sum() * 0.04
        a *= np.sqrt(target / max(area, 1.0)) ** 0.9
    return float(a), float(a * cp["canal_aspect"])


class _Grid:
    """The pixel grid and the two frames shapes are drawn in, in millimetres.

    ``patient``: x to the patient's left, y posterior, with a smooth soft-tissue warp; ``spine``: u, v
    about the canal centre, rotated (scoliosis), stretched along AP (tilt) and mildly warped. Shapes
    are evaluated only inside their bounding box (with the warp's exact reach as margin), which keeps
    a 512 x 512 slice fast.
    """

    def __init__(self, size, spacing, x0, y0, theta, tilt, rng):
        self.shape = (size, size)
        self.spacing = spacing
        self.x0, self.y0, self.theta, self.tilt = x0, y0, theta, tilt
        coords = (np.arange(size) - (size - 1) / 2) * spacing
        X, Y = np.meshgrid(coords, coords)
        self.Y = Y
        soft = 2.5 * np.stack([_smooth_noise(rng, self.shape, 5, sigma=0.0) for _ in range(2)])
        bone_cells = 14 * size * spacing / 200  # the same bone warp in mm whatever the pixel size
        bone = 0.5 * np.stack([_smooth_noise(rng, self.shape, bone_cells, sigma=0.0) for _ in range(2)])
        c, s = np.cos(theta), np.sin(theta)
        self.frames = {"patient": (X + soft[0], Y + soft[1]),
                       "spine": (c * (X - x0) + s * (Y - y0) + bone[0],
                                 (-s * (X - x0) + c * (Y - y0)) / tilt + bone[1])}
        self.margin = {"patient": float(np.abs(soft).max()), "spine": float(np.abs(bone).max())}

    def box(self, frame, centre, reach):
        """Pixel bounding box of every point whose ``frame`` coordinates lie within ``reach`` of ``centre``."""
        cu, cv = centre
        if frame == "spine":
            c, s = np.cos(self.theta), np.sin(self.theta)
            cx, cy = self.x0 + c * cu - s * cv * self.tilt, self.y0 + s * cu + c * cv * self.tilt
            r = (reach + self.margin["spine"]) * self.tilt * (abs(c) + abs(s))
        else:
            cx, cy, r = cu, cv, reach + self.margin["patient"]
        rows, cols = (self._pixels(centre_mm, r, n) for centre_mm, n in ((cy, self.shape[0]), (cx, self.shape[1])))
        if rows.start >= rows.stop or cols.start >= cols.stop:
            return None
        return rows, cols

    def _pixels(self, centre_mm, reach, n):
        """Pixel index range along one axis covering ``centre_mm`` +- ``reach``."""
        lo = int(np.floor((centre_mm - reach) / self.spacing + (n - 1) / 2))
        hi = int(np.ceil((centre_mm + reach) / self.spacing + (n - 1) / 2)) + 1
        return slice(max(0, lo), min(n, hi))

    def mask(self, frame, centre, reach, inside):
        """Full-size mask of ``inside(du, dv)``, evaluated on coordinates relative to ``centre``."""
        m = np.zeros(self.shape, bool)
        b = self.box(frame, centre, reach)
        if b is not None:
            u, v = self.frames[frame]
            m[b] = inside(u[b] - centre[0], v[b] - centre[1])
        return m

    def ellipse(self, frame, centre, a, b, ang=0.0):
        return self.mask(frame, centre, max(a, b), lambda du, dv: _in_ellipse(du, dv, a, b, ang))

    def capsule(self, frame, p1, p2, radius):
        """Points within ``radius`` of the segment p1-p2."""
        mid = ((p1[0] + p2[0]) / 2, (p1[1] + p2[1]) / 2)
        half = np.hypot(p2[0] - p1[0], p2[1] - p1[1]) / 2
        q1, q2 = (p1[0] - mid[0], p1[1] - mid[1]), (p2[0] - mid[0], p2[1] - mid[1])
        return self.mask(frame, mid, half + radius, lambda du, dv: _seg_dist(du, dv, q1, q2) <= radius)

    def curve(self, frame, p1, p2, bow, radius, pieces=4):
        """Points within ``radius`` of a quadratic curve from p1 to p2 whose middle is pushed sideways by ``bow``
        (along u)."""
        ctrl = ((p1[0] + p2[0]) / 2 + 2 * bow, (p1[1] + p2[1]) / 2)
        t = np.linspace(0, 1, pieces + 1)
        pts = [((1 - x) ** 2 * p1[0] + 2 * x * (1 - x) * ctrl[0] + x ** 2 * p2[0],
                (1 - x) ** 2 * p1[1] + 2 * x * (1 - x) * ctrl[1] + x ** 2 * p2[1]) for x in t]
        out = np.zeros(self.shape, bool)
        for q1, q2 in zip(pts[:-1], pts[1:]):
            out |= self.capsule(frame, q1, q2, radius)
        return out


# ----------------------------------------------------------------------------------------------- sampling

def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _coil_params(r: np.random.Generator, p_coil: float) -> dict | None:
    """Posterior surface-coil sensitivity: bright at the back, falling off towards the abdomen. ``reach``: where
    it has halved, relative to the depth of the front of the vertebral body (clinical scans keep the spine
    visible and lose the abdomen)."""
    coil = {"reach": float(r.uniform(0.85, 1.25)), "power": float(r.uniform(3.0, 6.0)),
            "floor": float(r.uniform(0.0, 0.05)), "band": float(r.uniform(0.3, 1.0)) if r.random() < 0.4 else 0.0,
            "band_mm": float(r.uniform(4, 12))}
    return coil if r.random() < p_coil else None


def _scanner_params(seed: int, scanner: int) -> dict:
    r = _rng(seed, 7_000_003, scanner)
    return {
        "snr": float(r.uniform(10, 40)),
        "bias": float(r.uniform(0.10, 0.30)),
        "gibbs": bool(r.random() < 0.35),
        "ghost": bool(r.random() < 0.25),
        "psf": float(r.uniform(0.45, 0.9)),  # Gaussian sigma in pixels
        "gain": float(r.uniform(800, 2400)),
        "jitter": r.normal(0.0, 0.06, N_TISSUES),
        "coil": _coil_params(r, 0.85),
        "thickness_mm": float(r.uniform(3.0, 6.0)),
        "slab_weight": float(r.uniform(0.12, 0.3)),  # weight of each neighbouring position in the slice profile
    }


def _patient_params(seed: int, patient: int) -> dict:
    r = _rng(seed, patient)
    size = r.uniform(0, 1)
    return {
        "scanner": int(r.integers(0, 6)),
        "outline_w": float(250 + 130 * size + r.normal(0, 8)),
        "outline_d": float(180 + 80 * size + r.normal(0, 8)),
        "subcut": float(10 + 30 * size * r.uniform(0.5, 1.2)),
        "muscle": float(r.uniform(0.85, 1.15)),
        "psoas": float(r.uniform(0.8, 1.2)),
        "muscle_fat": float(r.beta(1.5, 2.5)),  # fatty infiltration of the back muscles (age)
        "marrow_fat": float(r.beta(1.5, 3.0)),  # yellow-marrow foci in the vertebrae
        "sac_fill": float(r.uniform(0.6, 1.12)),  # dural sac relative to the bony canal
        "vert_scale": float(r.uniform(0, 1)),
        "canal_s": float(r.uniform(0, 0.3)),
        "lamina_t": float(r.uniform(5.2, 7.6)),
        "jitter": r.normal(0.0, 0.05, N_TISSUES),
        "stenosis_level": int(r.integers(2, 5)) if r.random() < 0.25 else -1,
        "modic_level": int(r.integers(1, 5)) if r.random() < 0.25 else -1,
        "osteophytes": bool(r.random() < 0.3),
        "levels": r.permutation(5),
        "rot_bias": float(r.normal(0, 5)),
    }


def _level_params(seed: int, patient: int, level: int, pp: dict) -> dict:
    r = _rng(seed, patient, 100 + level)
    f = level / 4.0  # 0 at L1 .. 1 at L5
    w = 40 + 6 * f + 9 * pp["vert_scale"] * 0.6 + r.uniform(-1.5, 1.5)
    d = 30 + 3 * pp["vert_scale"] + 2 * f + r.uniform(-1.0, 2.0)
    shape_s = float(np.clip(f * 1.1 + pp["canal_s"] - 0.15 + r.normal(0, 0.08), 0, 1))
    disc_top = float(r.uniform(4.0, 6.0))  # half the disc height
    endplate_top = disc_top + float(r.uniform(2.5, 3.5))
    pedicle_bottom = endplate_top + float(r.uniform(5.0, 7.0))
    return {
        "level": level,
        "body_w": float(np.clip(w, 40, 55)),
        "body_d": float(np.clip(d, 30, 38)),
        "body_p": float(r.uniform(2.1, 2.7)),
        "concav": float(r.uniform(0.08, 0.22)),
        "canal_s": shape_s,
        "canal_aspect": float(r.uniform(0.5, 0.75)),  # AP / transverse
        "canal_area": float(r.uniform(170, 265)),
        "lamina_t": float(np.clip(pp["lamina_t"] + r.normal(0, 0.3), 5.0, 8.0)),
        "lamina_l": float(r.uniform(21, 29)),
        "lamina_phi": float(np.deg2rad(r.uniform(24, 38))),
        # psoas: small at L1, large and round at L4-L5, hugging the body
        "psoas": float((7.5 + 15 * f + r.uniform(-1.5, 1.5)) * pp["psoas"]),
        "psoas_aspect": float(r.uniform(0.8, 1.0)),
        "pedicle_w": float(r.uniform(7, 11)),
        "sp_len": float(r.uniform(25, 35)),
        "tp_len": float(r.uniform(22, 32) * (1.0 - 0.3 * (level == 4))),
        "facet": float((1.0 + 0.3 * f) * r.uniform(0.9, 1.15)),
        "stenosis": level == pp["stenosis_level"],
        "modic": level == pp["modic_level"],
        "modic_type": int(r.choice(3, p=[0.4, 0.45, 0.15])) + 1,
        # height (mm above the disc midplane) where the disc, the endplate's concavity and the body below
        # the pedicles end
        "zones": (disc_top, endplate_top, pedicle_bottom),
        # nucleus signal relative to a healthy disc: lower discs degenerate more often
        "nucleus_signal": float(np.clip(r.uniform(0.15, 1.0) - 0.2 * f * r.random(), 0.1, 1.0)),
    }


@dataclass(frozen=True)
class _Cut:
    """Where the slice plane cuts the vertebra."""

    position: str  # one of POSITIONS
    disc_frac: float  # fraction of the body's semi-axes replaced by disc at the concave endplate (0 elsewhere)


def _cut_at(lp: dict, height: float) -> _Cut:
    disc_top, endplate_top, pedicle_bottom = lp["zones"]
    if height < disc_top:
        return _Cut("disc", 1.0)
    if height < endplate_top:  # the concavity narrows towards the body
        return _Cut("endplate", round(0.75 - 0.35 * (height - disc_top) / (endplate_top - disc_top), 3))
    if height < pedicle_bottom:
        return _Cut("infrapedicular", 0.0)
    return _Cut("pedicle", 0.0)


def _height_range(lp: dict, position: str) -> tuple[float, float]:
    disc_top, endplate_top, pedicle_bottom = lp["zones"]
    return {"disc": (0.0, disc_top), "endplate": (disc_top, endplate_top),
            "infrapedicular": (endplate_top, pedicle_bottom),
            "pedicle": (pedicle_bottom, pedicle_bottom + 12.0)}[position]


def check_positions(positions) -> tuple[float, ...]:
    """Shares of slices at each of POSITIONS (disc, endplate, infrapedicular, pedicle): four non-negative
    numbers, normalised to sum to 1."""
    p = np.asarray(positions, float)
    if p.shape != (len(POSITIONS),) or not np.all(np.isfinite(p)) or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"positions must be {len(POSITIONS)} non-negative shares ({', '.join(POSITIONS)}), "
                         f"not all 0 (got {positions!r})")
    return tuple(float(x) for x in p / p.sum())


def _plan_slice(seed, patient, k, size, spacing, offset=(0.0, 0.0), positions=POSITION_P) -> tuple[dict, _Grid]:
    """Every random choice of slice ``k`` (mm, no pixels), and the grid with its frames."""
    pp = _patient_params(seed, patient)
    level = int(pp["levels"][k % 5])
    lp = _level_params(seed, patient, level, pp)
    r = _rng(seed, patient, 1000 + k)
    position = POSITIONS[int(r.choice(len(POSITIONS), p=positions))]
    lo, hi = _height_range(lp, position)
    a = {"pp": pp, "lp": lp, "level": level, "position": position, "height": float(r.uniform(lo, hi))}
    # canal: target area and shape; a disc protrusion indents it at disc-level slices
    cp = {"canal_area": lp["canal_area"], "canal_aspect": lp["canal_aspect"], "canal_s": lp["canal_s"],
          "protrusion": position == "disc" and r.random() < 0.5, "prot_u": float(r.uniform(-5, 5)),
          "prot_r": float(r.uniform(3.0, 5.0)), "lf_t": float(r.uniform(1.8, 3.0)),
          "sac_fill": float(np.clip(pp["sac_fill"] + r.normal(0, 0.05), 0.5, 1.15))}
    if lp["stenosis"]:
        cp.update(canal_area=float(r.uniform(50, 85)), canal_aspect=float(r.uniform(0.4, 0.55)),
                  canal_s=1.0, lf_t=float(r.uniform(3.5, 5.0)), protrusion=False)
    a["canal"] = cp
    a["a_c"], a["b_c"] = _fit_canal(cp)

    # spine frame: canal centre, axial rotation, obliquity (AP stretch)
    x0 = float(r.uniform(-10, 10)) + offset[0]
    y0 = float(r.uniform(8, 22)) + offset[1]
    theta = float(np.deg2rad(np.clip(pp["rot_bias"] + r.normal(0, 4), -15, 15)))
    tilt = float(1.0 / np.cos(np.deg2rad(r.uniform(0, 12))))
    a.update(x0=x0, y0=y0, theta=theta)
    g = _Grid(size, spacing, x0, y0, theta, tilt, _rng(seed, patient, 3000 + k))

    # derived geometry, spine frame unless named otherwise
    b_c, lam_t = a["b_c"], lp["lamina_t"]
    a["a_b"], a["b_bd"] = lp["body_w"] / 2, lp["body_d"] / 2
    a["body_cy"] = -b_c - a["b_bd"] + 1.0  # vertebral body centre (v)
    y_sp_end = y0 + b_c + lam_t + lp["sp_len"]
    a["y_skin"] = y_sp_end + pp["subcut"] + 8.0  # posterior skin (patient frame y)
    a["y_body_front"] = y0 + a["body_cy"] - a["b_bd"]
    a["ox"] = x0 * 0.3  # the body outline is centred less off-midline than the spine
    a["furrow"] = (float(r.uniform(6, 18)), float(r.uniform(1.5, 5)))  # posterior midline groove: width, depth
    a["back_flatness"] = float(r.uniform(2.5, 5.0))  # superellipse exponent of the back

    a["bowel"] = [(float(r.uniform(-1, 1)), float(r.uniform(-110, -12)), float(r.uniform(7, 17)),
                   float(r.uniform(0, np.pi)), float(r.uniform(0.55, 1.0)), int(r.integers(0, 4)))
                  for _ in range(int(r.integers(22, 34)))]
    a["kidneys"] = (level <= 1 or (level == 2 and r.random() < 0.5),
                    [float(r.uniform(58, 72)) for _ in range(2)])
    a["vessels"] = (float(r.uniform(-3, 3)), float(r.uniform(-3, 3)))
    a["psoas_cleft"] = [float(r.uniform(-0.6, 0.6)) if r.random() < 0.5 else None for _ in range(2)]
    a["osteophytes"] = [(float(r.uniform(0.1, 0.7)), float(r.uniform(2, 4)), float(r.uniform(1.5, 3)))
                        for _ in range(2)] if pp["osteophytes"] and level >= 2 else []
    a["marrow_shrink"] = float(r.uniform(1.0, 2.0))
    a["foci"] = [(float(r.uniform(-0.75, 0.75)), float(r.uniform(-0.7, 0.7)), float(r.uniform(1.0, 4.0)),
                  float(r.uniform(0.6, 1.0)), float(r.uniform(0, np.pi)))
                 for _ in range(int(r.poisson(6 * pp["marrow_fat"])))]
    a["modic"] = (float(r.uniform(-0.3, 0.3)), float(r.uniform(-0.3, 0.3)), float(r.uniform(0.3, 0.6)),
                  float(r.uniform(0.25, 0.45)), float(r.uniform(0, np.pi)))
    # basivertebral vein: visible or not, radius, length, Y-branches
    a["vein"] = (r.random() < 0.65, float(r.uniform(0.7, 1.2)), float(r.uniform(0.25, 0.45)), r.random() < 0.7)
    # disc: bulge beyond the body outline (mm), nucleus size, nucleus AP offset (both relative to the body)
    a["disc"] = (float(r.uniform(0.0, 2.5)), float(r.uniform(0.55, 0.8)), float(r.uniform(-0.15, 0.1)))
    a["facet_angle"] = [float(r.uniform(0.6, 1.1)) for _ in range(2)]
    a["sp_tip"] = float(r.normal(0, 1.0))
    a["roots"] = [(float(r.normal(0, 0.25)), float(r.uniform(-0.1, 0.55)), float(r.uniform(0.5, 0.9)),
                   float(r.uniform(0.5, 0.9))) for _ in range(int(r.integers(8, 20)))]
    a["septa"] = _septa_field(r)
    a["septa_levels"] = r.uniform(-1.0, 1.0, 1 + int(round(3 * pp["muscle_fat"]))).tolist()
    a["septa_bend"] = float(r.uniform(-0.12, 0.12))  # how far the septa curve away from the radial direction
    return a, g


def _septa_field(r: np.random.Generator) -> np.ndarray:
    """Two smooth noise fields over (angle about the canal, distance from it). The level lines of the first
    run radially (it hardly changes with distance), like the fat septa between the fascicles of the back
    muscles; the second, changing faster with distance, breaks them into pieces."""
    line = ndi.gaussian_filter(r.standard_normal((90, 8)), (1.0, 3.0), mode=("wrap", "nearest"))
    gate = ndi.gaussian_filter(r.standard_normal((90, 8)), (1.0, 0.7), mode=("wrap", "nearest"))
    return np.stack([(f - f.mean()) / (f.std() + 1e-8) for f in (line, gate)])


# ----------------------------------------------------------------------------------------------- painters
# Each painter draws one tissue group from the plan ``a`` on the tissue map T and label map L, where the slice
# plane makes ``cut``. Painters run in order; ``drawn`` passes masks on to later painters (which paint outside
# labelled structures).

def _paint_outline(g, a, cut, T, L, drawn):
    """Skin and subcutaneous fat of the trunk (round in front, flattened behind by the table), with the
    midline furrow of the back; ``drawn["depth"]``: mm from the skin inwards, for the layers below it."""
    pp = a["pp"]
    ow, od, p_back = pp["outline_w"] / 2, pp["outline_d"] / 2, a["back_flatness"]

    def trunk(dx, dy):
        p = np.where(dy > 0, p_back, 2.0)
        return np.abs(dx / ow) ** p + np.abs(dy / od) ** p <= 1.0

    width, height = a["furrow"]
    outline = g.mask("patient", (a["ox"], a["y_skin"] - od), max(ow, od), trunk) & ~g.ellipse(
        "patient", (a["x0"], a["y_skin"]), width / 2, height)
    depth = ndi.distance_transform_edt(outline, sampling=g.spacing)
    T[outline] = SKIN
    T[depth > 2.0] = FAT
    drawn["depth"] = depth
    drawn["inner_skin"] = depth > 2.0


def _paint_abdomen(g, a, cut, T, L, drawn):
    """Abdominal wall muscles round to the flanks, retroperitoneal / mesenteric fat, the peritoneal cavity."""
    pp = a["pp"]
    ow, sub, depth = pp["outline_w"] / 2, pp["subcut"], drawn["depth"]
    y = g.frames["patient"][1]
    T[(depth > sub * 0.7) & (y < a["y0"] + a["b_c"] + 5)] = MUSCLE
    T[(depth > sub * 0.7 + 9) & (y < a["y0"] + a["b_c"] + 5)] = FAT
    cav_out = (depth > sub * 0.7 + 9) & (y < a["y0"] + a["body_cy"] + 10)
    drawn["cavity"] = cav_out & g.ellipse("patient", (a["ox"], a["y_body_front"] - 35), ow - sub - 10, 70)


def _paint_bowel(g, a, cut, T, L, drawn):
    ow = a["pp"]["outline_w"] / 2
    lumens = (BOWEL_FLUID, BOWEL_FLUID, BOWEL_WALL, GAS)
    for bx, by, br, ang, aspect, lumen in a["bowel"]:
        centre = (bx * ow, a["y_body_front"] + by)
        loop = g.ellipse("patient", centre, br, br * aspect, ang) & drawn["cavity"]
        T[loop] = BOWEL_WALL
        T[g.ellipse("patient", centre, br * 0.72, br * 0.4, ang) & loop] = lumens[lumen]


def _paint_kidneys(g, a, cut, T, L, drawn):
    present, lateral = a["kidneys"]
    if not present:
        return
    for side, dx in zip((-1, 1), lateral):
        kid = g.ellipse("patient", (a["x0"] + side * dx, a["y0"] + a["body_cy"] + 5), 16, 28, side * 0.5)
        T[kid & drawn["inner_skin"]] = KIDNEY


def _paint_psoas(g, a, cut, T, L, drawn):
    """Psoas beside the body, in contact with it (the body, painted later, cuts the overlap)."""
    lp = a["lp"]
    pr, asp = lp["psoas"], lp["psoas_aspect"]
    for side, cleft in zip((-1, 1), a["psoas_cleft"]):
        centre = (side * (a["a_b"] + pr * 0.8), a["body_cy"] + a["b_bd"] * 0.2)
        psoas = g.ellipse("spine", centre, pr, pr * asp, side * 0.35)
        T[psoas] = MUSCLE
        if cleft is not None:  # an intramuscular fat cleft
            d = (pr * 0.7 * np.cos(cleft), pr * 0.7 * np.sin(cleft))
            T[g.capsule("spine", (centre[0] - d[0], centre[1] - d[1]), (centre[0] + d[0], centre[1] + d[1]), 0.5)
              & psoas] = FAT
        ql = g.ellipse("spine", (side * (a["a_b"] + 2 * pr + 6), a["body_cy"] + a["b_bd"] + 4),
                       11 * a["pp"]["muscle"] * (1 - 0.4 * (a["level"] == 4)), 8 * a["pp"]["muscle"], side * 0.6)
        T[ql & drawn["inner_skin"] & ~psoas] = MUSCLE  # quadratus lumborum


def _paint_back_muscles(g, a, cut, T, L, drawn):
    """Erector spinae and multifidus: one mass per side from the spinous process to the flank, wrapped in
    fascia, with fat planes between the muscles and fat septa between their fascicles."""
    pp, lp, b_c = a["pp"], a["lp"], a["b_c"]
    m = pp["muscle"]
    v_front, v_back = 0.25 * b_c - 4, b_c + lp["lamina_t"] + lp["sp_len"] + 3
    half_d = (v_back - v_front) / 2
    half_w = 34 * m + 8 * a["level"] / 4
    u_all, v_all = g.frames["spine"]
    for side in (-1, 1):
        centre = (side * (1.5 + half_w), v_front + half_d)

        def mass(du, dv, grow=0.0, side=side):  # flat against the midline, rounded at the flank
            x, y = side * du / (half_w + grow), dv / (half_d + grow)
            p = np.where(x < 0, 5.0, 2.2)
            return np.abs(x) ** p + np.abs(y) ** p <= 1.0

        reach = np.hypot(half_w, half_d) + 1.0
        muscle = g.mask("spine", centre, reach, mass) & drawn["inner_skin"]
        sheath = g.mask("spine", centre, reach, lambda du, dv: mass(du, dv, 0.7) & (dv > 0)) & ~muscle
        T[sheath & drawn["inner_skin"]] = FASCIA  # thoracolumbar fascia behind the muscles
        T[muscle] = MUSCLE
        # fat planes between multifidus and longissimus, and between longissimus and iliocostalis
        for u0, u1, bow in ((0.45, 0.6, 0.15), (1.2, 1.05, -0.1)):
            plane = g.curve("spine", (side * half_w * u0, v_front + 6), (side * half_w * u1, v_back),
                            side * bow * half_w, 0.6)
            T[plane & muscle] = FAT
        # septa: broken level lines of a noise field in (angle about the canal, distance from it)
        b = g.box("spine", centre, reach)
        if b is None:
            continue
        u, v = u_all[b], v_all[b]
        field_ = a["septa"]
        rad = np.clip(np.hypot(u, v) / 120.0, 0, 1)
        ang = (np.arctan2(u, v) + np.pi + side * a["septa_bend"] * 9 * rad ** 2) / (2 * np.pi) * field_.shape[1]
        rad = rad * (field_.shape[2] - 1)
        line, gate = (ndi.map_coordinates(f, [ang, rad], order=1, mode="grid-wrap") for f in field_)
        septa = np.zeros(g.shape, bool)
        septa[b] = np.any([np.abs(line - c) < 0.025 for c in a["septa_levels"]], axis=0) & (gate > -0.3)
        T[septa & muscle] = FAT


def _paint_vessels(g, a, cut, T, L, drawn):
    """Aorta and IVC in front of the body; below the bifurcation (L5) the common iliac vessels."""
    ay = a["body_cy"] - a["b_bd"] - 11
    da, dv = a["vessels"]
    if a["level"] < 4:
        T[g.ellipse("spine", (12 + da, ay), 9.5, 9.5)] = AORTA
        T[g.ellipse("spine", (-18 + dv, ay + 1), 11, 7)] = IVC
    else:
        for side in (-1, 1):
            T[g.ellipse("spine", (side * (14 + da), ay - 2), 5.5, 5.5)] = AORTA
            T[g.ellipse("spine", (side * (20 + dv), ay + 4), 7, 5)] = IVC


def _paint_body(g, a, cut, T, L, drawn):
    """Vertebral body (label 1): cortex, heterogeneous marrow; or the disc that replaces it."""
    lp, bc = a["lp"], (0.0, a["body_cy"])
    a_b, b_bd, p, concav = a["a_b"], a["b_bd"], lp["body_p"], lp["concav"]
    reach = np.hypot(a_b, b_bd) + 4.0
    bulge, nucleus, nucleus_v = a["disc"]
    if cut.position == "disc":
        disc = g.mask("spine", bc, reach, lambda du, dv: _body_shape(du, dv, a_b, b_bd, p, concav, grow=bulge))
        T[disc] = ANNULUS
        T[g.ellipse("spine", (0.0, a["body_cy"] + nucleus_v * b_bd), a_b * nucleus, b_bd * nucleus * 0.85)] = NUCLEUS
        drawn["body"] = disc
        return
    body = g.mask("spine", bc, reach, lambda du, dv: _body_shape(du, dv, a_b, b_bd, p, concav))
    for side, (frac, ra, rb) in zip((-1, 1), a["osteophytes"]):  # spurs centred on the anterolateral rim
        rim = a_b * (1 - frac ** p) ** (1 / p)
        body |= g.ellipse("spine", (side * rim, a["body_cy"] - b_bd * frac), ra, rb, side * 0.6)
    shrink = a["marrow_shrink"]
    marrow = body & g.mask("spine", bc, reach, lambda du, dv: _body_shape(du, dv, a_b, b_bd, p, concav, -shrink))
    T[body] = CORTEX
    T[marrow] = MARROW
    for fu, fv, radius, aspect, ang in a["foci"]:  # yellow-marrow foci (and haemangioma-like spots)
        focus = g.ellipse("spine", (fu * a_b, a["body_cy"] + fv * b_bd), radius, radius * aspect, ang)
        T[focus & marrow] = YELLOW_MARROW
    if lp["modic"] and cut.position != "pedicle":  # endplate-adjacent marrow change
        mu, mv, ma, mb, ang = a["modic"]
        modic = g.ellipse("spine", (mu * a_b, a["body_cy"] + mv * b_bd), a_b * ma, b_bd * mb, ang) & marrow
        T[modic] = {1: MODIC, 2: YELLOW_MARROW, 3: CORTEX}[lp["modic_type"]]
    visible, radius, length, branches = a["vein"]
    if visible and cut.position == "pedicle":  # basivertebral vein entering at the posterior midline
        v_post = a["body_cy"] + b_bd * (1 - concav)
        stem_end = (0.0, v_post - length * b_bd)
        vein = g.capsule("spine", (0.0, v_post + 0.5), stem_end, radius)
        if branches:
            for side in (-1, 1):
                vein |= g.capsule("spine", stem_end, (side * 0.3 * a_b, stem_end[1] - 0.25 * b_bd), radius * 0.7)
        T[vein & body] = BASIVERTEBRAL_VEIN
    L[body] = 1
    if cut.position == "endplate":  # the concave endplate: disc in the middle of the body
        dcy = a["body_cy"] - 0.1 * b_bd
        disc = g.ellipse("spine", (0.0, dcy), a_b * cut.disc_frac, b_bd * cut.disc_frac)
        T[disc] = ANNULUS
        T[g.ellipse("spine", (0.0, dcy), a_b * cut.disc_frac * 0.7, b_bd * cut.disc_frac * 0.6)] = NUCLEUS
        L[disc] = 0
        body |= disc
    drawn["body"] = body


def _arch_geometry(a) -> dict:
    """Pedicle and lamina landmarks of the posterior arch (spine frame)."""
    lp, a_c, b_c = a["lp"], a["a_c"], a["b_c"]
    w_mid = a_c * float(_canal_profile(np.array(0.55), lp["canal_s"]))
    pw = lp["pedicle_w"]
    lam_t = lp["lamina_t"]
    phi = lp["lamina_phi"] * (0.65 + 0.35 * lp["canal_s"])
    # the laminae's inner edge must clear the canal: v + |u| tan(phi) < p2_v - T / (2 cos phi) on the canal
    tt = np.linspace(0, 1, 101)
    clear = np.max(-b_c + 2 * b_c * tt + a_c * _canal_profile(tt, lp["canal_s"]) * np.tan(phi))
    apex = (0.0, float(max(b_c, clear + 0.3) + lam_t / (2 * np.cos(phi))))
    ends = [(side * lp["lamina_l"] * np.cos(phi), apex[1] - lp["lamina_l"] * np.sin(phi)) for side in (-1, 1)]
    return {"ped_u": w_mid + pw / 2 + 0.5, "ped_v0": a["body_cy"] + a["b_bd"] * 0.4, "ped_v1": 0.25 * b_c,
            "pw": pw, "apex": apex, "ends": ends}


def _paint_pedicles(g, a, cut, T, L, drawn):
    """Pedicles and transverse processes (background bone) at pedicle level."""
    if cut.position != "pedicle":
        return
    ag, body = _arch_geometry(a), drawn["body"]
    ped_u, pw = ag["ped_u"], ag["pw"]
    for side in (-1, 1):
        p0, p1 = (side * ped_u, ag["ped_v0"]), (side * ped_u, ag["ped_v1"])
        T[g.capsule("spine", p0, p1, pw / 2) & ~body] = CORTEX
        T[g.capsule("spine", p0, p1, pw / 2 - 1.2) & ~body] = MARROW
        tp0 = (side * (ped_u + 2), ag["ped_v1"] - 2)
        tp1 = (side * (ped_u + a["lp"]["tp_len"]), ag["ped_v1"] + 3)
        T[g.capsule("spine", tp0, tp1, 3.5) & ~body] = CORTEX
        T[g.capsule("spine", tp0, tp1, 2.3) & ~body] = MARROW


def _paint_foramina(g, a, cut, T, L, drawn):
    """Below the pedicles: intervertebral foramina, fat with the exiting nerve root, beside the body."""
    if cut.position == "pedicle":
        return
    ag, body = _arch_geometry(a), drawn["body"]
    ped_u, pw = ag["ped_u"], ag["pw"]
    for side in (-1, 1):
        fo = g.capsule("spine", (side * (ped_u + 1), ag["ped_v0"] + 3), (side * (ped_u + 3), ag["ped_v1"]), pw / 2 + 1)
        T[fo & ~body] = FAT
        root = g.ellipse("spine", (side * (ped_u + 2), (ag["ped_v0"] + ag["ped_v1"]) / 2), 2.6, 2.2)
        T[root & ~body] = NERVE


def _paint_laminae(g, a, cut, T, L, drawn):
    """Laminae (label 3), the spinous process continuing them backwards, and the interspinous ligament."""
    lp, ag = a["lp"], _arch_geometry(a)
    lam_t, sp_len, apex = lp["lamina_t"], lp["sp_len"], ag["apex"]
    lam = np.zeros(g.shape, bool)
    lam_in = np.zeros(g.shape, bool)
    for end in ag["ends"]:
        lam |= g.capsule("spine", end, apex, lam_t / 2)
        lam_in |= g.capsule("spine", end, apex, lam_t / 2 - 1.2)
    sp0, sp1 = (0.0, apex[1] + lam_t * 0.2), (a["sp_tip"], apex[1] + sp_len)
    mid = ((sp0[0] + sp1[0]) / 2, (sp0[1] + sp1[1]) / 2)
    q0, q1 = (sp0[0] - mid[0], sp0[1] - mid[1]), (sp1[0] - mid[0], sp1[1] - mid[1])

    def spinous(du, dv, shrink):  # tapering backwards
        radius = 2.5 + 0.6 * (1 - np.clip((dv - q0[1]) / sp_len, 0, 1)) - shrink
        return _seg_dist(du, dv, q0, q1) <= radius

    sp = g.mask("spine", mid, sp_len / 2 + 4, lambda du, dv: spinous(du, dv, 0.0)) & ~lam
    sp_marrow = g.mask("spine", mid, sp_len / 2 + 4, lambda du, dv: spinous(du, dv, 1.1))
    T[lam | sp] = CORTEX
    T[lam_in | sp_marrow] = MARROW
    L[lam] = 3
    T[g.capsule("spine", sp1, (sp1[0], sp1[1] + 8), 1.5)] = LIGAMENT


def _paint_facets(g, a, cut, T, L, drawn):
    """Facet joints hugging the lateral ends of the laminae: the inferior articular process (IAP) continues
    the lamina, the superior one (SAP) lies anterolateral to it, and the joint line between them runs from
    anteromedial to posterolateral."""
    lp, ag, body = a["lp"], _arch_geometry(a), drawn["body"]
    # hypertrophic in stenosis, larger towards the disc; capped so they hug the laminae rather than replace them
    fs = min(1.6, lp["facet"] * (1.35 if lp["stenosis"] else 1.0) * (1.0 if cut.position == "pedicle" else 1.12))
    for side, end, alpha in zip((-1, 1), ag["ends"], a["facet_angle"]):
        ang = -side * alpha  # joint line at alpha from the sagittal plane
        normal = (side * np.cos(alpha), -np.sin(alpha))  # across the joint, towards the SAP
        joint_c = (end[0] + normal[0] * 3.0 * fs, end[1] + normal[1] * 3.0 * fs)
        sap_c = (joint_c[0] + normal[0] * 3.6 * fs, joint_c[1] + normal[1] * 3.6 * fs)
        iap_c = (joint_c[0] - normal[0] * 3.0 * fs, joint_c[1] - normal[1] * 3.0 * fs)
        sap = g.ellipse("spine", sap_c, 4.0 * fs, 7.5 * fs, ang) & ~body
        iap = g.ellipse("spine", iap_c, 3.4 * fs, 6.0 * fs, ang) & ~body
        joint = g.ellipse("spine", joint_c, 0.7, 6.5 * fs, ang) & (sap | iap)
        facet = (sap | iap) & ~joint
        T[facet] = CORTEX
        T[(g.ellipse("spine", sap_c, 2.8 * fs, 6.1 * fs, ang) | g.ellipse("spine", iap_c, 2.2 * fs, 4.6 * fs, ang))
          & facet] = MARROW
        T[joint] = JOINT_FLUID
        L[facet | joint] = 0
        if cut.position == "pedicle":  # pedicle-to-facet continuity (pars): keep the ring closed
            p0 = (side * ag["ped_u"], ag["ped_v1"])
            T[g.capsule("spine", p0, sap_c, ag["pw"] / 2 - 0.5) & (L == 0) & ~body] = CORTEX
            T[g.capsule("spine", p0, sap_c, ag["pw"] / 2 - 1.7) & (L == 0) & ~body] = MARROW


def _paint_canal(g, a, cut, T, L, drawn):
    """Canal contents last, winning over bone at shared borders: epidural fat, dural sac, roots, ligaments."""
    cp, a_c, b_c = a["canal"], a["a_c"], a["b_c"]
    b = g.box("spine", (0.0, 0.0), 1.25 * max(a_c, b_c) + 1.0)
    if b is None:
        return
    u, v = g.frames["spine"]
    cm = {}
    for name, sub in _canal_masks(u[b], v[b], a_c, b_c, cp["canal_s"], cp).items():
        cm[name] = np.zeros(g.shape, bool)
        cm[name][b] = sub
    T[cm["canal"]] = EPIFAT
    T[cm["sac"]] = CSF
    T[cm["lf"] | cm["pll"]] = LIGAMENT
    T[cm["prot"]] = ANNULUS
    for ru, rv, ra, rb in a["roots"]:  # cauda equina: dark dots lying dependent (posterior) in the sac
        T[g.ellipse("spine", (ru * a_c, rv * b_c), ra, rb) & cm["sac"]] = NERVE
    L[cm["canal"]] = 0
    L[cm["label"]] = 2


def _paint_ring_fragments(g, a, cut, T, L, drawn):
    """The bony ring of an endplate slice must stay one piece: detached fragments become annulus."""
    if cut.position == "endplate":
        frag = (L == 1) & ~largest_component(L == 1)
        T[frag] = ANNULUS
        L[frag] = 0


# soft tissue first (the same at every through-plane position of the slice), then bone and the canal contents
_SOFT_TISSUE_PAINTERS = (_paint_outline, _paint_abdomen, _paint_bowel, _paint_kidneys, _paint_psoas,
                         _paint_back_muscles, _paint_vessels)
_SPINE_PAINTERS = (_paint_body, _paint_pedicles, _paint_foramina, _paint_laminae, _paint_facets, _paint_canal,
                   _paint_ring_fragments)


def _paint_soft_tissue(g: _Grid, a: dict) -> tuple[np.ndarray, dict]:
    T = np.full(g.shape, AIR, np.uint8)
    drawn: dict = {}
    for painter in _SOFT_TISSUE_PAINTERS:
        painter(g, a, None, T, None, drawn)
    return T, drawn


def _paint(g: _Grid, a: dict, cut: _Cut, soft: tuple[np.ndarray, dict]) -> tuple[np.ndarray, np.ndarray]:
    """Tissue and label maps where the slice plane makes ``cut``, over the slice's soft tissue."""
    T, drawn = soft[0].copy(), dict(soft[1])
    L = np.zeros(g.shape, np.uint8)
    for painter in _SPINE_PAINTERS:
        painter(g, a, cut, T, L, drawn)
    return T, L


def _slice_meta(a: dict) -> dict:
    lp = a["lp"]
    return {
        "level": LEVELS[a["level"]], "position": a["position"], "stenosis": bool(lp["stenosis"]),
        "protrusion": bool(a["canal"]["protrusion"]),
        "modic": bool(lp["modic"]) and a["position"] in ("infrapedicular", "endplate"),
        "osteophytes": bool(a["osteophytes"]) and a["position"] != "disc", "scanner": a["pp"]["scanner"],
        "rotation_deg": round(float(np.rad2deg(a["theta"])), 2), "height_mm": round(a["height"], 2),
    }


def _slice_anatomy(seed, patient, k, size, spacing, offset=(0.0, 0.0)):
    """Tissue map, label map and meta of slice ``k`` (the central position of the slice)."""
    a, g = _plan_slice(seed, patient, k, size, spacing, offset)
    T, L = _paint(g, a, _cut_at(a["lp"], a["height"]), _paint_soft_tissue(g, a))
    return T, L, _slice_meta(a), a["pp"]


# ----------------------------------------------------------------------------------------------- appearance

def _smooth_noise(rng, shape, cells, sigma=1.0, aniso=(1.0, 1.0)):
    h = max(2, int(cells * aniso[0]))
    w = max(2, int(cells * aniso[1]))
    small = rng.standard_normal((h, w))
    if sigma:
        small = ndi.gaussian_filter(small, sigma, mode="wrap")
    big = ndi.zoom(small, (shape[0] / h, shape[1] / w), order=1, mode="grid-wrap", grid_mode=True)
    big = big[: shape[0], : shape[1]]
    return (big - big.mean()) / (big.std() + 1e-8)


def contrast_table(contrast: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """Per-tissue intensities: a named sequence, or ``random`` (uniform per tissue, SynthSeg-style)."""
    if contrast == "random":
        if rng is None:
            raise ValueError("random contrast needs an rng")
        tab = rng.uniform(0.02, 1.0, N_TISSUES)
        tab[AIR] = 0.0
        tab[GAS] = 0.0
        return tab
    if contrast not in _CONTRAST_TABLES:
        raise ValueError(f"unknown contrast {contrast!r}; choose from {CONTRASTS + ('random',)}")
    return np.array(_CONTRAST_TABLES[contrast], float)


def _tissue_table(contrast, rng, sc, a) -> np.ndarray:
    tab = contrast_table(contrast, rng)
    tab = np.clip(tab * np.exp(sc["jitter"] + a["pp"]["jitter"]), 0, None)
    tab[AIR] = 0.0
    # disc degeneration: the nucleus loses signal towards the annulus
    tab[NUCLEUS] = tab[ANNULUS] + (tab[NUCLEUS] - tab[ANNULUS]) * a["lp"]["nucleus_signal"]
    return tab


def _tissue_image(T, tab, texture, streak):
    """Intensity of a tissue map: table lookup, smooth texture, fat streaks through muscle."""
    img = tab[T]
    img *= 1.0 + _TEXTURE[T] * texture
    musc = T == MUSCLE
    img[musc] += np.clip(streak[musc] - 1.3, 0, None) * (tab[FAT] - tab[MUSCLE]) * 0.6
    return img


def _coil_profile(g: _Grid, a: dict, coil: dict) -> np.ndarray:
    """Sensitivity of a posterior surface coil: 1 at the back, falling towards the abdomen, optional skin band."""
    d = np.clip(a["y_skin"] - g.Y, 0.0, None)
    half = coil["reach"] * (a["y_skin"] - a["y_body_front"])
    prof = coil["floor"] + (1 - coil["floor"]) * np.exp(-np.log(2) * (d / half) ** coil["power"])
    return prof * (1.0 + coil["band"] * np.exp(-d / coil["band_mm"]))


def _acquire(img, T, g, a, sc, rng):
    """What the scanner adds to the tissue image: blur, coil profile, bias, Gibbs ringing, ghosts, noise."""
    H, W = img.shape
    img = ndi.gaussian_filter(img, sc["psf"])
    if sc["coil"] is not None:
        img *= _coil_profile(g, a, sc["coil"])
    bias = _smooth_noise(rng, (H, W), 3, sigma=0.0)
    img *= 1.0 + sc["bias"] * np.tanh(bias)
    # Gibbs ringing (k-space truncation) and motion ghosts along the phase-encode direction (AP)
    if sc["gibbs"] or sc["ghost"]:
        k = np.fft.fftshift(np.fft.fft2(img))
        if sc["gibbs"]:
            keep = rng.uniform(0.55, 0.8)
            ky = np.abs(np.arange(H) - H / 2) <= keep * H / 2
            kx = np.abs(np.arange(W) - W / 2) <= keep * W / 2
            k *= ky[:, None] & kx[None, :]
        img = np.abs(np.fft.ifft2(np.fft.ifftshift(k)))
        if sc["ghost"]:  # periodic motion: faint copies shifted along the phase-encode (AP) direction
            shift = int(H * rng.uniform(0.12, 0.3))
            img = img + rng.uniform(0.03, 0.08) * 0.5 * (np.roll(img, shift, 0) + np.roll(img, -shift, 0))
    # Rician noise
    fg = img[T != AIR]
    sigma = (float(fg.mean()) if fg.size else 1.0) / sc["snr"]
    n1 = rng.standard_normal((H, W)) * sigma
    n2 = rng.standard_normal((H, W)) * sigma
    return np.sqrt((img + n1) ** 2 + n2 ** 2)


def _slab_cuts(a: dict, sc: dict) -> list[_Cut]:
    """The cuts half a slice thickness above and below that differ from the central one (thick-slice partial
    volume blends them in); below the disc midplane the next vertebra mirrors this one."""
    central = _cut_at(a["lp"], a["height"])
    lo, hi = _height_range(a["lp"], "disc")[0], _height_range(a["lp"], "pedicle")[1]
    cuts = [_cut_at(a["lp"], float(np.clip(abs(a["height"] + step * sc["thickness_mm"]), lo, hi)))
            for step in (-0.5, 0.5)]
    return [c for c in cuts if c != central]


def _render(g, a, soft, T, sc, contrast, rng):
    """The MR image of the slice: the central tissue map blended with the differing anatomy half a slice
    thickness above and below (partial volume through a thick slice), then acquisition effects."""
    H, W = T.shape
    tab = _tissue_table(contrast, rng, sc, a)
    texture = _smooth_noise(rng, (H, W), 90 * H * g.spacing / 200)
    streak = _smooth_noise(rng, (H, W), 60, sigma=0.8, aniso=(1.0, 0.25))
    img = _tissue_image(T, tab, texture, streak)
    w = sc["slab_weight"]
    for cut in _slab_cuts(a, sc):
        img = (1 - w) * img + w * _tissue_image(_paint(g, a, cut, soft)[0], tab, texture, streak)
    return _acquire(img, T, g, a, sc, rng)


RANDOM_CONTRASTS = ("t2", "t2fs", "water", "fat", "t1", "random")
RANDOM_CONTRAST_P = (0.3, 0.1, 0.2, 0.1, 0.2, 0.1)


def randomization(seed: int, patient: int, k: int) -> dict:
    """Per-slice domain randomisation (SynthSeg-style): contrast, field of view, pixel size, blur, noise, bias,
    surface-coil profile and slice thickness."""
    r = _rng(seed, patient, 9000 + k)
    fov = float(r.uniform(180, 420))
    spacing = float(r.uniform(0.4, 1.2))
    size = int(np.clip(round(fov / spacing / 16) * 16, 128, 768))
    half = size * spacing / 2
    room = max(0.0, half - 90.0)  # keep the spine well inside the image
    return {
        "contrast": str(r.choice(RANDOM_CONTRASTS, p=RANDOM_CONTRAST_P)),
        "size": size, "spacing": round(spacing, 4),
        "offset": (float(r.uniform(-1, 1) * min(room, 25)), float(r.uniform(-0.4, 1) * min(room, 45))),
        "scanner": {"psf": float(r.uniform(0.4, 2.2)), "snr": float(r.uniform(6, 40)), "bias": float(r.uniform(0, 0.4)),
                    "gibbs": bool(r.random() < 0.3), "ghost": bool(r.random() < 0.2),
                    "coil": _coil_params(r, 0.8), "thickness_mm": float(r.uniform(2.0, 7.0)),
                    "slab_weight": float(r.uniform(0.0, 0.33))},
    }


def phantom_slice(seed: int, patient: int, k: int, size: int = 512, spacing: float = 0.3906,
                  contrast: str = "t2", randomize: bool = False, positions=POSITION_P) -> PhantomSlice:
    """Slice ``k`` of virtual patient ``patient``: deterministic in all arguments.

    With ``randomize`` the contrast, matrix size, pixel spacing (field of view 180-420 mm), spine
    position, blur, noise, bias, coil profile and slice thickness come from :func:`randomization` and
    ``size`` / ``spacing`` / ``contrast`` are ignored. ``positions``: the shares of slices at each of
    POSITIONS (default POSITION_P; see :func:`check_positions`).
    """
    offset = (0.0, 0.0)
    rz = None
    if randomize:
        rz = randomization(seed, patient, k)
        size, spacing, contrast, offset = rz["size"], rz["spacing"], rz["contrast"], rz["offset"]
    a, g = _plan_slice(seed, patient, k, size, spacing, offset, check_positions(positions))
    soft = _paint_soft_tissue(g, a)
    T, L = _paint(g, a, _cut_at(a["lp"], a["height"]), soft)
    sc = _scanner_params(seed, a["pp"]["scanner"])
    if rz is not None:
        sc.update(rz["scanner"])
    img = _render(g, a, soft, T, sc, contrast, _rng(seed, patient, 5000 + k))
    img = np.clip(img * sc["gain"], 0, 32000).astype(np.int16)
    meta = dict(_slice_meta(a), contrast=contrast, snr=round(sc["snr"], 1), size=size, spacing=spacing,
                thickness_mm=round(sc["thickness_mm"], 1), slab=[c.position for c in _slab_cuts(a, sc)],
                coil=sc["coil"] is not None)
    return PhantomSlice(img, L, T, (spacing, spacing), meta)
