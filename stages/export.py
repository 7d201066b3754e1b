"""Stage `export`: the whole model and the state_dict (tutorial §4.10), and the serving files
(ONNX, torch.export) each when its param is on; all proven to agree with the trained model."""

import logging

from imgclf.cache.dataset import load_cache
from imgclf.core import paths
from imgclf.core.files import write_json
from imgclf.core.params import load_params
from imgclf.core.stage import run_stage
from imgclf.serve.export import export
from imgclf.serve.serving import FILE_NAMES, FORMATS


def main() -> None:
    export_params = load_params(paths.PARAMS).export
    images = load_cache(paths.PROCESSED_DIR, splits=("test",)).test.images[: export_params.check_batch].clone()
    formats = [f for f in FORMATS if getattr(export_params, f)]
    report = export(paths.TRAINED_MODEL, paths.WHOLE_MODEL, paths.EXPORTED_BUNDLE, paths.SERVING_DIR, images,
                    formats=formats, tolerance=export_params.tolerance, tta_flip=export_params.tta_flip,
                    tta_shift=export_params.tta_shift)
    write_json(paths.EXPORT_METRICS, report)
    written = [paths.WHOLE_MODEL, paths.EXPORTED_BUNDLE, *(paths.SERVING_DIR / FILE_NAMES[f] for f in formats)]
    logging.getLogger("export").info("exported %s; all reload in a fresh process and agree on %d images%s",
                                     ", ".join(map(str, written)), report["verified_images"],
                                     "".join(f"; {f} max |logit diff| {report[f'max_abs_diff_{f}']:.2g}"
                                             for f in formats))


if __name__ == "__main__":
    run_stage("export", main)
