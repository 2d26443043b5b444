"""A bounded load test of the running app: N users at once, each uploading the same DICOM.

    python benchmarks/bench_load.py [--users 1 4 8 16] [--tokens 120] [--checkpoints DIR]

Starts ``python app.py`` on 127.0.0.1 (the shipped checkpoints unless ``--checkpoints``), then
for each N starts N ``gradio_client`` users at the same moment. Each uploads the same file
(Gradio stores identical uploads at one path: the upload race), loads it, and streams a
greedy report. Checked: every user's study loads and every report is complete and equal to
what one user alone gets (none lost, none mixed up). Printed: p50/p95 time to first token and
to the full report, the aggregate tokens/s and its ratio to one user's, and the last user's
time over one user's. The service decodes concurrent reports in one batch (``mrg.batching``);
the targets for 8 users (aggregate ≥ 1.3× one user's, goal 1.5×; the last report done before
eight serial reports would be) are checked at the end. On 2 cores the bound is near 1.5–1.7×:
each report's context pass is compute-bound, and only decoding shares.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from pydicom.data import get_testdata_file
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mrg.ui.generation import GENERATED
from mrg.ui.viewer import LOADED

DICOM = get_testdata_file("RG1_UNCI.dcm")
# What gradio_client receives: no session state, no layout column.
CLIENT_LOADED = LOADED[1:]
CLIENT_GENERATED = [name for name in GENERATED if name not in ("report_b", "state")]


def start_app(checkpoints: str | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, str(ROOT / "app.py"), "--port", str(port)]
    command += ["--checkpoints", checkpoints] if checkpoints else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return process, url
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit("the app did not start in 180 s")


def user(url: str, tokens: int, barrier: threading.Barrier, results: list, index: int) -> None:
    """One browser session: upload, load, stream a report; timings from the shared start."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    barrier.wait()
    start = time.perf_counter()
    loaded = dict(
        zip(CLIENT_LOADED, client.predict(handle_file(DICOM), None, api_name="/load_upload"))
    )
    status = loaded["load_status"]
    row = {"loaded": "Could not load" not in status, "message": status}
    first = None
    decoding = ("greedy", tokens, 1.05, 0.7, 0.9, False, "load-test")
    job = client.submit("prompt-wise", *decoding, api_name="/generate")
    for output in job:
        if first is None and dict(zip(CLIENT_GENERATED, output))["findings_a"]:
            first = time.perf_counter() - start
    final = dict(zip(CLIENT_GENERATED, job.outputs()[-1]))
    match = re.search(r"(\d+) tokens", final["stats"])
    row.update(
        ttft=first,
        total=time.perf_counter() - start,
        report=(final["findings_a"], final["impression_a"]),
        tokens=int(match.group(1)) if match else 0,
    )
    results[index] = row


def round_of(url: str, users: int, tokens: int) -> tuple[list[dict], float]:
    results: list = [None] * users
    barrier = threading.Barrier(users)
    threads = [
        threading.Thread(target=user, args=(url, tokens, barrier, results, i)) for i in range(users)
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", nargs="+", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=120)
    parser.add_argument("--checkpoints", default=None)
    args = parser.parse_args()
    console = Console(width=150)
    process, url = start_app(args.checkpoints)
    try:
        alone, _ = round_of(url, 1, args.tokens)  # warm-up: models loaded, the reference report
        reference = alone[0]["report"]
        table = Table(
            title=f"Load test on 127.0.0.1 (same DICOM for every user, {args.tokens} tokens max)"
        )
        for column in (
            "users", "loaded", "complete & equal", "TTFT p50", "TTFT p95",
            "report p50", "report p95", "last user (s)", "tokens/s (all)",
        ):  # fmt: skip
            table.add_column(column, justify="right")
        single_rate = single_time = None
        verdicts = []
        for users in args.users:
            results, wall = round_of(url, users, args.tokens)
            ttfts = [r["ttft"] for r in results if r and r["ttft"] is not None]
            totals = [r["total"] for r in results if r]
            rate = sum(r["tokens"] for r in results if r) / wall
            single_rate = single_rate or rate
            single_time = single_time or max(totals)
            if users == 8:
                serial = 8 * single_time
                verdicts += [
                    f"8 users: aggregate ×{rate / single_rate:.2f} one user's (target ≥ 1.3, "
                    "goal 1.5): " + ("met" if rate >= 1.3 * single_rate else "NOT met"),
                    f"8 users: the last report after {max(totals):.2f} s, eight serial reports "
                    f"{serial:.2f} s: " + ("met" if max(totals) < serial else "NOT met"),
                ]
            table.add_row(
                str(users),
                f"{sum(bool(r and r['loaded']) for r in results)}/{users}",
                f"{sum(bool(r and r['report'] == reference) for r in results)}/{users}",
                f"{statistics.median(ttfts):.2f}" if ttfts else "—",
                f"{percentile(ttfts, 0.95):.2f}" if ttfts else "—",
                f"{statistics.median(totals):.2f}",
                f"{percentile(totals, 0.95):.2f}",
                f"{max(totals):.2f} (×{max(totals) / single_time:.2f})",
                f"{rate:.1f} (×{rate / single_rate:.2f})",
            )
            failures = [r["message"] for r in results if r and not r["loaded"]]
            if failures:
                console.print(f"[red]{users} users: failed loads: {failures[:2]}[/red]")
        console.print(table)
        for line in verdicts:
            console.print(line)
    finally:
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    main()
