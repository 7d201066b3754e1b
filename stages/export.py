"""Stage `export`: the whole model and the state_dict (tutorial §4.10), proven to agree."""

import logging

from imgclf import paths
from imgclf.cli import run_stage
from imgclf.dataset import load_cache
from imgclf.export import export
from imgclf.files import write_json
from imgclf.params import load_params


def main() -> None:
    params = load_params(paths.PARAMS)
    images = load_cache(paths.PROCESSED_DIR, splits=("test",)).test.images[: params.export.check_batch].clone()
    report = export(paths.TRAINED_MODEL, paths.WHOLE_MODEL, paths.STATE_DICT, images)
    write_json(paths.EXPORT_METRICS, report)
    logging.getLogger("export").info("exported %s and %s; both reload and agree on %d images",
                                     paths.WHOLE_MODEL, paths.STATE_DICT, report["verified_images"])


if __name__ == "__main__":
    run_stage("export", main)
