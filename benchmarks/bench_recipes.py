"""Recipe study: `bias-lab train` variants for a fixed number of epochs, one JSON line per run.

    python benchmarks/bench_recipes.py --data path/to/tiny4 \\
        "lenet 60 --crop-scale 0.7" "lenet 60 --crop-scale 0.08" "lenet 120 --label-smoothing 0.1 --seed 1"

--data defaults to the folder in the environment variable BIAS_LAB_DATA. A recipe takes as long as its training:
`lenet 120 --label-smoothing 0.1` took 144-320 s on tiny4 on 2 cores.

Each recipe is `MODEL EPOCHS [bias-lab train options]`, run in turn in a subprocess on the CPU at 64 px, seed 0
unless the recipe sets --seed (which also re-draws the split: a different seed is a different test set). With
tta=true (the default) a run logs test_accuracy and test_accuracy_no_tta, so each line shows what the mirror
averaging changed on the same weights. Accuracy is deterministic per seed; train_s depends on the machine's load,
printed per line. Not a test: nothing is asserted. 300 test images on tiny4: one image is 0.33 points.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, also when imported or run with runpy
import common  # noqa: E402


def main() -> int:
    ap = common.parser(__doc__, "data")
    ap.add_argument("recipes", nargs="+", help="'MODEL EPOCHS [train options]', one quoted argument each")
    args = ap.parse_args()
    data = Path(common.need_data(ap, args)).expanduser().resolve()
    with tempfile.TemporaryDirectory(prefix="bias-lab-recipes-") as tmp_s:
        tmp = Path(tmp_s)
        env = common.scratch_env(tmp)
        for recipe in args.recipes:
            model, epochs, *extra = shlex.split(recipe)
            run, _ = common.train_cli(data, model, int(epochs), env, tmp, extra)
            m = run.data.metrics
            line = {
                "recipe": recipe,
                "test": round(m["test_accuracy"], 4),
                "test_no_tta": round(m.get("test_accuracy_no_tta", float("nan")), 4),
                "val": round(m["best_val_accuracy"], 4),
                "train_s": round(m["train_time_s"], 1),
                "img_s": round(m["images_per_s"]),
                "load": round(os.getloadavg()[0], 2),
            }
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
