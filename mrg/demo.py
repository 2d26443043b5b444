"""Build the mrg demo and launch it (``python app.py``, ``mrg demo``).

Configuration: command-line flags or environment variables (flags win).

    MRG_CHECKPOINTS          folder or Hub repo id with prompt-wise/ and promptbook-wise/  (default assets/checkpoints)
    MRG_LLM                  override the frozen LLM (local directory or hub id)
    MRG_DEVICE               cpu | cuda                                      (default: cuda when present)
    MRG_QUANTIZATION         auto | none | int8-wo | int4-wo | nf4 | int8 for the LLM  (default auto:
                             on a CPU, whichever of fp32, bf16, int8-wo, int4-wo writes a report
                             fastest, measured once per machine; elsewhere the checkpoint's)
    MRG_DTYPE                auto | float32 | bfloat16 | float16 for the LLM  (default auto: what
                             the quantization needs, else measured as above)
    MRG_DATA_DIR             where the review database lives                 (default ./mrg-data)
    MRG_DATASET_ANNOTATION   annotation.json for the dataset browser         (optional)
    MRG_DATASET_IMAGES       its image root; alone, a folder whose images are the cases
    MRG_DATASET_SPLIT        split to browse                                 (default test)
    MRG_SHARED_DATA          shared data folder for the IU X-ray examples    (default ../shared/data)
    MRG_HOST / MRG_PORT      where to listen (also GRADIO_SERVER_*, PORT)   (default 127.0.0.1:7860)
    MRG_MAX_UPLOAD_MB        upload size limit                               (default 64)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mrg.config import DTYPES, QUANTIZATIONS
from mrg.environment import setting

HERE = Path(__file__).resolve().parents[1]  # the repository root


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, each defaulting to its environment variable (``mrg.environment``)."""
    parser = argparse.ArgumentParser(description="mrg chest X-ray report generation demo")
    parser.add_argument("--checkpoints", default=setting("MRG_CHECKPOINTS"))
    parser.add_argument("--llm", default=setting("MRG_LLM"))
    parser.add_argument("--device", default=setting("MRG_DEVICE"))
    parser.add_argument(
        "--quantization", default=setting("MRG_QUANTIZATION"), choices=("auto", *QUANTIZATIONS)
    )
    parser.add_argument("--dtype", default=setting("MRG_DTYPE"), choices=("auto", *DTYPES))
    parser.add_argument("--data-dir", default=setting("MRG_DATA_DIR"))
    parser.add_argument("--dataset-annotation", default=setting("MRG_DATASET_ANNOTATION"))
    parser.add_argument("--dataset-images", default=setting("MRG_DATASET_IMAGES"))
    parser.add_argument("--dataset-split", default=setting("MRG_DATASET_SPLIT"))
    parser.add_argument("--shared-data", default=setting("MRG_SHARED_DATA"))
    parser.add_argument("--host", default=setting("MRG_HOST"))
    parser.add_argument("--port", type=int, default=int(setting("MRG_PORT")))
    parser.add_argument("--max-upload-mb", type=int, default=int(setting("MRG_MAX_UPLOAD_MB")))
    return parser.parse_args(argv)


def build_demo(args: argparse.Namespace):
    """The Blocks, built at once; the models load in the background once ``start()``-ed.

    Only Gradio is imported before the page is served: torch, transformers and the
    checkpoints load in a thread (``mrg.loading``), and the banner says so until they are in.
    """
    from mrg.config import CUSTOMIZED_MODES
    from mrg.hub import checkpoint_modes
    from mrg.imaging import ImageLimits
    from mrg.loading import Loading
    from mrg.review import ReviewStore
    from mrg.ui import DemoApp, default_examples

    def load_service():
        import torch

        from mrg.service import ReportService

        torch.set_num_threads(int(setting("MRG_NUM_THREADS")))
        return ReportService.load(
            args.checkpoints,
            llm_source=args.llm,
            device=args.device,
            quantization=args.quantization,
            dtype=args.dtype,
        )

    def import_heavy_modules():
        """What requests import before the models are in: only the loading thread does."""
        import mrg.data.study
        import mrg.service  # noqa: F401

    store = ReviewStore(Path(args.data_dir) / "reviews.sqlite")
    dataset = None
    if args.dataset_annotation:
        from mrg.data.datasets import load_annotation

        dataset = load_annotation(
            args.dataset_annotation, args.dataset_images or ".", split=args.dataset_split
        )
    elif args.dataset_images:
        from mrg.data.datasets import folder_records

        dataset = folder_records(args.dataset_images)
    shared = (
        Path(args.shared_data) if args.shared_data and Path(args.shared_data).is_dir() else None
    )
    limits = ImageLimits(max_file_bytes=args.max_upload_mb * 1024 * 1024)
    app = DemoApp(
        Loading(load_service, imports=import_heavy_modules),
        store,
        default_examples(shared),
        dataset,
        limits,
        modes=list(checkpoint_modes(args.checkpoints)) or CUSTOMIZED_MODES,
    )
    return app.build(), app.loading


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    demo, loading = build_demo(args)
    demo.queue(max_size=32, default_concurrency_limit=2)
    loading.start()  # the page is served while the models load
    from mrg.ui import CSS, KEYBOARD_JS

    demo.launch(
        server_name=args.host,
        server_port=args.port,
        max_file_size=f"{args.max_upload_mb}mb",
        css=CSS,
        head=KEYBOARD_JS,
    )


if __name__ == "__main__":
    main()
