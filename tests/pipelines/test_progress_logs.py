"""What a person sees while `batchlm run` works, through the real CLI with stderr to a file (as a
scheduled job logs): a first line within seconds, a progress line at least every 10 s with a
growing row count while ONE large unit is still being generated (nothing committed yet), and
only batchlm's own lines on a successful default run; `--verbose` brings Ray's lines back; a
failing stage is one error line naming the units."""
from __future__ import annotations

import io
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from batchlm.pipelines.progress import LiveCounts, Progress

from .helpers import CLI, cli, read_output, tiny_job, write_yaml
from .procs import kill_driver, start_driver

# batchlm's own stderr lines: notes, plain progress lines, the summary's frame and items
OWN = re.compile(r"^(batchlm run: |\[\d\d:\d\d:\d\d\] rows \d+/\d+ |={60}$|  \S)")
PROGRESS = re.compile(r"^\[\d\d:\d\d:\d\d\] rows (\d+)/(\d+) ")
RAY_MARKS = re.compile(r"\b(INFO|WARNING)\b|core_worker")


@dataclass(frozen=True)
class Seen:
    t: float  # seconds after the command started
    text: str
    shards: int  # committed shards in the output when the line was read


def _watch(args: list[str], log: Path, out: Path, timeout: float) -> tuple[int, list[Seen]]:
    """Runs the CLI with stdout and stderr to `log`; each new line with the time it appeared."""
    t0 = time.monotonic()
    proc = start_driver([*CLI, *args], None, log)
    seen: list[Seen] = []
    partial = ""
    try:
        with open(log, encoding="utf-8", errors="replace") as f:
            while True:
                done = proc.poll() is not None
                chunk = partial + f.read()
                *lines, partial = chunk.split("\n")
                now = time.monotonic() - t0
                shards = len(list(out.glob("part-*.parquet")))
                seen += [Seen(now, ln, shards) for ln in lines if ln.strip()]
                if done:
                    seen += [Seen(now, partial, shards)] if partial.strip() else []
                    return proc.returncode, seen
                assert now < timeout, "\n".join(s.text for s in seen[-30:])
                time.sleep(0.2)
    finally:
        if proc.poll() is None:
            kill_driver(proc)


def _env_line(seen: list[Seen]) -> str:
    return "\n".join(f"{s.t:6.1f}s [{s.shards}] {s.text}" for s in seen)


def test_first_line_live_progress_inside_one_unit_and_quiet_stderr(tmp_path, tiny_model):
    rows = 120
    out = tmp_path / "out"
    # ONE unit (rows_per_shard > rows) and ONE engine call (batch_size > rows); one sequence at a
    # time, each 400 tokens, so the unit takes about half a minute and rows finish all along it.
    # NOTE: at 200 tokens (under max_model_len 256, ~190) the unit took ~12 s once the native CPU
    # kernels came (~1900 output tok/s on a 2-core machine, 2026-11-27): too few 5-second progress
    # lines inside it.
    job = tiny_job(tiny_model, str(out), input={"limit": rows}, task={"prompt": "Summarize: {{ text[:40] }}"},
                   model={"max_num_seqs": 1, "max_model_len": 512},
                   sampling={"max_tokens": 400, "ignore_eos": True},
                   resources={"batch_size": 1000}, output={"rows_per_shard": 1000})
    rc, seen = _watch(["run", write_yaml(tmp_path / "job.yaml", job)], tmp_path / "run.log", out, timeout=400)
    log = _env_line(seen)
    assert rc == 0, log
    assert seen[0].t <= 10.0, log

    progress = [(s.t, int(m.group(1)), int(m.group(2)), s.shards)
                for s in seen if (m := PROGRESS.match(s.text))]
    assert progress and all(total == rows for _, _, total, _ in progress), log
    counts = [n for _, n, _, _ in progress]
    assert counts == sorted(counts) and counts[-1] == rows, log
    inside = sorted({n for _, n, _, shards in progress if 0 < n < rows and shards == 0})
    assert len(inside) >= 3, f"the row count must grow while the one unit is generated:\n{log}"
    end = next(s.t for s in seen if s.text.startswith("batchlm run: complete"))
    times = [t for t, *_ in progress] + [end]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) <= 10.0, f"a progress line at least every 10 s; gaps {gaps}\n{log}"

    stray = [s.text for s in seen if not OWN.match(s.text) or RAY_MARKS.search(s.text)]
    assert not stray, f"only batchlm's own lines on a successful default run:\n{log}"
    assert len(read_output(str(out))) == rows


def test_verbose_brings_back_rays_lines(tmp_path, tiny_model):
    out = tmp_path / "out"
    job = tiny_job(tiny_model, str(out), input={"limit": 8}, output={"rows_per_shard": 8})
    rc, seen = _watch(["run", write_yaml(tmp_path / "job.yaml", job), "--verbose"], tmp_path / "run.log", out,
                      timeout=300)
    log = _env_line(seen)
    assert rc == 0, log
    ray_lines = [s.text for s in seen if not OWN.match(s.text)]
    assert any(RAY_MARKS.search(ln) for ln in ray_lines), log
    assert any(s.text.startswith("batchlm run: complete") for s in seen), log


def test_rates_start_when_engines_are_up_and_live_rows_count_before_commit():
    stream = io.StringIO()
    p = Progress(100, done_rows=20, stream=stream, engines=2)  # a resumed run: 20 rows done before
    assert "starting: 0/2 engine(s) up" in p.line() and "ETA" not in p.line()
    p.live(LiveCounts(rows=30, errors=1, out_tok=300, engines_up=1))
    assert p.line().startswith("rows 50/100 (50%) | errors 1 | ") and "ETA" in p.line()
    p.update(10, 0, 100, 100)  # a committed unit whose rows the engines had already reported
    assert p.done == 50
    p.live(LiveCounts(rows=500, engines_up=2))  # an engine restarted by Ray reports its rows again
    assert p.done == 100
    p.tick(force=True)
    p.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and all(PROGRESS.match(ln) for ln in lines), lines
    p.tick(force=True)
    assert len(stream.getvalue().splitlines()) == 2, "nothing after close()"


def test_generate_reports_each_request_as_it_finishes(tiny_model):
    from batchlm import LLM, SamplingParams

    llm = LLM(tiny_model, max_model_len=256, kv_cache_memory=1 << 24, max_num_seqs=2)
    finished = []
    outs = llm.generate([[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]], SamplingParams(max_tokens=3, ignore_eos=True),
                        use_tqdm=False, on_finished=lambda o: finished.append((o.request_id, len(o.outputs[0].token_ids))))
    assert sorted(finished) == sorted((o.request_id, 3) for o in outs)


def test_a_failing_stage_is_one_error_line_naming_the_units(tmp_path, tiny_model):
    model = tmp_path / "model"  # config and tokenizer pass the driver's check; the engines find no weights
    shutil.copytree(tiny_model, model)
    for f in model.glob("*.safetensors"):
        f.unlink()
    out = tmp_path / "out"
    job = tiny_job(str(model), str(out), input={"limit": 20})  # two units of 10 rows
    p = cli("run", write_yaml(tmp_path / "job.yaml", job), timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "units 0, 1 not committed: FileNotFoundError: no *.safetensors" in errors[0], \
        p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    stray = [ln for ln in p.stderr.splitlines()
             if ln.strip() and not ln.startswith("error: ") and (not OWN.match(ln) or RAY_MARKS.search(ln))]
    assert not stray, p.stderr[-3000:]


def test_the_summary_reports_speculation(tmp_path, tiny_model):
    # n-gram speculation with 1-token lookups always finds something to propose in English text
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2}
    job = tiny_job(tiny_model, str(tmp_path / "out"), input={"limit": 8}, output={"rows_per_shard": 8},
                   model={"speculative_config": spec}, sampling={"max_tokens": 24, "ignore_eos": True})
    proc = cli("run", write_yaml(tmp_path / "job.yaml", job))
    assert proc.returncode == 0, proc.stderr
    line = next((ln for ln in proc.stderr.splitlines() if ln.startswith("  speculation")), None)
    assert line is not None, proc.stderr
    m = re.match(r"  speculation\s+(\d+) tokens proposed, (\d+) accepted \([\d.]+%\), "
                 r"mean acceptance length ([\d.]+) \(this run\)$", line)
    assert m, line
    proposed, accepted, mean = int(m[1]), int(m[2]), float(m[3])
    assert proposed > 0 and 0 <= accepted <= proposed and mean >= 1.0
