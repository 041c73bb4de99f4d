"""A 64 x 64 image-like field evolved by the PDE-SSM block for several times τ (docs/pde_ssm.md).

Three channels of one [1, 64, 64, 3] tensor carry the same picture (a disk, a bar and a few
dots); each channel has its own PDE, so one call evolves all three:

- diffusion: K = 1.5 I, no velocity: the picture blurs, its mean stays;
- convection: velocity (b_y, b_x) = (4, 8) cells per unit time: the picture moves (periodic
  boundary: it wraps around the edges), unchanged in shape;
- both, with decay: K anisotropic (mostly along x), the same velocity, r = -0.1.

The rows of the saved grid are the three PDEs, the columns τ = 0, 1, 2, 4, 8; a last row
repeats "both" with the zero boundary, where what leaves the grid is gone instead of
reappearing on the other side. Saves pde_ssm_demo.png (or the path given).

    python3 examples/python/pde_ssm_demo.py [plot.png]
"""

from __future__ import annotations

import sys

import numpy as np
from foveal import pde_ssm as pde

SIDE = 64
TIMES = (0.0, 1.0, 2.0, 4.0, 8.0)
NAMES = ("diffusion", "convection", "both, periodic", "both, zero boundary")


def picture() -> np.ndarray:
    """[64, 64]: a disk, a vertical bar and three dots on a dark background."""
    y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float64)
    field = ((y - 20) ** 2 + (x - 22) ** 2 < 64).astype(np.float64)
    field += ((np.abs(x - 44) < 3) & (y > 30) & (y < 58)).astype(np.float64)
    for dot_y, dot_x in ((48, 14), (52, 20), (10, 50)):
        field += ((y - dot_y) ** 2 + (x - dot_x) ** 2 < 4).astype(np.float64)
    return field


def evolve(field: np.ndarray, tau: float, boundary: str) -> np.ndarray:
    """[64, 64] -> [3, 64, 64]: the field after time tau under each channel's PDE."""
    if tau == 0:
        return np.stack([field] * 3)
    x = np.repeat(field[None, :, :, None], 3, axis=3)  # [1, H, W, C]
    # Cholesky factors (l_yy, l_xy, l_xx) of K = L Lᵀ: 1.5 I, 0, and mostly along x.
    diffusion = np.array([[1.2247, 0.0, 1.2247], [0.0, 0.0, 0.0], [0.5, 0.0, 1.3]])
    velocity = np.array([[0.0, 0.0], [4.0, 8.0], [4.0, 8.0]])
    reaction = np.array([0.0, 0.0, -0.1])
    y = pde.pde_ssm(x, diffusion, velocity, reaction, [tau], boundary=boundary)
    return y[0].transpose(2, 0, 1)


def main() -> None:
    field = picture()
    rows = []
    for boundary in ("periodic", "zero"):
        evolved = [evolve(field, tau, boundary) for tau in TIMES]  # [T][3, H, W]
        channels = range(3) if boundary == "periodic" else (2,)
        rows += [[frame[c] for frame in evolved] for c in channels]
    for name, row in zip(NAMES, rows):
        means = ", ".join(f"{frame.mean():.4f}" for frame in row)
        print(f"{name:<22} mean over τ = {TIMES}: {means}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib not installed: no plot)")
        return
    path = sys.argv[1] if len(sys.argv) > 1 else "pde_ssm_demo.png"
    figure, axes = plt.subplots(len(rows), len(TIMES), figsize=(2.2 * len(TIMES), 2.3 * len(rows)))
    for r, (name, row) in enumerate(zip(NAMES, rows)):
        for t, (tau, frame) in enumerate(zip(TIMES, row)):
            axis = axes[r][t]
            axis.imshow(frame, cmap="magma", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title(f"τ = {tau:g}")
            if t == 0:
                axis.set_ylabel(name)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
