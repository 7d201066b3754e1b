"""Stage `params`: check the whole params.yaml, sections no other stage reads included.

Every stage validates the whole file, but DVC runs a stage only when the keys it declares
change, so a misspelt section (`trian:`) would reach no stage and `dvc repro` would say
"up to date". This stage declares the whole file and writes nothing: DVC runs it whenever
params.yaml changes, nothing depends on it, and the other stages do not rerun.
"""

from imgclf.core.params import check_whole_file
from imgclf.core.stage import run_stage

if __name__ == "__main__":
    run_stage("params", check_whole_file)
