"""Stage `params`: check the whole params.yaml, sections no other stage reads included.

Every stage validates the whole file, but DVC runs a stage only when the keys it declares
change, so a misspelt section (`trian:`) would reach no stage and `dvc repro` would say
"up to date". This stage declares the whole file and writes nothing: DVC runs it whenever
params.yaml changes, nothing depends on it, and the other stages do not rerun. It also checks
``model.arch`` against the registry (an unknown name fails here, before any download).
"""

from imgclf.core.stage import run_stage
from imgclf.models.registry import check_params_file

if __name__ == "__main__":
    run_stage("params", check_params_file)
