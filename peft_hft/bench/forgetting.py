"""The forgetting benchmark end to end: prepare, run (resumably), summarise, write the table and the plots; or, with
``Protocol.sweep``, the learn-forget frontier (``runner.run_sweep``, ``frontier``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .protocol import Protocol
from .report import summarise, write_outputs
from .runner import prepare, run_benchmark


def run(protocol: Protocol, output: Path, device: Optional[str] = None) -> dict[str, Path]:
    """Run ``protocol`` with results in ``output`` (finished runs there are reused); return the written files."""
    output = Path(output)
    bench = prepare(protocol, output, device)
    labels = {m.name: m.label for m in bench.methods}
    if protocol.sweep:
        from .frontier import summarise_sweep, write_sweep_outputs
        from .runner import run_sweep

        summary = summarise_sweep(run_sweep(bench), bench.task.name, labels)
        summary["protocol"] = protocol.to_dict()
        return write_sweep_outputs(summary, output)
    results = run_benchmark(bench)
    ratios = {m.name: m.ratio for m in bench.methods}
    summary = summarise(results, bench.task.name, labels, ratios)
    summary["protocol"] = protocol.to_dict()
    return write_outputs(summary, output)
