"""A picture of a plan: a steps x blocks heatmap per module (fraction of tokens computed)."""

from __future__ import annotations

from pathlib import Path

from ..plan import CachePlan


def plot_plan(plan: CachePlan, path: str | Path, title: str | None = None) -> Path:
    """Write a PNG: one panel per module, rows = denoising steps, columns = blocks.

    Colour = fraction of the module's tokens computed (1 compute, 0 reuse, in between partial);
    steps that skip the whole block stack are drawn as reuse and marked "skip".
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    data = np.zeros((len(plan.modules), plan.num_steps, plan.num_blocks))
    for s, step in enumerate(plan.steps):
        for b, row in enumerate(step.fractions):
            for m, f in enumerate(row):
                data[m, s, b] = 0.0 if step.skips_blocks else f
    cols = len(plan.modules)
    fig, axes = plt.subplots(1, cols, figsize=(2.2 + 1.8 * cols + 0.12 * plan.num_blocks * cols,
                                              1.5 + 0.18 * plan.num_steps), squeeze=False)
    image = None
    for m, name in enumerate(plan.modules):
        ax = axes[0, m]
        image = ax.imshow(data[m], aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("block")
        if m == 0:
            ax.set_ylabel("step")
        for s, step in enumerate(plan.steps):
            if step.skips_blocks:
                label = "skip call" if step.skip_call else "skip"
                ax.text(plan.num_blocks / 2 - 0.5, s, label, ha="center", va="center", color="white", fontsize=7)
    fig.colorbar(image, ax=axes[0, :].tolist(), label="fraction computed")
    fig.suptitle(title or f"{plan.method}: {plan.compute_fraction():.0%} of module work", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
