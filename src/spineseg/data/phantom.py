"""A procedural axial lumbar MRI phantom: virtual patients with exact label maps.

Each slice is built in two steps. First the anatomy: a *tissue map* (fat, muscle, marrow, cortex,
CSF, nerve roots, ligaments, disc, vessels, bowel, ...) is painted from shapes sampled in
millimetres per patient, per level and per slice, together with the label map
(0 background, 1 vertebral body, 2 vertebral foramen, 3 lamina). Then the appearance: every tissue
gets an intensity from a contrast table (T2 FSE by default; other sequences or fully random
intensities for domain randomisation), plus smooth texture, partial-volume blur, a multiplicative
bias field, optional Gibbs ringing and motion ghosts, and Rician noise.

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
POSITIONS = ("pedicle", "infrapedicular", "disc")
CONTRASTS = ("t2", "t2fs", "water", "fat", "t1")

# tissue codes of the tissue map
AIR, FAT, MUSCLE, SKIN, MARROW, CORTEX, CSF, NERVE, EPIFAT, LIGAMENT, NUCLEUS, ANNULUS, AORTA, IVC, \
    BOWEL_FLUID, BOWEL_WALL, GAS, KIDNEY, JOINT_FLUID, MODIC, FASCIA = range(21)
N_TISSUES = 21
TISSUE_NAMES = ("air", "fat", "muscle", "skin", "marrow", "cortex", "csf", "nerve", "epidural_fat", "ligament",
                "nucleus", "annulus", "aorta", "ivc", "bowel_fluid", "bowel_wall", "gas", "kidney", "joint_fluid",
                "modic", "fascia")

# the tissues each labelled structure is made of: a label never covers anything else (PHANTOM.md acceptance)
STRUCTURE_TISSUES = {
    1: (CORTEX, MARROW, MODIC),  # vertebral body
    2: (CSF, NERVE, EPIFAT),  # the canal space: dural sac (CSF, cauda equina) and epidural fat
    3: (CORTEX, MARROW),  # laminae
}

# relative intensities per sequence (fat = ~1 on T2 FSE). Marrow deliberately overlaps muscle on T2.
_CONTRAST_TABLES = {
    #        air   fat   musc  skin  marr  cort  csf   nerve epif  lig   nucl  annu  aorta ivc   bflu  bwal  gas   kidn  jflu  modic fasc
    "t2":   (0.00, 0.95, 0.27, 0.55, 0.42, 0.05, 1.00, 0.32, 0.88, 0.08, 0.85, 0.16, 0.04, 0.22, 0.90, 0.35, 0.01, 0.62, 0.85, 0.70, 0.12),
    "t2fs": (0.00, 0.12, 0.30, 0.35, 0.18, 0.04, 1.00, 0.35, 0.14, 0.07, 0.80, 0.15, 0.04, 0.30, 0.95, 0.40, 0.01, 0.70, 0.90, 0.75, 0.10),
    "water": (0.00, 0.08, 0.55, 0.40, 0.30, 0.05, 0.95, 0.50, 0.12, 0.10, 0.85, 0.30, 0.10, 0.60, 0.95, 0.50, 0.01, 0.80, 0.90, 0.70, 0.15),
    "fat":  (0.00, 1.00, 0.10, 0.40, 0.70, 0.04, 0.05, 0.05, 0.95, 0.05, 0.04, 0.05, 0.03, 0.05, 0.05, 0.20, 0.01, 0.10, 0.05, 0.85, 0.30),
    "t1":   (0.00, 1.00, 0.35, 0.60, 0.75, 0.05, 0.12, 0.40, 0.95, 0.10, 0.30, 0.20, 0.05, 0.30, 0.15, 0.40, 0.01, 0.45, 0.15, 0.90, 0.15),
}
# texture amplitude per tissue (relative modulation by smooth noise)
_TEXTURE = np.array([0.0, 0.03, 0.10, 0.08, 0.12, 0.05, 0.03, 0.05, 0.06, 0.05, 0.08, 0.08, 0.05, 0.06,
                     0.10, 0.15, 0.0, 0.08, 0.04, 0.10, 0.05])

@dataclass
class PhantomSlice:
    image: np.ndarray  # (H, W) int16, MR-like arbitrary units
    label: np.ndarray  # (H, W) uint8 in {0,1,2,3}
    tissue: np.ndarray  # (H, W) uint8 tissue codes
    spacing: tuple[float, float]
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- shapes

def _ellipse(u, v, cu, cv, a, b, ang=0.0):
    if ang:
        c, s = np.cos(ang), np.sin(ang)
        du, dv = u - cu, v - cv
        x, y = c * du + s * dv, -s * du + c * dv
    else:
        x, y = u - cu, v - cv
    return (x / a) ** 2 + (y / b) ** 2 <= 1.0


def _seg_dist(u, v, p1, p2):
    """Distance from every grid point to the segment p1-p2."""
    d = np.subtract(p2, p1)
    L2 = float(d @ d) or 1e-9
    t = np.clip(((u - p1[0]) * d[0] + (v - p1[1]) * d[1]) / L2, 0.0, 1.0)
    return np.hypot(u - (p1[0] + t * d[0]), v - (p1[1] + t * d[1]))


def _body_shape(u, v, cv, a, b, p, concav, shrink=0.0):
    """Kidney-bean vertebral body: a superellipse whose posterior border is pushed in."""
    a2, b2 = a - shrink, b - shrink
    U = u / a2
    V = (v - cv) / b2
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


# ----------------------------------------------------------------------------------------------- sampling

def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


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
        "vert_scale": float(r.uniform(0, 1)),
        "canal_s": float(r.uniform(0, 0.3)),
        "lamina_t": float(r.uniform(5.2, 7.6)),
        "jitter": r.normal(0.0, 0.05, N_TISSUES),
        "stenosis_level": int(r.integers(2, 5)) if r.random() < 0.25 else -1,
        "modic_level": int(r.integers(1, 5)) if r.random() < 0.2 else -1,
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
    return {
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
        "psoas": float((8 + 10 * f) * pp["muscle"]),
        "pedicle_w": float(r.uniform(7, 11)),
        "sp_len": float(r.uniform(25, 35)),
        "tp_len": float(r.uniform(22, 32) * (1.0 - 0.3 * (level == 4))),
        "stenosis": level == pp["stenosis_level"],
        "modic": level == pp["modic_level"],
    }


# ----------------------------------------------------------------------------------------------- anatomy

def _canal_masks(u, v, a, b, s, lp):
    """Canal sub-structures in the spine frame: returns dict of boolean masks."""
    canal = _canal_shape(u, v, a, b, s)
    t_lf = lp["lf_t"]
    inner = _canal_shape(u, v + t_lf * 0.5, max(a - t_lf, 1.0), max(b - t_lf * 0.5, 1.0), s)
    lf = canal & ~inner & (v > -0.1 * b)
    pll = canal & (v < -b + 0.8)
    prot = np.zeros_like(canal)
    if lp.get("protrusion"):
        pu, pr = lp["prot_u"], lp["prot_r"]
        prot = canal & _ellipse(u, v, pu, -b - pr * 0.25, pr * 1.3, pr)
    label = canal & ~lf & ~pll & ~prot
    # dural sac: an oval in the canal, touching its anterior wall
    sac = _ellipse(u, v, 0.0, -0.18 * b, 0.78 * a * (1 - 0.3 * s), 0.72 * b) & label
    return {"canal": canal, "lf": lf, "pll": pll, "prot": prot, "label": label, "sac": sac}


def _fit_canal(lp):
    """Choose canal semi-axes so that the labelled canal area hits its sampled target (two Newton steps)."""
    g = np.arange(-25, 25, 0.2)
    U, V = np.meshgrid(g, g)
    target = lp["canal_area"]
    a = np.sqrt(target / (np.pi * lp["canal_aspect"]))
    for _ in range(3):
        b = a * lp["canal_aspect"]
        area = _canal_masks(U, V, a, b, lp["canal_s"], lp)["label"].sum() * 0.04
        a *= np.sqrt(target / max(area, 1.0)) ** 0.9
    return float(a), float(a * lp["canal_aspect"])


def _slice_anatomy(seed, patient, k, size, spacing, offset=(0.0, 0.0)):
    pp = _patient_params(seed, patient)
    level = int(pp["levels"][k % 5])
    lp = _level_params(seed, patient, level, pp)
    r = _rng(seed, patient, 1000 + k)
    pos = POSITIONS[int(r.choice(3, p=[0.5, 0.3, 0.2]))]
    lp["protrusion"] = pos == "disc" and r.random() < 0.5
    lp["prot_u"] = float(r.uniform(-5, 5))
    lp["prot_r"] = float(r.uniform(3.0, 5.0))
    lp["lf_t"] = float(r.uniform(1.8, 3.0))
    if lp["stenosis"]:
        lp.update(canal_area=float(r.uniform(50, 85)), canal_aspect=float(r.uniform(0.4, 0.55)),
                  canal_s=1.0, lf_t=float(r.uniform(3.5, 5.0)), protrusion=False)
    a_c, b_c = _fit_canal(lp)

    H = W = size
    ys = (np.arange(H) - (H - 1) / 2) * spacing
    xs = (np.arange(W) - (W - 1) / 2) * spacing
    X, Y = np.meshgrid(xs, ys)  # X: + patient left (image right); Y: + posterior (image down)

    # spine frame: canal centre, axial rotation, obliquity (AP stretch)
    x0 = float(r.uniform(-10, 10)) + offset[0]
    y0 = float(r.uniform(8, 22)) + offset[1]
    theta = float(np.deg2rad(np.clip(pp["rot_bias"] + r.normal(0, 4), -15, 15)))
    tilt = float(1.0 / np.cos(np.deg2rad(r.uniform(0, 12))))
    c, s = np.cos(theta), np.sin(theta)
    u = c * (X - x0) + s * (Y - y0)
    v = (-s * (X - x0) + c * (Y - y0)) / tilt

    T = np.full((H, W), AIR, np.uint8)
    L = np.zeros((H, W), np.uint8)

    # organic shapes: a smooth displacement field for soft tissue, a milder one for bone
    wr = _rng(seed, patient, 3000 + k)
    Xs = X + 2.5 * _smooth_noise(wr, (H, W), 5, sigma=0.0)
    Ys = Y + 2.5 * _smooth_noise(wr, (H, W), 5, sigma=0.0)
    u = u + 0.5 * _smooth_noise(wr, (H, W), 14 * size * spacing / 200, sigma=0.0)
    v = v + 0.5 * _smooth_noise(wr, (H, W), 14 * size * spacing / 200, sigma=0.0)

    # ---- body outline, skin, subcutaneous fat, abdominal wall and cavity (patient frame)
    ow, od = pp["outline_w"] / 2, pp["outline_d"] / 2
    sp_len = lp["sp_len"]
    lam_t = lp["lamina_t"]
    y_sp_end = y0 + b_c + lam_t + sp_len
    y_skin = y_sp_end + pp["subcut"] + 8.0
    oc_y = y_skin - od
    ox = x0 * 0.3
    outline = _ellipse(Xs, Ys, ox, oc_y, ow, od)
    T[outline] = SKIN
    inner_skin = _ellipse(Xs, Ys, ox, oc_y, ow - 2.0, od - 2.0)
    T[inner_skin] = FAT
    body_cy = -b_c - lp["body_d"] / 2 + 1.0  # vertebral body centre in the spine frame (v)
    y_body_front = y0 + body_cy - lp["body_d"] / 2
    sub = pp["subcut"]
    wall = _ellipse(Xs, Ys, ox, oc_y, ow - sub * 0.7, od - sub * 0.7) & (Ys < y0 + body_cy + 10)
    T[wall] = MUSCLE
    cav_out = _ellipse(Xs, Ys, ox, oc_y, ow - sub * 0.7 - 9, od - sub * 0.7 - 9)
    T[cav_out & (Ys < y0 + body_cy + 10)] = FAT  # retroperitoneal / mesenteric fat
    cavity = cav_out & _ellipse(Xs, Ys, ox, y_body_front - 35, ow - sub - 10, 70)
    # bowel loops filling the peritoneal cavity
    lumens = (BOWEL_FLUID, BOWEL_FLUID, BOWEL_WALL, GAS)
    for _ in range(int(r.integers(22, 34))):
        bx = r.uniform(-ow, ow)
        by = r.uniform(y_body_front - 110, y_body_front - 12)
        br = r.uniform(7, 17)
        ang = r.uniform(0, np.pi)
        loop = _ellipse(Xs, Ys, bx, by, br, br * r.uniform(0.55, 1.0), ang) & cavity
        T[loop] = BOWEL_WALL
        T[_ellipse(Xs, Ys, bx, by, br * 0.72, br * 0.4, ang) & loop] = lumens[int(r.integers(0, 4))]

    # kidneys at upper levels (lateral, often partly outside the field of view)
    if level <= 1:
        for side in (-1, 1):
            kx = x0 + side * r.uniform(58, 72)
            kid = _ellipse(Xs, Ys, kx, y0 + body_cy + 5, 16, 28, side * 0.5) & inner_skin
            T[kid] = KIDNEY

    # ---- spine (rotated frame)
    a_b, b_bd = lp["body_w"] / 2, lp["body_d"] / 2
    # psoas beside the body
    pr = lp["psoas"]
    for side in (-1, 1):
        ps = _ellipse(u, v, side * (a_b + pr * 0.75), body_cy + b_bd * 0.25, pr, pr * 0.8, side * 0.35)
        T[ps] = MUSCLE
    # erector spinae (lateral) and multifidus (medial) behind the arch, with fat planes between
    m = pp["muscle"]
    for side in (-1, 1):
        es = _ellipse(u, v, side * 36 * m, b_c + 22, 26 * m, 20 + 6 * m, side * 0.25)
        T[es & inner_skin] = MUSCLE
        plane = _ellipse(u, v, side * 19 * m, b_c + 19, 1.2, 18, side * 0.2)
        T[plane & inner_skin] = FAT
        mf = _ellipse(u, v, side * 10 * m, b_c + 20, 10 * m, 17, side * 0.1)
        T[mf & inner_skin] = MUSCLE
        ql = _ellipse(u, v, side * (a_b + 2 * pr + 6), 0.0, 11 * m, 8 * m, side * 0.6)
        T[ql & inner_skin] = MUSCLE
    # thoracolumbar fascia: a thin dark sheet between the paraspinal muscles and subcutaneous fat
    fascia = (np.abs(np.hypot(u / (62 * m), (v - b_c - 14) / (27 + 6 * m)) - 1.0) < 0.015) & (v > b_c + 22)
    T[fascia & inner_skin & (T == FAT)] = FASCIA

    # great vessels in front of the body
    ay = body_cy - b_bd - 11
    T[_ellipse(u, v, 12 + r.uniform(-3, 3), ay, 9.5, 9.5)] = AORTA
    T[_ellipse(u, v, -18 + r.uniform(-3, 3), ay + 1, 11, 7)] = IVC

    # vertebral body (label 1), with cortical rim, marrow, optional osteophytes / Modic change / disc
    body = _body_shape(u, v, body_cy, a_b, b_bd, lp["body_p"], lp["concav"])
    if pp["osteophytes"] and level >= 2:
        for side in (-1, 1):
            r.uniform()  # an unused draw, kept so that existing seeds reproduce their data sets
            ox, oy = side * a_b * 0.92, body_cy - b_bd * r.uniform(0.1, 0.7)
            body |= _ellipse(u, v, ox, oy, r.uniform(2, 4), r.uniform(1.5, 3), side * 0.6)
    marrow = _body_shape(u, v, body_cy, a_b, b_bd, lp["body_p"], lp["concav"], shrink=r.uniform(1.0, 2.0))
    T[body] = CORTEX
    T[marrow & body] = MARROW
    if lp["modic"]:
        T[_ellipse(u, v, r.uniform(-a_b / 3, a_b / 3), body_cy + r.uniform(-b_bd / 3, b_bd / 3),
                   a_b * 0.4, b_bd * 0.3, r.uniform(0, np.pi)) & marrow] = MODIC
    L[body] = 1
    if pos == "disc":
        frac = r.uniform(0.45, 0.7)
        dcy = body_cy - 0.1 * b_bd
        disc = _ellipse(u, v, 0, dcy, a_b * frac, b_bd * frac)
        T[disc] = ANNULUS
        T[_ellipse(u, v, 0, dcy, a_b * frac * 0.7, b_bd * frac * 0.6)] = NUCLEUS
        L[disc] = 0

    # posterior arch: pedicles / foramina, laminae (label 3), facets, spinous and transverse processes
    w_mid = a_c * float(_canal_profile(np.array(0.55), lp["canal_s"]))
    pw = lp["pedicle_w"]
    ped_v0, ped_v1 = body_cy + b_bd * 0.4, 0.25 * b_c
    ped_u = w_mid + pw / 2 + 0.5
    if pos == "pedicle":
        for side in (-1, 1):
            dped = _seg_dist(u, v, (side * ped_u, ped_v0), (side * ped_u, ped_v1))
            T[(dped <= pw / 2) & ~body] = CORTEX
            T[(dped <= pw / 2 - 1.2) & ~body] = MARROW
            # transverse processes
            tp0 = (side * (ped_u + 2), ped_v1 - 2)
            tp1 = (side * (ped_u + lp["tp_len"]), ped_v1 + 3)
            T[(_seg_dist(u, v, tp0, tp1) <= 3.5) & ~body] = CORTEX
            T[(_seg_dist(u, v, tp0, tp1) <= 2.3) & ~body] = MARROW
    else:
        # intervertebral foramen beside the body: fat with the exiting nerve root
        for side in (-1, 1):
            fo = _seg_dist(u, v, (side * (ped_u + 1), ped_v0 + 3), (side * (ped_u + 3), ped_v1)) <= pw / 2 + 1
            T[fo & ~body] = FAT
            T[_ellipse(u, v, side * (ped_u + 2), (ped_v0 + ped_v1) / 2, 2.6, 2.2) & ~body] = NERVE

    lam_l, phi = lp["lamina_l"], lp["lamina_phi"] * (0.65 + 0.35 * lp["canal_s"])
    # the laminae's inner edge must clear the canal: v + |u| tan(phi) < p2_v - T / (2 cos phi) on the canal
    tt = np.linspace(0, 1, 101)
    clear = np.max(-b_c + 2 * b_c * tt + a_c * _canal_profile(tt, lp["canal_s"]) * np.tan(phi))
    p2 = (0.0, float(max(b_c, clear + 0.3) + lam_t / (2 * np.cos(phi))))
    lam = np.zeros((H, W), bool)
    lam_in = np.zeros((H, W), bool)
    ends = []
    for side in (-1, 1):
        p1 = (side * lam_l * np.cos(phi), p2[1] - lam_l * np.sin(phi))
        ends.append(p1)
        d = _seg_dist(u, v, p1, p2)
        lam |= d <= lam_t / 2
        lam_in |= d <= lam_t / 2 - 1.2
    # spinous process (background) continuing the laminae backwards
    sp0, sp1 = (0.0, p2[1] + lam_t * 0.2), (r.normal(0, 1.0), p2[1] + sp_len)
    dsp = _seg_dist(u, v, sp0, sp1)
    sp_r = 2.5 + 0.6 * (1 - np.clip((v - sp0[1]) / sp_len, 0, 1))
    sp = (dsp <= sp_r) & ~lam
    T[lam | sp] = CORTEX
    T[(lam_in | (dsp <= sp_r - 1.1)) & ~(sp & ~lam & (dsp > sp_r - 1.1))] = MARROW
    L[lam] = 3
    L[sp] = 0
    # interspinous ligament / fat behind the spinous tip
    T[_seg_dist(u, v, sp1, (sp1[0], sp1[1] + 8)) <= 1.5] = LIGAMENT
    # facet joints at the lamina-pedicle junction: SAP in front, IAP behind, a thin joint line between
    fscale = 1.35 if lp["stenosis"] else 1.0
    for side, p1 in zip((-1, 1), ends):
        fu, fv = p1[0] + side * 2.0, p1[1] + 1.0
        ang = side * r.uniform(0.6, 1.1)
        sap = _ellipse(u, v, fu + side * 2.8 * fscale, fv - 2.0, 4.0 * fscale, 7.0 * fscale, ang)
        iap = _ellipse(u, v, fu - side * 2.0 * fscale, fv + 2.5, 3.8 * fscale, 6.5 * fscale, ang)
        joint = _ellipse(u, v, fu + side * 0.4 * fscale, fv + 0.2, 0.6, 7.0 * fscale, ang) & (sap | iap)
        facet = (sap | iap) & ~joint
        T[facet] = CORTEX
        T[(_ellipse(u, v, fu + side * 2.8 * fscale, fv - 2.0, 2.8 * fscale, 5.6 * fscale, ang)
           | _ellipse(u, v, fu - side * 2.0 * fscale, fv + 2.5, 2.6 * fscale, 5.1 * fscale, ang)) & facet] = MARROW
        T[joint] = JOINT_FLUID
        L[facet | joint] = 0
        # pedicle-to-facet continuity at pedicle level (pars): keep the ring closed
        if pos == "pedicle":
            bar = _seg_dist(u, v, (side * ped_u, ped_v1), (fu, fv)) <= pw / 2 - 0.5
            T[bar & (L != 3)] = CORTEX
            T[(_seg_dist(u, v, (side * ped_u, ped_v1), (fu, fv)) <= pw / 2 - 1.7) & (L != 3)] = MARROW
            L[bar & (L == 3)] = 3

    # canal contents last: they win over bone at the shared borders
    cm = _canal_masks(u, v, a_c, b_c, lp["canal_s"], lp)
    T[cm["canal"]] = EPIFAT
    T[cm["sac"]] = CSF
    T[cm["lf"] | cm["pll"]] = LIGAMENT
    if lp["protrusion"]:
        T[cm["prot"]] = ANNULUS
    # cauda equina: dark dots lying dependent (posterior) in the sac
    n_roots = int(r.integers(8, 20))
    for _ in range(n_roots):
        ru = r.normal(0, a_c * 0.25)
        rv = r.uniform(-0.1 * b_c, 0.55 * b_c)
        dot = _ellipse(u, v, ru, rv, r.uniform(0.5, 0.9), r.uniform(0.5, 0.9)) & cm["sac"]
        T[dot] = NERVE
    L[cm["canal"]] = 0
    L[cm["label"]] = 2
    # the bony ring of a disc-level slice must stay one piece: detached fragments become annulus
    if pos == "disc":
        frag = (L == 1) & ~largest_component(L == 1)
        T[frag] = ANNULUS
        L[frag] = 0

    meta = {
        "level": LEVELS[level], "position": pos, "stenosis": bool(lp["stenosis"]),
        "protrusion": bool(lp["protrusion"]), "modic": bool(lp["modic"]),
        "osteophytes": bool(pp["osteophytes"] and level >= 2), "scanner": pp["scanner"],
        "rotation_deg": round(float(np.rad2deg(theta)), 2),
    }
    return T, L, meta, pp


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


def _render(T, rng, sc, pp, contrast, spacing):
    H, W = T.shape
    tab = contrast_table(contrast, rng)
    tab = np.clip(tab * np.exp(sc["jitter"] + pp["jitter"]), 0, None)
    tab[AIR] = 0.0
    img = tab[T]
    # tissue texture: smooth noise, plus fat streaks through muscle
    tex = _smooth_noise(rng, (H, W), 90 * H * spacing / 200)
    img *= 1.0 + _TEXTURE[T] * tex
    streak = _smooth_noise(rng, (H, W), 60, sigma=0.8, aniso=(1.0, 0.25))
    musc = T == MUSCLE
    img[musc] += np.clip(streak[musc] - 1.3, 0, None) * (tab[FAT] - tab[MUSCLE]) * 0.6
    # partial-volume blur
    img = ndi.gaussian_filter(img, sc["psf"])
    # multiplicative bias field
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
    img = np.sqrt((img + n1) ** 2 + n2 ** 2)
    return img


RANDOM_CONTRASTS = ("t2", "t2fs", "water", "fat", "t1", "random")
RANDOM_CONTRAST_P = (0.3, 0.1, 0.2, 0.1, 0.2, 0.1)


def randomization(seed: int, patient: int, k: int) -> dict:
    """Per-slice domain randomisation (SynthSeg-style): contrast, field of view, pixel size, blur, noise, bias."""
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
                    "gibbs": bool(r.random() < 0.3), "ghost": bool(r.random() < 0.2)},
    }


def phantom_slice(seed: int, patient: int, k: int, size: int = 512, spacing: float = 0.3906,
                  contrast: str = "t2", randomize: bool = False) -> PhantomSlice:
    """Slice ``k`` of virtual patient ``patient``: deterministic in all arguments.

    With ``randomize`` the contrast, matrix size, pixel spacing (field of view 180-420 mm), spine
    position, blur, noise and bias come from :func:`randomization` and ``size`` / ``spacing`` /
    ``contrast`` are ignored.
    """
    offset = (0.0, 0.0)
    rz = None
    if randomize:
        rz = randomization(seed, patient, k)
        size, spacing, contrast, offset = rz["size"], rz["spacing"], rz["contrast"], rz["offset"]
    T, L, meta, pp = _slice_anatomy(seed, patient, k, size, spacing, offset)
    sc = _scanner_params(seed, pp["scanner"])
    if rz is not None:
        sc.update(rz["scanner"])
    rng = _rng(seed, patient, 5000 + k)
    img = _render(T, rng, sc, pp, contrast, spacing)
    img = np.clip(img * sc["gain"], 0, 32000).astype(np.int16)
    meta = dict(meta, contrast=contrast, snr=round(sc["snr"], 1), size=size, spacing=spacing)
    return PhantomSlice(img, L, T, (spacing, spacing), meta)
