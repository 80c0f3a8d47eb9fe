"""The dualcache-diffusers Space: uncached vs cached on the same seeds, live.

    python spaces/dualcache/app.py        # http://127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT to change)

The app itself is ``dualcache_diffusers.space`` (``dualcache app`` starts the same thing); this file is the
launcher a Hugging Face Space runs. Learned plans are read from ``plans/`` next to this file when present
(copy ``docs/results/plans/*.json`` there when you duplicate the Space), besides ``docs/results/plans`` of a
source checkout.
"""

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
if (HERE / "plans").is_dir():
    extra = os.environ.get("DUALCACHE_PLANS", "")
    os.environ["DUALCACHE_PLANS"] = os.pathsep.join(p for p in (str(HERE / "plans"), extra) if p)

from dualcache_diffusers.space import launch  # noqa: E402

if __name__ == "__main__":
    # On a Space GRADIO_SERVER_NAME is 0.0.0.0; locally it defaults to 127.0.0.1.
    launch()
