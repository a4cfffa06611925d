"""Prompt rendering: one input row (a dict) -> the prompt text, or an error.

Contract
--------
- `PromptTemplate(task_cfg, max_seconds=2.0, max_chars=1_000_000)` compiles
  `task.prompt` (and `task.system`) once in Jinja's SandboxedEnvironment with
  StrictUndefined: a template cannot reach Python internals, and a column it
  names that the row lacks is an error.
- `render(row) -> (prompt, system, error)`: exactly one of prompt/error is
  None. Errors are per row and say what is wrong: a field the template uses
  is missing; an expression printed null or something that is not text (an
  int where text is expected: convert it explicitly with `| string`); the
  template raised; or the row passed a rendering limit. `labels` (classify)
  is available to the template as a list of {name, description}; `schema`
  (extract) as the task's JSON schema, indented JSON text.
- Limits, per row (prompt and system together): rendering stops after
  `max_seconds` (checked at every loop iteration, call, intercepted operator
  and output chunk, so loops that print nothing stop too) and after
  `max_chars` characters of output. No value a template stores (`set`) or
  passes to a call may hold more than `max_chars` characters or items, and
  `*`, `+` and `**` refuse such a result before computing it, so no value can
  grow past the limit step by step. One expression over values within it can
  still build a large value (a filter padding to a huge width) before the
  output check sees it.
- `fields()` names the row fields the template reads: the names Jinja finds
  undeclared, less those the template assigns (set, for, macro, with) before
  it first reads them, and Jinja's globals (range, namespace, ...).

It knows nothing of tokens, chat templates or length limits (the engine
stage applies those).
"""
from __future__ import annotations

import math
import time

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, meta, nodes, pass_context
from jinja2.sandbox import SandboxedEnvironment

from batchlm.pipelines.errors import ConfigError

# The render budget travels in the render context under a key no template can
# name (not an identifier), so a row column can neither read nor replace it.
_BUDGET = "render budget"
_TICK_FILTER = "_batchlm_tick"  # wrapped around every loop's iterable
_SIZED_FILTER = "_batchlm_sized"  # wrapped around every value a template stores


class _NotText(Exception):
    pass


class _LimitPassed(Exception):
    pass


def _finalize(value):
    # NOTE: every {{ expression }} must print text; numbers and None are
    # refused so a wrong-typed or null field never silently becomes "None".
    if isinstance(value, str):
        return value
    if value is None:
        raise _NotText("a template expression printed null")
    raise _NotText(f"a template expression printed a {type(value).__name__} ({str(value)[:40]!r}) "
                   "where text is expected; convert it with `| string` if that is intended")


class _Budget:
    """One row's rendering limits: a deadline and an output size."""

    def __init__(self, max_seconds: float, max_chars: int):
        self.max_seconds, self.max_chars = max_seconds, max_chars
        self.deadline = time.monotonic() + max_seconds
        self.chars = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _LimitPassed(f"rendering took longer than {self.max_seconds:g} s (the per-row limit)")

    def check(self, size: int, what: str) -> None:
        if size > self.max_chars:
            raise _LimitPassed(f"{what} over {self.max_chars} characters or items (the per-row limit)")

    def emit(self, chunk: str) -> None:
        self.chars += len(chunk)
        if self.chars > self.max_chars:
            raise _LimitPassed(f"the template rendered more than {self.max_chars} characters (the per-row limit)")
        self.tick()


_SIZED = (str, bytes, list, tuple, dict, set)


def _size(value) -> int:
    return len(value) if isinstance(value, _SIZED) else 0


def _result_size(operator: str, left, right) -> int:
    """Characters, items or digits `left <operator> right` would make; 0 if cheap to compute."""
    if operator == "*" and isinstance(left, _SIZED) and isinstance(right, int):
        return len(left) * right
    if operator == "*" and isinstance(right, _SIZED) and isinstance(left, int):
        return len(right) * left
    if operator == "+" and isinstance(left, _SIZED) and isinstance(right, _SIZED):
        return len(left) + len(right)
    if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
        return math.ceil(right * math.log10(abs(left)))
    return 0


class _LimitedEnvironment(SandboxedEnvironment):
    """The sandbox, with every call and size-making operator checked against the row's budget."""

    intercepted_binops = frozenset({"*", "+", "**"})

    def call_binop(self, context, operator, left, right):
        budget = context[_BUDGET]
        budget.tick()
        budget.check(_result_size(operator, left, right), f"`{operator}` would make a value")
        return super().call_binop(context, operator, left, right)

    def call(self, context, obj, /, *args, **kwargs):
        budget = context[_BUDGET]
        budget.tick()
        for value in (*args, *kwargs.values()):
            budget.check(_size(value), "a call was passed a value")
        return super().call(context, obj, *args, **kwargs)


@pass_context
def _ticking(context, iterable):
    budget = context[_BUDGET]
    for item in iterable:
        budget.tick()
        yield item


@pass_context
def _sized(context, value):
    context[_BUDGET].check(_size(value), "a `set` stored a value")
    return value


def _through(filter_name: str, node: nodes.Expr | None, lineno: int) -> nodes.Filter:
    return nodes.Filter(node, filter_name, [], [], None, None, lineno=lineno)


def _guard(ast: nodes.Template) -> nodes.Template:
    """Check the deadline at each loop iteration (a loop may print nothing) and
    the size of each value a `set` stores (a value may grow in a loop)."""
    for loop in list(ast.find_all(nodes.For)):
        loop.iter = _through(_TICK_FILTER, loop.iter, loop.lineno)
    for assign in list(ast.find_all(nodes.Assign)):
        assign.node = _through(_SIZED_FILTER, assign.node, assign.lineno)
    for block in list(ast.find_all(nodes.AssignBlock)):  # {% set x %}...{% endset %}
        block.filter = _through(_SIZED_FILTER, block.filter, block.lineno)
    return ast


# Statements whose children run in another order than their fields list them.
_EVAL_ORDER = {
    nodes.Assign: ("node", "target"),
    nodes.AssignBlock: ("body", "filter", "target"),
    nodes.For: ("iter", "target", "test", "body", "else_"),
    nodes.With: ("values", "targets", "body"),
}


def _first_uses(node: nodes.Node, first: dict[str, str]) -> None:
    """Record, per name, whether the template first reads ("load") or assigns it."""
    if isinstance(node, nodes.Name):
        first.setdefault(node.name, "load" if node.ctx == "load" else "store")
    elif isinstance(node, nodes.NSRef):  # `set ns.attr = ...` reads ns
        first.setdefault(node.name, "load")
    elif isinstance(node, nodes.Macro):
        first.setdefault(node.name, "store")
    for field in _EVAL_ORDER.get(type(node), node.fields):
        value = getattr(node, field, None)
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, nodes.Node):
                _first_uses(child, first)


def _row_fields(env: SandboxedEnvironment, ast: nodes.Template) -> set[str]:
    # NOTE: find_undeclared_variables lists every name that *may* come from
    # the context: one set only inside an if/for body and read after it, or a
    # loop variable read in the loop's else. Those are the template's own.
    first: dict[str, str] = {}
    _first_uses(ast, first)
    names = meta.find_undeclared_variables(ast)
    return {n for n in names if first.get(n) == "load"} - set(env.globals)


class PromptTemplate:
    def __init__(self, task_cfg, max_seconds: float = 2.0, max_chars: int = 1_000_000):
        env = _LimitedEnvironment(undefined=StrictUndefined, finalize=_finalize, keep_trailing_newline=False)
        env.filters.update({_TICK_FILTER: _ticking, _SIZED_FILTER: _sized})
        self._max_seconds, self._max_chars = max_seconds, max_chars
        # Names the template gets besides the row's columns (they shadow columns of the same name).
        self._given: dict = {"labels": [lb.model_dump() for lb in task_cfg.labels or []]}
        if task_cfg.type == "extract":
            from batchlm.pipelines.extract import prompt_text

            self._given["schema"] = prompt_text(task_cfg.json_schema)
        try:
            prompt = env.parse(task_cfg.prompt)
            system = env.parse(task_cfg.system) if task_cfg.system else None
            names = _row_fields(env, prompt) | (_row_fields(env, system) if system else set())
            self._prompt = env.from_string(_guard(prompt))
            self._system = env.from_string(_guard(system)) if system else None
        except TemplateSyntaxError as e:
            raise ConfigError(f"task.prompt/system: template syntax error on line {e.lineno}: {e.message}") from None
        self._fields = sorted(names - set(self._given))

    def fields(self) -> list[str]:
        return list(self._fields)

    def render(self, row: dict) -> tuple[str | None, str | None, str | None]:
        budget = _Budget(self._max_seconds, self._max_chars)
        ctx = {**row, **self._given, _BUDGET: budget}
        try:
            prompt = _generate(self._prompt, ctx, budget)
            system = _generate(self._system, ctx, budget) if self._system else None
        except _NotText as e:
            nulls = [n for n in self._fields if n in row and row[n] is None]
            return None, None, str(e) + (f" (null fields: {', '.join(nulls)})" if nulls else "")
        except UndefinedError as e:
            return None, None, f"field missing: {e}"
        except _LimitPassed as e:
            return None, None, f"template error: {e}"
        except Exception as e:  # a template error is the row's error, never the job's
            return None, None, f"template error: {type(e).__name__}: {e}"
        return prompt, system, None


def _generate(template, ctx: dict, budget: _Budget) -> str:
    parts = []
    for chunk in template.generate(ctx):
        budget.emit(chunk)
        parts.append(chunk)
    return "".join(parts)
