"""Stage `export`: the whole model and the state_dict (tutorial §4.10), and the serving files
(ONNX, torch.export) each when its param is on; all proven to agree with the trained model."""

from imgclf.core.stage import run_stage
from imgclf.serve.export import run

if __name__ == "__main__":
    run_stage("export", run)
