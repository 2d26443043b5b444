"""The reading-room page as a clinician uses it: upload a study, click Generate, read the report.

    python benchmarks/bench_page.py [--rounds 1] [--checkpoints DIR] [--json PATH] [--dicom F ...]

Starts ``python app.py`` on 127.0.0.1 (the shipped checkpoints unless ``--checkpoints``, as
``bench_load.py`` does) and drives it in headless Chromium (Playwright, 1440×900), one page
for the whole session. Per study: the file goes into the frontal upload, the page waits until
the study is shown and the findings head has read it (no event of the page pending), then the
Generate button is clicked. The timing is taken inside the page: a click listener records
``performance.now()`` at the click, and a requestAnimationFrame loop records the first frame
whose FINDINGS textbox holds text ("first words") and the first frame whose stats line says
"first token after" (the report is complete). Stale state cannot count: loading a study empties
the report and the stats line, and the watcher also needs the text (or the stats line) to
differ from what was there at the click. Also counted: how many frames showed a new FINDINGS
text or a new token count (page updates seen against tokens written), and the server's own
time to first token from the stats line, so that the page's share of the latency shows.

Ten studies, PNG and DICOM alternating: the PNGs under ``assets/examples/`` and the chest
DICOMs found (``--dicom`` files first, then any under ``assets/``, ``tests/`` and the shared
data, then the pydicom-data chest CRs); fewer than five DICOMs are reused. A study the app
refuses (not loadable, or the chest-radiograph gate says it is not a chest film) is skipped
with a note and the next candidate taken. One warm-up study (not counted) comes first;
``--rounds N`` repeats the ten. Printed: a table per study, p50 and p90 of both durations,
and the targets (click→first words ≤ 0.3 s, click→complete ≤ 1.2 s, judged on p90), with the
CPU model, its vector flags and the LLM quantization named in the page banner.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from bench_load import percentile, start_app

from mrg.model.cpu_probe import cpu_model_and_flags

CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1440, "height": 900}
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TARGETS = {"first": 0.3, "complete": 1.2}  # seconds, click→first words and click→complete
STUDIES = 10  # per round, PNG and DICOM alternating
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
PYDICOM_CHESTS = ("RG1_UNCI.dcm", "RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")
BEFORE_READING = "Load a study: the findings head's reading appears here."
STUDY_TIMEOUT_MS = 600_000
SEGMENTS = {
    "page": "page → service → page (request, queue, handler, stream back, drawing)",
    "ttft": "service: gate and findings from the upload, context pass, first words",
    "decoding": "service: decoding the rest",
    "tail": "last token → on screen",
}

# The text a Markdown/Textbox shows, without its status tracker's "processing | 0.4s".
TEXT_OF = """
window.__benchText = (id) => {
  const el = document.getElementById(id);
  if (!el) return "";
  const box = el.querySelector("textarea");
  if (box) return box.value;
  const md = el.querySelector('[data-testid="markdown"]') || el;
  return md.innerText.trim();
};
"""
# True once no event of the page has been pending (a status tracker shown) for `ms`.
IDLE = """(ms) => {
  const busy = document.querySelector('[data-testid="status-tracker"]:not(.hide)') !== null;
  const now = performance.now();
  if (busy) { window.__idleSince = null; return false; }
  if (window.__idleSince == null) window.__idleSince = now;
  return now - window.__idleSince >= ms;
}"""
# The upload's load event has answered: the status line says so and, on success, the previous
# report and its stats line are gone (a failed load leaves them and says "Could not load").
LOADED = """() => {
  const status = window.__benchText("load-status");
  return status !== "" && (status.includes("Could not load") ||
    (window.__benchText("findings") === "" && window.__benchText("stats") === ""));
}"""
# The watcher: performance.now() at the click on Generate, then a frame loop.
WATCH = r"""() => {
  const text = window.__benchText;
  if (window.__benchClick) document.removeEventListener("click", window.__benchClick, true);
  const w = window.__pageBench = {
    prevFindings: text("findings"), prevStats: text("stats"), clicked: null, first: null,
    complete: null, failed: null, findingsUpdates: 0, statsUpdates: 0, frames: 0,
    changed: false, statsChanged: false, lastFindings: text("findings"),
    lastStats: text("stats"), stats: "", findings: "", impression: "", firstText: "",
    timeline: [],  // [ms after the click, tokens the stats line says] per new stats line
  };
  window.__benchClick = (event) => {
    if (w.clicked === null && event.target.closest("#generate")) w.clicked = performance.now();
  };
  document.addEventListener("click", window.__benchClick, true);
  const tick = () => {
    if (w.clicked !== null) {
      const now = performance.now();
      const findings = text("findings"), stats = text("stats");
      w.frames += 1;
      if (stats !== w.prevStats) w.statsChanged = true;
      if (findings !== w.prevFindings || w.statsChanged) w.changed = true;
      if (findings !== w.lastFindings) { w.findingsUpdates += 1; w.lastFindings = findings; }
      if (stats !== w.lastStats) {
        w.statsUpdates += 1;
        w.lastStats = stats;
        const count = stats.match(/(\d+) tokens/);
        w.timeline.push([Math.round(now - w.clicked), count ? Number(count[1]) : null]);
      }
      if (w.first === null && w.changed && findings.trim() !== "") {
        w.first = now - w.clicked;
        w.firstText = findings;
      }
      if (w.statsChanged && stats.includes("first token after")) {
        w.complete = now - w.clicked;
      } else if (w.statsChanged && stats !== "" && !stats.startsWith("Generating")) {
        w.failed = stats;  // "No report: …", "Cannot generate …", a failure or a busy service
      }
      if (w.complete !== null || w.failed !== null) {
        w.stats = stats; w.findings = findings; w.impression = text("impression");
        return;
      }
    }
    requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
}"""
DONE = (
    "() => !!window.__pageBench && (__pageBench.complete !== null || __pageBench.failed !== null)"
)


@dataclass
class Study:
    path: Path
    kind: str  # PNG or DICOM

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class Result:
    study: str
    kind: str
    round: int
    first_s: float | None
    complete_s: float | None
    tokens: int | None
    server_ttft_s: float | None
    findings_updates: int
    stats_updates: int
    frames: int
    findings: str = ""
    impression: str = ""
    first_words: str = ""
    stats: str = ""
    timeline: list = field(default_factory=list)  # [ms after the click, tokens shown]


def cpu_info() -> tuple[str, list[str]]:
    """The CPU's model name and which of ``CPU_FLAGS`` it has."""
    model, flags = cpu_model_and_flags()
    return model or "unknown", [flag for flag in CPU_FLAGS if flag in flags]


def dicom_candidates(extra: list[str]) -> list[Path]:
    """Chest DICOMs to try, in order: given, under assets/ and tests/, shared data, pydicom-data."""
    found = [Path(p) for p in extra]
    for folder in (ROOT / "assets", ROOT / "tests"):
        found += sorted(folder.rglob("*.dcm"))
    shared = Path(os.environ.get("MRG_SHARED_DATA", ROOT / ".." / "shared" / "data"))
    if shared.is_dir():
        found += sorted(shared.rglob("*.dcm"))
    from pydicom.data import get_testdata_file

    for name in PYDICOM_CHESTS:  # by name, never downloaded (nor a get_testdata_files pattern)
        path = get_testdata_file(name, download=False)
        if path:
            found.append(Path(path))
    unique: dict[Path, Path] = {}
    for path in found:
        if path.is_file():
            unique.setdefault(path.resolve(), path)
    return list(unique.values())


def png_candidates() -> list[Path]:
    folder = ROOT / "assets" / "examples"
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


class ReadingRoom:
    """One browser page on the app, used for every study as a clinician would."""

    def __init__(self, browser, url: str):
        self.url = url
        self.page = browser.new_page(viewport=VIEWPORT)
        self.page.add_init_script(TEXT_OF)
        self.fresh = True  # no report on the page: a new page, or one reloaded
        self.open()

    def open(self) -> None:
        self.page.goto(self.url)
        self.page.wait_for_function(
            "() => window.__benchText('banner').includes('device:')", timeout=600_000
        )
        self.fresh = True

    @property
    def banner(self) -> str:
        return self.page.evaluate("() => window.__benchText('banner')")

    def text(self, elem_id: str) -> str:
        return self.page.evaluate("(id) => window.__benchText(id)", elem_id)

    def wait_idle(self, stable_ms: int = 500, timeout_ms: int = STUDY_TIMEOUT_MS) -> None:
        self.page.evaluate("() => { window.__idleSince = null; }")
        self.page.wait_for_function(IDLE, arg=stable_ms, timeout=timeout_ms)

    def load(self, study: Study) -> str | None:
        """Upload ``study`` and wait until it is shown and read; None, or why it was refused."""
        self.wait_idle()
        if not self.fresh and self.text("stats") == "":
            self.open()  # the last study ended without a report: start from a clean page
        clear = self.page.locator("#frontal-upload button[aria-label=Clear]")
        if clear.count():
            clear.first.click()
        self.page.locator("#frontal-upload input[type=file]").set_input_files(study.path)
        self.page.wait_for_function(LOADED, timeout=STUDY_TIMEOUT_MS)
        status = self.text("load-status")
        refused = status if "Could not load" in status else None
        if not refused:  # the findings head's reading (and the gate's verdict) follows the load
            self.page.wait_for_function(
                "(before) => window.__benchText('findings-note') !== before",
                arg=BEFORE_READING,
                timeout=STUDY_TIMEOUT_MS,
            )
            self.wait_idle()
            note = self.text("findings-note")
            refused = note if "Not a chest radiograph" in note else None
        if refused:
            self.open()
        return refused

    def generate(self) -> dict:
        """Click Generate; the in-page watcher's figures once the report is complete."""
        self.page.evaluate(WATCH)
        self.page.locator("#generate").click()
        self.page.wait_for_function(DONE, timeout=STUDY_TIMEOUT_MS)
        figures = self.page.evaluate("() => window.__pageBench")
        self.fresh = False
        if figures["failed"] is not None:
            self.open()
        else:
            self.wait_idle()  # the comparison, the consistency check and the review follow
        return figures


def measure(room: ReadingRoom, study: Study, round_: int) -> Result | str:
    """One study: a ``Result``, or the reason the app refused it."""
    refused = room.load(study)
    if refused:
        return refused
    figures = room.generate()
    if figures["failed"] is not None:
        return figures["failed"]
    stats = figures["stats"]
    tokens = re.search(r"(\d+) tokens, first token after", stats)
    ttft = re.search(r"first token after ([\d.]+) s", stats)
    return Result(
        study=study.name,
        kind=study.kind,
        round=round_,
        first_s=figures["first"] / 1000 if figures["first"] is not None else None,
        complete_s=figures["complete"] / 1000,
        tokens=int(tokens.group(1)) if tokens else None,
        server_ttft_s=float(ttft.group(1)) if ttft else None,
        findings_updates=figures["findingsUpdates"],
        stats_updates=figures["statsUpdates"],
        frames=figures["frames"],
        findings=figures["findings"],
        impression=figures["impression"],
        first_words=figures["firstText"],
        stats=stats,
        timeline=figures["timeline"],
    )


class Plan:
    """The studies of a round, PNG and DICOM alternating, refused candidates replaced."""

    def __init__(self, pngs: list[Path], dicoms: list[Path], console: Console):
        self.console = console
        self.queues = {"PNG": list(pngs), "DICOM": list(dicoms)}
        self.accepted: dict[str, list[Study]] = {"PNG": [], "DICOM": []}
        self.rounds: list[Study] = []  # the accepted studies of the first round, in order

    def warm_up(self) -> Study:
        if not (self.queues["PNG"] or self.queues["DICOM"]):
            raise SystemExit("no study the app accepts for the warm-up")
        queue = self.queues["PNG"] or self.queues["DICOM"]
        kind = "PNG" if self.queues["PNG"] else "DICOM"
        return Study(queue.pop(), kind)  # the last PNG: not one of the measured

    def has(self, kind: str) -> bool:
        return bool(self.queues[kind] or self.accepted[kind])

    def next(self, kind: str) -> Study | None:
        if self.queues[kind]:
            return Study(self.queues[kind].pop(0), kind)
        reused = self.accepted[kind]
        if not reused:
            return None
        used = sum(1 for s in self.rounds if s.kind == kind)
        return reused[used % len(reused)]  # fewer distinct files than slots: reuse them

    def accept(self, study: Study) -> None:
        if study not in self.accepted[study.kind]:
            self.accepted[study.kind].append(study)
        self.rounds.append(study)

    def refuse(self, study: Study, why: str) -> None:
        if study in self.accepted[study.kind]:
            self.accepted[study.kind].remove(study)
        self.console.print(f"[yellow]skipped {study.name} ({study.kind}): {why[:160]}[/yellow]")


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def breakdown(console: Console, results: list[Result]) -> None:
    """Where a report's time goes through the page (medians over the studies), from the page's
    two times and the service's own figures on the stats line (time to first token, tokens/s):

    page → service → page   click→first words − the service's time to first token (the click's
                            request, Gradio's queue, the handler, the stream back, drawing)
    service, first token    the gate and findings reused from the upload, the context pass,
                            the forced opening
    service, decoding       (tokens − 1) / the service's tokens/s
    last token → on screen  click→complete − click→first words − decoding
    """
    rows: dict[str, list[float]] = {k: [] for k in SEGMENTS}
    for r in results:
        rate = re.search(r"([\d.]+) tokens/s", r.stats)
        if None in (r.first_s, r.complete_s, r.server_ttft_s, r.tokens) or not rate:
            continue
        decoding = (r.tokens - 1) / float(rate.group(1))
        parts = (
            r.first_s - r.server_ttft_s,
            r.server_ttft_s,
            decoding,
            r.complete_s - r.first_s - decoding,
        )
        for key, value in zip(SEGMENTS, parts):
            rows[key].append(value)
    if not rows["page"]:
        return
    medians = {k: statistics.median(v) for k, v in rows.items()}
    total = sum(medians.values())
    table = Table(title="Where a report's time goes through the page (medians)")
    for column in ("segment", "s", "share"):
        table.add_column(column, justify="left" if column == "segment" else "right")
    for key, value in medians.items():
        table.add_row(SEGMENTS[key], f"{value:.3f}", f"{value / total:.0%}")
    console.print(table)


def report(console: Console, results: list[Result], banner: str, cpu: tuple[str, list[str]]):
    model, flags = cpu
    llm = re.search(r"LLM: (.*?) · device: ([^,]+), (\w+)", banner)
    quant = re.search(r"\((int8-wo|int4-wo|int8|nf4)\)", banner)
    console.print(f"CPU: {model}")
    console.print(
        "CPU flags: "
        + ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in CPU_FLAGS)
    )
    if llm:
        console.print(
            f"LLM: {llm.group(1)} · quantization: {quant.group(1) if quant else 'none'}"
            f" · device: {llm.group(2)}, {llm.group(3)}"
        )
    table = Table(title="Reading room in Chromium 1440×900: click on Generate → report on screen")
    for column, justify in (
        ("#", "right"), ("study", "left"), ("kind", "left"), ("click→first words (s)", "right"),
        ("click→complete (s)", "right"), ("tokens", "right"), ("server TTFT (s)", "right"),
        ("page updates (text / count)", "right"),
    ):  # fmt: skip
        table.add_column(column, justify=justify)
    for i, r in enumerate(results, 1):
        table.add_row(
            str(i) if r.round == 1 else f"{i} (r{r.round})",
            r.study,
            r.kind,
            fmt(r.first_s),
            fmt(r.complete_s),
            str(r.tokens) if r.tokens is not None else "—",
            fmt(r.server_ttft_s),
            f"{r.findings_updates} / {r.stats_updates}",
        )
    firsts = [r.first_s for r in results if r.first_s is not None]
    completes = [r.complete_s for r in results if r.complete_s is not None]
    table.add_section()
    for label, of in (("p50", statistics.median), ("p90", lambda v: percentile(v, 0.9))):
        table.add_row(
            "", label, "", fmt(of(firsts)) if firsts else "—",
            fmt(of(completes)) if completes else "—", "", "", "",
        )  # fmt: skip
    console.print(table)
    shown = sum(r.stats_updates for r in results)
    written = sum(r.tokens or 0 for r in results)
    gaps = [
        (b[0] - a[0]) / 1000
        for r in results
        for a, b in zip(r.timeline, r.timeline[1:])
        if a[1] is not None and b[1] is not None
    ]
    if written:
        console.print(
            f"page updates: {shown} new token counts drawn for {written} tokens written"
            + (f"; median {statistics.median(gaps):.2f} s between them" if gaps else "")
        )
    breakdown(console, results)
    verdicts = {}
    for key, label, values in (
        ("first", "click→first words", firsts),
        ("complete", "click→complete", completes),
    ):
        if not values:
            console.print(f"{label}: no measurement")
            continue
        p50, p90 = statistics.median(values), percentile(values, 0.9)
        met = p90 <= TARGETS[key] and len(values) == len(results)
        verdicts[key] = met
        console.print(
            f"{label}: p50 {p50:.2f} s, p90 {p90:.2f} s over {len(values)} studies "
            f"(target ≤ {TARGETS[key]} s at p90): " + ("met" if met else "NOT met")
        )
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default=None)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the per-study figures here")
    parser.add_argument("--dicom", nargs="*", default=[], help="more DICOMs to try first")
    args = parser.parse_args()
    console = Console(width=150)
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    cpu = cpu_info()
    plan = Plan(png_candidates(), dicom_candidates(args.dicom), console)
    console.print(
        f"candidates: {len(plan.queues['PNG'])} PNG, {len(plan.queues['DICOM'])} DICOM "
        f"({', '.join(p.name for p in plan.queues['DICOM'])})"
    )
    data_dir = tempfile.TemporaryDirectory(prefix="bench-page-")
    os.environ["MRG_DATA_DIR"] = data_dir.name  # the app's review database: not in the repo
    started = time.perf_counter()
    process, url = start_app(args.checkpoints)
    results: list[Result] = []
    banner = ""
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
            room = ReadingRoom(browser, url)
            banner = room.banner
            console.print(f"app up and models in after {time.perf_counter() - started:.0f} s")
            while True:  # the warm-up: models, caches, the page's first stream
                study = plan.warm_up()
                outcome = measure(room, study, 0)
                if isinstance(outcome, Result):
                    console.print(
                        f"warm-up {study.name}: first words {fmt(outcome.first_s)} s, "
                        f"complete {fmt(outcome.complete_s)} s (not counted)"
                    )
                    break
                plan.refuse(study, outcome)
            for round_ in range(1, args.rounds + 1):
                if round_ == 1:
                    kinds = ["PNG", "DICOM"] * (STUDIES // 2) + ["PNG"] * (STUDIES % 2)
                    while len(plan.rounds) < STUDIES and kinds:
                        kind = kinds[0]
                        study = plan.next(kind)
                        if study is None:  # no study of this kind left: the other kind
                            other = "DICOM" if kind == "PNG" else "PNG"
                            kinds = [other if k == kind else k for k in kinds]
                            if not plan.has(other):
                                raise SystemExit("no study the app accepts")
                            continue
                        outcome = measure(room, study, round_)
                        if isinstance(outcome, Result):
                            plan.accept(study)
                            kinds.pop(0)
                            results.append(outcome)
                            console.print(
                                f"{len(results):2d} {study.name} ({kind}): first words "
                                f"{fmt(outcome.first_s)} s, complete {fmt(outcome.complete_s)} s"
                                f", {outcome.tokens} tokens"
                            )
                        else:
                            plan.refuse(study, outcome)
                else:
                    for study in list(plan.rounds[:STUDIES]):
                        outcome = measure(room, study, round_)
                        if isinstance(outcome, Result):
                            results.append(outcome)
                        else:
                            console.print(
                                f"[red]round {round_}: {study.name} refused now: {outcome}[/red]"
                            )
            browser.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except Exception:  # noqa: BLE001
            process.kill()
        data_dir.cleanup()
    verdicts = report(console, results, banner, cpu)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "cpu": {"model": cpu[0], "flags": cpu[1]},
                    "banner": banner,
                    "targets_s": TARGETS,
                    "met": verdicts,
                    "rounds": args.rounds,
                    "results": [asdict(r) for r in results],
                },
                indent=1,
                ensure_ascii=False,
            )
        )
        console.print(f"per-study figures written to {args.json}")


if __name__ == "__main__":
    main()
