"""Service speed and memory in every setting of the frozen LLM on this CPU: one user, eight.

    python benchmarks/bench_service.py [--settings auto float32 bfloat16 int8-wo int4-wo]
                                       [--study IMAGE] [--tokens 120] [--repeats 3] [--users 8]

Each setting is measured in a fresh process (so that resident memory is its own): the service
loads as the app does (shipped checkpoints) and reads a real study (IU X-ray CXR2843 from
../shared/data, else the pydicom-data chest CR; or ``--study``). Greedy decoding with the
app's defaults (at most ``--tokens`` new tokens: the app's 120). Per setting and mode it
prints the median time to first token, tokens/s and whole report (from the study to the last token: gate, findings head, encoder,
context pass, decoding), Grad-CAM of the report, the resident memory after loading and
after the first report (the float weights are mapped from disk and read in by it), and
``--users`` concurrent requests through the batcher: their aggregate tokens/s, its ratio to
one user's, and whether every one got the lone report. ``auto`` is what the app loads by
default (``mrg.model.cpu_probe``). The CPU and its flags head the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mrg.config import DEFAULT_DECODING
from mrg.data.study import study_from_sources
from mrg.environment import setting
from mrg.model.cpu_probe import SETTINGS, machine_key
from mrg.service import ReportService

SHARED = Path(setting("MRG_SHARED_DATA"))


def load_study(path: str | None = None):
    """``path`` (an image), else IU X-ray CXR2843 (frontal + lateral), else a pydicom chest CR."""
    if path:
        return study_from_sources(Path(path)), Path(path).name
    root = SHARED / "iu_xray" / "images" / "CXR2843_IM-1254-1001"
    if root.exists():
        return study_from_sources(root / "1.png", root / "0.png"), "IU X-ray CXR2843"
    from pydicom.data import get_testdata_file

    return study_from_sources(get_testdata_file("RG1_UNCI.dcm")), "pydicom-data RG1_UNCI"


def resident_mib() -> float:
    """This process's resident memory now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_one(name: str, tokens: int, repeats: int, users: int, path: str | None) -> dict:
    """The figures of one setting, in this process."""
    quantization, dtype = SETTINGS.get(name, ("auto", "auto"))
    start = time.perf_counter()
    service = ReportService.load(quantization=quantization, dtype=dtype)
    loaded = {"load_s": time.perf_counter() - start, "rss_loaded_mib": resident_mib()}
    study, label = load_study(path)
    decoding = dataclasses.replace(DEFAULT_DECODING, max_new_tokens=tokens)
    modes = {}
    for mode in service.models:
        service.generate(study, mode, decoding)  # warm-up
        # safetensors maps the float weights: they become resident as a report reads them
        loaded.setdefault("rss_mib", resident_mib())
        runs = [service.generate(study, mode, decoding) for _ in range(repeats)]
        cam = []
        for _ in range(repeats):
            t = time.perf_counter()
            service.explain(study, mode, runs[-1].text)
            cam.append(time.perf_counter() - t)
        t = time.perf_counter()
        with ThreadPoolExecutor(users) as pool:
            together = list(
                pool.map(service.generate, [study] * users, [mode] * users, [decoding] * users)
            )
        wall = time.perf_counter() - t
        median = statistics.median
        rate = median(r.tokens_per_s or 0 for r in runs)
        aggregate = sum(r.tokens for r in together) / wall
        modes[mode] = {
            "ttft_s": median(r.ttft_s or 0 for r in runs),
            "tokens_per_s": rate,
            "tokens": runs[-1].tokens,
            "report_s": median(r.elapsed_s for r in runs),
            "gradcam_s": median(cam),
            "users_tokens_per_s": aggregate,
            "users_ratio": aggregate / (runs[-1].tokens / median(r.elapsed_s for r in runs)),
            "users_same": sum(r.text == runs[-1].text for r in together),
            "report": runs[-1].text,
        }
    return {
        "setting": f"{service.info.quantization}, {service.info.dtype}",
        "study": label,
        **loaded,
        "modes": modes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["auto", *SETTINGS])
    parser.add_argument("--tokens", type=int, default=DEFAULT_DECODING.max_new_tokens)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--study", help="an image to report on (default: IU X-ray CXR2843)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # measure this setting, print JSON
    args = parser.parse_args()
    torch.set_num_threads(int(setting("MRG_NUM_THREADS")))
    if args.one:
        figures = measure_one(args.one, args.tokens, args.repeats, args.users, args.study)
        print(json.dumps(figures))
        return
    results = {}
    for name in args.settings:
        command = [sys.executable, __file__, "--one", name, "--tokens", str(args.tokens)]
        command += ["--repeats", str(args.repeats), "--users", str(args.users)]
        command += ["--study", args.study] if args.study else []
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    first = next(iter(results.values()))
    table = Table(
        title=f"Service on {machine_key()}; {first['study']}; at most {args.tokens} tokens"
    )
    columns = [
        "setting",
        "mode",
        "RSS MiB: loaded → a report",
        "TTFT s",
        "tokens/s",
        "tokens",
        "report s",
    ]
    columns += ["Grad-CAM s", f"{args.users} users tokens/s", "× one", "= lone"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("setting", "mode") else "right")
    for name, result in results.items():
        for mode, r in result["modes"].items():
            table.add_row(
                f"{name} ({result['setting']})" if name == "auto" else name,
                mode,
                f"{result['rss_loaded_mib']:.0f} → {result['rss_mib']:.0f}",
                f"{r['ttft_s']:.2f}",
                f"{r['tokens_per_s']:.1f}",
                str(r["tokens"]),
                f"{r['report_s']:.2f}",
                f"{r['gradcam_s']:.2f}",
                f"{r['users_tokens_per_s']:.1f}",
                f"{r['users_ratio']:.1f}",
                f"{r['users_same']}/{args.users}",
            )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
