"""WeightedSFTTrainer under `accelerate launch` (tests/test_trl.py): the trainer of tests/test_trl.py on the saved
dataset DATA, MICRO examples per rank and micro-batch, ACCUMULATION micro-batches per step; the model saved to OUT.

    accelerate launch --config_file launch/ddp.yaml --num_processes 2 tests/dist/trl_train.py DATA OUT MICRO ACCUMULATION
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repository root: tests.test_trl

from datasets import load_from_disk  # noqa: E402

from tests.test_trl import trainer  # noqa: E402

data, out, micro, accumulation = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
tr = trainer(load_from_disk(data), out / "trainer", micro=micro, accumulation=accumulation)
tr.train()
tr.save_model(str(out / "model"))
