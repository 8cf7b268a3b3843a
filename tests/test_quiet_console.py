"""What a run prints is what it asked for: no Ray or diffusers warning or error line that the run
did not ask for. ``unasked_lines`` is the check; tests/test_wheel.py applies it to a whole demo
run (the smallest: 4 samples, 1 step), and this file pins what it catches with the lines a demo
printed before they were fixed (issue 22)."""
from __future__ import annotations

import re

UNASKED = [re.compile(p) for p in (
    r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [WEF] \d+ \d+\]",  # Ray's C++ log: warning, error, fatal
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING|ERROR|CRITICAL)\s",  # Ray's Python loggers
    r"\b\w+Warning\b",  # Python warnings (RayDeprecationWarning, FutureWarning, ...)
    r"\b\w+Error: ", r"^Traceback ",
    r"Token authentication is",  # Ray's notice on every local start
    r"should be kept in float32",  # diffusers' dtype notice
    r"\((raylet|pid=\d+)",  # worker output forwarded to the driver
)]


def unasked_lines(text: str) -> list[str]:
    """The lines of a run's output that no part of the run asked to print."""
    return [line for line in text.splitlines() if any(p.search(line) for p in UNASKED)]


BEFORE = """\
Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out. For more information, see https://docs.ray.io/en/latest/ray-security/token-auth.html
/work/wt/dag/pipeline/synthesis_pass.py:40: RayDeprecationWarning: `ray_remote_args` is deprecated and will be removed in Ray 2.64. Use the named remote parameters instead.
[2026-12-04 18:55:49,212 E 5658 5658] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches(Synthesizer))' and ID: 'f985d605a6939e61fe17e16101000000' has constructor arguments in the object store and max_restarts > 0.
2026-12-04 19:00:33,845\tINFO streaming_executor.py:215 -- Starting execution of Dataset dataset_0358zqVq1NYPFYpxUzwMbD_0.
There are modules in Matcher that should be kept in float32: []. Casting directly with `to()` can lead to inconsistent results
"""

DEMO = """\
amgen demo: 16 toy-town targets -> AM-Adapter (toy model, CPU) -> /tmp/dag/demo
amgen: planning on a worker: exemplar index, then read, augment, embed, retrieve
amgen: synthesizing 16 samples in 10 exemplar groups, 1 shard(s) on 1 actor(s) [cpu, 0 GPU each]
synthesize ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 16/16 0.4 img/s 0:00:38 0:00:00
quarantined          0
time                 index 12.4s, plan 9.7s, synthesize 38.3s, model 13.3s, model_cpu 2.9s, finish 0.8s, total 105.5s
verify               OK
Load it:  datasets.load_dataset("/tmp/dag/demo", split="train")
"""


def test_every_line_a_demo_printed_before_issue_22_is_caught_and_the_demo_itself_is_not():
    assert unasked_lines(BEFORE) == BEFORE.splitlines()
    assert unasked_lines(DEMO) == []
