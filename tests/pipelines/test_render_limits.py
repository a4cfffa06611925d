"""Prompt rendering: per-row time and size limits (a runaway template fails its
row, fast and in little memory, and the next row renders), and `fields()`
naming only the columns a template reads."""
from __future__ import annotations

import time
import tracemalloc

import pytest

from batchlm.pipelines.config import TaskConfig
from batchlm.pipelines.render import PromptTemplate

NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
COUNT_ITEMS = ("{% set ns = namespace(n=0) %}{% for x in items %}{% set ns.n = ns.n + 1 %}{% endfor %}"
               "{{ ns.n | string }}")


def _template(prompt: str, system: str | None = None, **limits) -> PromptTemplate:
    return PromptTemplate(TaskConfig(prompt=prompt, system=system), **limits)


def _render_measured(template: PromptTemplate, row: dict) -> tuple[tuple, float, int]:
    """render(row), the seconds it took and its peak of traced memory in bytes."""
    tracemalloc.start()
    start = time.monotonic()
    try:
        out = template.render(row)
        return out, time.monotonic() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_nested_loops_that_print_nothing_stop_at_the_default_deadline_and_the_job_goes_on():
    template = _template(NESTED_LOOPS + "{{ text }}")
    (prompt, system, err), seconds, _ = _render_measured(template, {"text": "a"})
    assert (prompt, system) == (None, None)
    assert err == "template error: rendering took longer than 2 s (the per-row limit)"
    assert 2 <= seconds < 10
    quick = _template("{% for i in range(3) %}{{ text }}{% endfor %}")
    assert quick.render({"text": "b"}) == ("bbb", None, None)


@pytest.mark.parametrize("prompt", [
    NESTED_LOOPS,
    # loops over a long string, not range: every loop iteration checks the deadline
    "{% set s = 'x' * 999999 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    # the time goes into calls, not loops: 2**40 calls of a macro
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
])
def test_a_row_past_its_deadline_fails_with_a_clear_error(prompt):
    (out, _, err), seconds, _ = _render_measured(_template(prompt, max_seconds=0.2), {})
    assert out is None and err == "template error: rendering took longer than 0.2 s (the per-row limit)"
    assert seconds < 5


@pytest.mark.parametrize("prompt,operator", [
    ("{{ 'x' * 1500000000 }}", "*"),
    ("{{ (1500000000 * [0]) | length | string }}", "*"),
    ("{{ (10 ** 1500000000) | string }}", "**"),
    ("{% set s = 'x' * 999999 %}{{ s + s }}", "+"),
])
def test_a_huge_value_is_refused_before_it_is_built(prompt, operator):
    (out, _, err), _, peak = _render_measured(_template(prompt), {})
    assert out is None
    assert err == (f"template error: `{operator}` would make a value over 1000000 characters or items "
                   "(the per-row limit)")
    assert peak < 20 << 20, peak


@pytest.mark.parametrize("prompt,what", [
    ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "a `set` stored a value"),
    ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s %}{{ ns.s }}{{ ns.s }}{% endset %}"
     "{% endfor %}", "a `set` stored a value"),
    ("{% set l = [1] %}{% for i in range(60) %}{{ l.extend(l) or '' }}{% endfor %}",
     "a call was passed a value"),
    ("{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}{{ f('x', 60) }}",
     "a call was passed a value"),
])
def test_a_value_cannot_double_its_way_past_the_limit(prompt, what):
    (out, _, err), seconds, peak = _render_measured(_template(prompt), {})
    assert out is None and err == f"template error: {what} over 1000000 characters or items (the per-row limit)"
    assert peak < 40 << 20 and seconds < 2, (peak, seconds)


def test_rendered_size_limit_counts_prompt_and_system_together():
    loop = "{% for i in range(100000) %}{{ 'abcdefghijk' }}{% endfor %}"
    (out, _, err), _, peak = _render_measured(_template(loop), {})
    assert out is None
    assert err == "template error: the template rendered more than 1000000 characters (the per-row limit)"
    assert peak < 20 << 20, peak
    exactly = _template("{{ text }}", system="{{ text }}", max_chars=100)
    assert exactly.render({"text": "x" * 50}) == ("x" * 50, "x" * 50, None)
    err = exactly.render({"text": "x" * 51})[2]
    assert err == "template error: the template rendered more than 100 characters (the per-row limit)"


@pytest.mark.parametrize("prompt", [
    COUNT_ITEMS,
    # ns set in both branches of an if: find_undeclared_variables names it (Jinja >= 3.1.5)
    COUNT_ITEMS.replace("{% set ns = namespace(n=0) %}", "{% if items %}{% set ns = namespace(n=0) %}"
                        "{% else %}{% set ns = namespace(n=0) %}{% endif %}"),
])
def test_a_template_that_counts_with_a_namespace_reads_only_its_input_columns(prompt):
    template = _template(prompt)
    assert template.fields() == ["items"]
    assert template.render({"items": ["a", "b", "c"]}) == ("3", None, None)


@pytest.mark.parametrize("prompt,fields", [
    # names set in every branch of an if (Jinja >= 3.1.5 reports them as undeclared)
    ("{% if flag %}{% set ns = namespace(n=1) %}{% else %}{% set ns = namespace(n=2) %}{% endif %}"
     "{{ ns.n | string }}", ["flag"]),
    # a name set inside a loop body and read after it; a loop variable read in the loop's else
    ("{% for x in items %}{% set last = x %}{% endfor %}{{ last }}", ["items"]),
    ("{% for x in items %}{{ x }}{% else %}{{ x }}{% endfor %}", ["items"]),
    # macros, their parameters, call blocks, with, set blocks, globals and loop
    ("{% macro m(a) %}{{ a }}{{ b }}{% endmacro %}{{ m(c) }}", ["b", "c"]),
    ("{% with y = text %}{{ y }}{% endwith %}{% set s %}{{ text }}{% endset %}{{ s }}", ["text"]),
    ("{% for i in range(3) %}{{ loop.index | string }}{{ lipsum(1) }}{% endfor %}", []),
    # a column the template reads before it assigns it stays a field
    ("{% set title = title or 'untitled' %}{{ title }}", ["title"]),
    ("{{ body }}{% set body = 'x' %}", ["body"]),
    ("{% set ns.n = 1 %}", ["ns"]),
    # labels is provided by the job, not a column
    ("{% for lb in labels %}{{ lb.name }}{% endfor %}{{ text }}", ["text"]),
])
def test_fields_are_the_names_a_template_reads_from_the_row(prompt, fields):
    assert _template(prompt).fields() == fields
