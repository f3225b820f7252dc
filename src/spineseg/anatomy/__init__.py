"""Anatomy shared by the phantom, training, inference and the checks.

This module: reference ranges the phantom satisfies and `sanity` checks. :mod:`.postprocess`: the
anatomically informed clean-up of a predicted slice. :mod:`.order`: the anatomical order rule of one slice
(`sanity`, and the acceptance test of self-training pseudo-labels).

Areas are in mm^2 per axial slice, after PHANTOM.md. A slice through the disc cuts no vertebral body
at all (``ABSENT_AT``); everywhere else a structure is present, and the loosest range of a structure
over slice positions and pathology is what a plausibility check on an unknown slice may demand of it.
"""

from __future__ import annotations

AREA_RANGES_MM2 = {
    # at the concave endplate the disc replaces the middle of the body, leaving a rim
    "vertebral_body": {"default": (700.0, 2000.0), "endplate": (250.0, 2000.0)},
    "vertebral_foramen": {"default": (150.0, 300.0), "stenosis": (35.0, 100.0), "protrusion": (90.0, 300.0)},
    "lamina": {"default": (150.0, 650.0)},
}

# slice positions where a structure is not cut at all: its area there is exactly 0
ABSENT_AT = {"vertebral_body": ("disc",)}

# the loosest range per structure where it is present: what a slice of unknown position and pathology
# showing the structure must satisfy
AREA_LIMITS_MM2 = {s: (min(lo for lo, _ in r.values()), max(hi for _, hi in r.values()))
                   for s, r in AREA_RANGES_MM2.items()}


def area_range(structure: str, position: str, stenosis: bool, protrusion: bool) -> tuple[float, float]:
    """The area range (mm^2) of ``structure`` on a slice of known position and pathology."""
    if position in ABSENT_AT.get(structure, ()):
        return (0.0, 0.0)
    r = AREA_RANGES_MM2[structure]
    if position in r:
        return r[position]
    if structure == "vertebral_foramen":
        if stenosis:
            return r["stenosis"]
        if protrusion:
            return r["protrusion"]
    return r["default"]
