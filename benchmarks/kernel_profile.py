"""Where a compiled program's device time goes, read from a JAX profiler trace.

``summarise`` reads the Chrome-trace JSON that ``jax.profiler.trace(log_dir)`` writes beside its
xplane (``latest_trace``: ``plugins/profile/*/*.trace.json.gz``).
The result is device time per call in five categories, the device's idle gaps, and the longest
ops.

Which events are read:
- **Device events:** those of processes named ``/device:...`` (``/device:GPU:0``). The host's
  CPU backend has none: its XLA ops run inside host threads, so a CPU trace gives ``None``.
- **Thread choice:** where the device has an ``XLA Ops`` thread (one event per HLO op), only
  that thread is read. Otherwise its stream threads are read, one event per kernel.

The categories, matched in this order on the event's name, its ``hlo_op`` arg and the HLO
instruction's own name and attributes in its ``long_name`` arg (``own_text``; not its operands):
- ``attention``: fused attention kernels (cuDNN's flash / SDPA kernels, fmha);
- ``matmul``: matrix products (cuBLAS / cuBLASLt kernels such as ``nvjet_*`` and
  ``sm90_xmma_gemm_*``, CUTLASS, XLA's Triton GEMM fusions);
- ``collective``: NCCL and XLA collectives;
- ``copy``: memcpy, memset, copies and transposes;
- ``other``: XLA's own fusions (elementwise work and reductions).

The kernel names are those of CUDA 13 / jax 0.11 on an H100, as far as they are known. Any
name the patterns miss lands in ``other``, and the ``top`` list shows it by name.
"""

import collections
import gzip
import json
import pathlib
import re

CATEGORIES = (
    ("attention", re.compile(r"fmha|flash|sdpa|dot_product_attention", re.I)),
    ("matmul", re.compile(r"gemm|cublas|matmul|nvjet|xmma|gmma|cutlass|\bdot\b|dot_general", re.I)),
    ("collective", re.compile(r"nccl|all-reduce|all_reduce|all-gather|all_gather|reduce-scatter|reduce_scatter|all-to-all|collective-permute", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|transpose", re.I)),
)
OTHER = "other"
SKIPPED_THREADS = re.compile(r"XLA Modules|Steps|Framework|Source|TraceMe|Launch Stats", re.I)


def category(text: str) -> str:
    """The category of one event's text (name and op args), the first pattern that matches."""
    return next((name for name, pattern in CATEGORIES if pattern.search(text)), OTHER)


def own_text(event: dict) -> str:
    """The text that names what one event runs: its name, its ``hlo_op`` arg and, from its
    ``long_name`` (the HLO instruction), the instruction's own name and its ``kind``, ``calls``
    and ``custom_call_target`` attributes. Not the operand list: an elementwise fusion that reads
    a GEMM's output names that GEMM among its operands, and is not a matrix product."""
    args = event.get("args", {})
    long_name = str(args.get("long_name", ""))
    attributes = re.findall(r"\b(?:kind|calls|custom_call_target)=(\"[^\"]*\"|[%\w.$-]+)", long_name)
    return " ".join([event["name"], str(args.get("hlo_op", "")), long_name.split(" = ", 1)[0], *attributes])


def latest_trace(log_dir: str | pathlib.Path) -> pathlib.Path:
    """The trace JSON of the last ``jax.profiler.trace(log_dir)``."""
    runs = sorted((pathlib.Path(log_dir) / "plugins" / "profile").iterdir(), key=lambda p: p.stat().st_mtime)
    [trace] = list(runs[-1].glob("*.trace.json.gz"))
    return trace


def device_events(trace: dict) -> list[dict]:
    """The complete (``ph == "X"``) events of the device processes: their ``XLA Ops`` thread where
    there is one, else every thread but the derived ones (modules, steps, source)."""
    meta = [e for e in trace["traceEvents"] if e.get("ph") == "M"]
    devices = {e["pid"] for e in meta if e.get("name") == "process_name" and str(e["args"].get("name", "")).startswith("/device:")}
    threads = {(e["pid"], e["tid"]): str(e["args"].get("name", "")) for e in meta if e.get("name") == "thread_name"}
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("pid") in devices and "dur" in e]
    thread_of = lambda e: threads.get((e["pid"], e.get("tid")), "")  # noqa: E731
    ops = [e for e in events if thread_of(e) == "XLA Ops"]
    return ops or [e for e in events if not SKIPPED_THREADS.search(thread_of(e))]


def busy_microseconds(events: list[dict]) -> float:
    """Length of the union of the events' intervals (streams may overlap)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def summarise(trace_path: str | pathlib.Path, calls: int, top: int = 12) -> dict | None:
    """Device milliseconds per call: by category, busy in all, the span from the first event to the
    last, and the ``top`` longest ops by name; None when the trace holds no device events."""
    with gzip.open(trace_path, "rt") as f:
        events = device_events(json.load(f))
    if not events:
        return None
    by_category, by_name, counts = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        by_category[category(own_text(e))] += e["dur"]
        by_name[e["name"]] += e["dur"]
        counts[e["name"]] += 1
    ms = lambda us: us / 1e3 / calls  # noqa: E731
    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    return {
        "category_ms": {name: ms(by_category[name]) for name in [*(n for n, _ in CATEGORIES), OTHER]},
        "busy_ms": ms(busy_microseconds(events)),
        "span_ms": ms(span),
        "top": [[name, ms(us), counts[name] / calls] for name, us in by_name.most_common(top)],
    }


def table(summary: dict, flops_per_call: float | None = None) -> list[str]:
    """Markdown lines: the categories (with the matrix products' achieved TFLOP/s where the call's
    FLOPs are given), then the longest ops."""
    busy = summary["busy_ms"]
    lines = ["| kernels | ms per step | share of busy |", "|---|---|---|"]
    for name, value in summary["category_ms"].items():
        rate = ""
        if name == "matmul" and flops_per_call and value:
            rate = f" ({flops_per_call / (value * 1e-3) / 1e12:.0f} TFLOP/s if all FLOPs were products)"
        lines.append(f"| {name}{rate} | {value:.1f} | {100 * value / busy:.0f}% |")
    lines.append(f"| device busy (span {summary['span_ms']:.1f} ms) | {busy:.1f} | |")
    lines += ["", "| longest ops | ms per step | calls per step |", "|---|---|---|"]
    lines += [f"| `{name[:90]}` | {value:.2f} | {count:g} |" for name, value, count in summary["top"]]
    return lines
