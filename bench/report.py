"""Print the results in bench/results/*.json as Markdown tables (for docs/benchmarks.md).

    python bench/report.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _md(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _machine(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    load = m.get("loadavg_at_start")
    load_end = doc.get("loadavg_at_end")
    return (f"{m['utc']}, {m['cpu_count']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
            f"load average {load[0]:.1f} at start / {load_end[0]:.1f} at end" if load and load_end else m["utc"])


def throughput(doc: dict[str, Any]) -> str:
    rows = [[lv["n"], lv["tokens"], lv["wall_s"], lv["tokens_per_s"], f"{lv['ratio_vs_baseline']:.2f}x" if lv.get("ratio_vs_baseline") else "-"] for lv in doc["levels"]]
    b = doc.get("baseline")
    if b:
        rows.append([f"baseline: transformers generate + snac, {len(b['requests'])} requests one after another", b["tokens"], b["wall_s"], b["tokens_per_s"], "1.00x"])
    return _md(["N", "output tokens", "wall s", "aggregate tokens/s", "vs baseline"], rows)


def latency(doc: dict[str, Any]) -> str:
    rows = []
    for lv in doc["levels"]:
        rows.append([
            lv["n"], lv["audio_s"]["mean"], lv["ttfa_s"]["p50"], lv["ttfa_s"]["max"], lv["total_s"]["p50"],
            f"{lv['ttfa_fraction']['max'] * 100:.1f}%", lv["rtf"]["p50"], lv["tokens_per_s"], "yes" if lv["meets_target"] else "**no**",
        ])
    return _md(["N", "audio s/request", "TTFA p50 s", "TTFA max s", "total p50 s", "TTFA / total (max)", "RTF p50", "aggregate tokens/s", "TTFA <= 10%"], rows)


def server(doc: dict[str, Any]) -> str:
    rows = [[lv["n"], lv["engine_wall_s"], lv["server_wall_s"], f"{lv['overhead'] * 100:+.1f}%", lv["engine_ttfa_p50_s"], lv["server_ttfa_p50_s"], "yes" if lv["meets_target"] else "**no**"] for lv in doc["levels"]]
    return _md(["N", "in-process wall s", "HTTP wall s", "overhead", "in-process TTFA p50 s", "HTTP TTFA p50 s", "<= 5%"], rows)


def main() -> int:
    formats = {"throughput": throughput, "latency": latency, "server_overhead": server}
    for path in sorted(RESULTS.glob("*.json")):
        doc = json.loads(path.read_text())
        fmt = formats.get(doc.get("bench", ""))
        if fmt is None or "dry_run" in path.name:
            continue
        print(f"## {path.stem}\n\n`{doc['command']}`  \n{_machine(doc)}\n")
        print(fmt(doc) + "\n")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
