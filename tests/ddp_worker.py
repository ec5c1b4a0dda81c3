"""Run by tests/test_distributed.py under torchrun: one data-parallel compile with training,
each rank then saving the model it ended with, for the test to compare across ranks."""
import sys

import lutcompile
from lutcompile.compile.distributed import world

model, calib, train, output, ended = sys.argv[1:6]
result = lutcompile.compile_model(model, output, calib, train=train, codebooks=4, partition="contiguous",
                                  table_loss="ridge", epochs=3, progress=False)
group = world()
with open(f"{ended}.{group.rank}", "wb") as f:
    f.write(result.model.SerializeToString())
print(f"rank {group.rank} of {group.size}: {len(result.training[-1].epochs) - 1} epochs")
