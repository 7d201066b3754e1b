"""Stage `train`: train model.arch on the cached tensors; resumes from checkpoints/train.pt.

With train.nodes x train.processes > 1 the script restarts itself under torchrun. On the
other nodes of a multi-node run: `python stages/train.py --join` (docs/distributed.md).
"""

from imgclf.core.stage import run_stage
from imgclf.train.launch import read_section, run

if __name__ == "__main__":
    run_stage("train", run, read=read_section)
