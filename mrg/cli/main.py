"""The ``mrg`` command: info, generate, train, evaluate, prepare, demo.

Each subcommand parses its own flags and hands off to the module that does the work;
heavy imports happen inside the handlers so ``mrg --help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mrg.cli.common import add_decoding_flags, console
from mrg.cli.evaluate import evaluate_command, labeler_eval_command
from mrg.cli.generate import findings_flag, generate_command
from mrg.cli.training import info_command, prepare_command, train_command
from mrg.config import CUSTOMIZER_MODES, DTYPES, QUANTIZATIONS, ConfigError
from mrg.environment import setting
from mrg.train.config import TRAIN_PRESETS


def demo_command(args: argparse.Namespace) -> int:
    """Start the Gradio demo; every flag after `demo` goes to it (see `mrg demo --help`)."""
    from mrg.demo import main as demo_main

    demo_main(args.demo_args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mrg.config import DEFAULT_DECODING, R2GENGPT_DECODING

    parser = argparse.ArgumentParser(prog="mrg", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="trainable parameter counts per customizer mode")
    info.add_argument("--preset", default="demo-cpu")
    info.set_defaults(func=info_command)

    prepare = sub.add_parser("prepare", help="build an annotation.json from a raw dataset")
    prepare.add_argument("dataset", choices=["iu-xray"])
    prepare.add_argument(
        "--reports", required=True, help="NLMCXR_reports.tgz or its extracted folder"
    )
    prepare.add_argument(
        "--images", required=True, help="folder of OpenI PNGs (CXR1_1_IM-0001-3001.png)"
    )
    prepare.add_argument("--out", required=True, help="annotation.json to write")
    prepare.add_argument(
        "--allow-no-findings", action="store_true", help="keep studies with IMPRESSION only"
    )
    prepare.set_defaults(func=prepare_command)

    train = sub.add_parser("train", help="train a static, prompt-wise or promptbook-wise model")
    train.add_argument("--preset", default="demo-cpu", choices=sorted(TRAIN_PRESETS))
    train.add_argument("--mode", default=None, choices=CUSTOMIZER_MODES)
    train.add_argument("--config", help="a TrainConfig JSON file instead of a preset")
    train.add_argument("--annotation", help="R2Gen-style annotation.json")
    train.add_argument("--images", help="image root the annotation's paths are relative to")
    train.add_argument("--out", help="output directory (checkpoints, log.jsonl)")
    train.add_argument(
        "--language-reports", help="OpenI NLMCXR_reports.tgz for the report-language stage"
    )
    train.add_argument(
        "--hold-out",
        action="append",
        metavar="ANNOTATION",
        help="another annotation.json whose validation and test reports the language stage "
        "must not see (e.g. IU X-ray's when training on other images); repeatable",
    )
    train.add_argument("--resume", action="store_true", help="continue from <out>/last")
    train.add_argument(
        "--push-to-hub",
        metavar="ORG/NAME",
        help="upload the best checkpoint with a Hub model card when training ends",
    )
    train.add_argument(
        "--mixed-precision",
        choices=["no", "bf16", "fp16"],
        help="autocast the trainable parts and the frozen LLM's compute (GPU: bf16)",
    )
    train.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute the frozen LLM's activations in backward (7B on one GPU)",
    )
    train.add_argument(
        "--set", action="append", metavar="FIELD=VALUE", help="override, e.g. generate.epochs=3"
    )
    train.set_defaults(func=train_command)

    generate = sub.add_parser(
        "generate", help="generate a report for an image (PNG/JPEG/DICOM), a folder or a split"
    )
    generate.add_argument("inputs", nargs="*", help="FRONTAL [LATERAL], or a folder of images")
    generate.add_argument("--mode", default="prompt-wise", choices=CUSTOMIZER_MODES)
    generate.add_argument(
        "--checkpoints",
        help="folder or Hub repo id with prompt-wise/ and promptbook-wise/ "
        "(default: assets/checkpoints)",
    )
    generate.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    generate.add_argument(
        "--quantization",
        choices=("auto", *QUANTIZATIONS),
        default="auto",
        help="the LLM's weights: int8-wo / int4-wo (weight-only, PyTorch's CPU kernels), nf4 / "
        "int8 (bitsandbytes, GPU), none; auto: on a CPU the fastest setting measured once per "
        "machine (see mrg info), elsewhere the checkpoint's",
    )
    generate.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="the LLM's dtype (auto: what the quantization needs, else bfloat16 where a report "
        "is measurably faster in it on this CPU)",
    )
    generate.add_argument("--json", action="store_true", help="print the final report as JSON")
    generate.add_argument("--annotation", help="annotation.json: generate for a whole split")
    generate.add_argument("--images", help="image root of --annotation")
    generate.add_argument("--split", default="test")
    generate.add_argument(
        "--out", help="CSV or JSONL for folders and splits (rerun skips studies already written)"
    )
    generate.add_argument("--batch-size", type=int, default=8)
    generate.add_argument(
        "--findings",
        type=findings_flag,
        default=None,
        metavar="STATES",
        help="write the report as if the image showed these ChestX-ray14 findings "
        "(comma-separated, each present or NAME=possible|absent, e.g. "
        '"Effusion=possible,Cardiomegaly"; "none" for a normal study) instead of the head\'s',
    )
    generate.add_argument(
        "--allow-any-modality",
        action="store_true",
        help="write a report even where the chest-radiograph gate refuses the image (CT, MR, "
        "a photograph, a rotated film…); the report then carries the gate's warning",
    )
    add_decoding_flags(generate, DEFAULT_DECODING)
    generate.set_defaults(func=generate_command)

    evaluate = sub.add_parser("evaluate", help="score one or more checkpoints on a split")
    evaluate.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="a checkpoint folder or Hub repo id; repeat to compare several",
    )
    evaluate.add_argument("--annotation", required=True)
    evaluate.add_argument("--images", required=True)
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--out", default="runs/eval")
    evaluate.add_argument(
        "--findings-head",
        help="the findings head a findings-conditioned checkpoint writes from "
        "(default: findings/ beside the checkpoint, else the shipped one)",
    )
    evaluate.add_argument("--limit", type=int, default=0, help="only the first N studies")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--no-meteor", action="store_true")
    add_decoding_flags(evaluate, R2GENGPT_DECODING)
    evaluate.set_defaults(func=evaluate_command)

    demo = sub.add_parser("demo", help="start the web demo (same flags as app.py)", add_help=False)
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    demo.set_defaults(func=demo_command)

    shared = setting("MRG_SHARED_DATA")
    labeler = sub.add_parser(
        "labeler-eval", help="score the report labeler on the OpenI gold standard"
    )
    labeler.add_argument("--gold", default=f"{shared}/openi_labels/openi_gold14_dev.csv")
    labeler.add_argument("--reports", default=f"{shared}/iu_xray/NLMCXR_reports.tgz")
    labeler.set_defaults(func=labeler_eval_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # the demo parses its own flags (argparse.REMAINDER cannot pass --help on)
    if argv[:1] == ["demo"]:
        return demo_command(argparse.Namespace(demo_args=argv[1:]))
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    import torch

    torch.set_num_threads(int(setting("MRG_NUM_THREADS")))
    try:
        return args.func(args)
    except ConfigError as err:
        console.print(f"[red]configuration error:[/red] {err}")
        return 2
