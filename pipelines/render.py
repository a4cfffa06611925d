"""Prompt rendering: one input row (a dict) -> the prompt text, or an error.

Contract
--------
- `PromptTemplate(task_cfg)` compiles `task.prompt` (and `task.system`) once in
  Jinja's SandboxedEnvironment with StrictUndefined: a template cannot reach
  Python internals, and a column it names that the row lacks is an error.
- `render(row) -> (prompt, system, error)`: exactly one of prompt/error is
  None. Errors are per row and say what is wrong: a field the template uses
  is missing; an expression printed null or something that is not text (an
  int where text is expected: convert it explicitly with `| string`); or the
  template raised. `labels` (classify) is available to the template as a list
  of {name, description}.
- `fields()` names the row fields the template reads.

It knows nothing of tokens, chat templates or length limits (the engine
stage applies those).
"""
from __future__ import annotations


class _NotText(Exception):
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


class PromptTemplate:
    def __init__(self, task_cfg):
        from jinja2 import StrictUndefined, TemplateSyntaxError, meta
        from jinja2.sandbox import SandboxedEnvironment

        from batchlm.pipelines.errors import ConfigError

        env = SandboxedEnvironment(undefined=StrictUndefined, finalize=_finalize, keep_trailing_newline=False)
        self._labels = [lb.model_dump() for lb in task_cfg.labels or []]
        try:
            self._prompt = env.from_string(task_cfg.prompt)
            self._system = env.from_string(task_cfg.system) if task_cfg.system else None
            names = meta.find_undeclared_variables(env.parse(task_cfg.prompt))
            if task_cfg.system:
                names |= meta.find_undeclared_variables(env.parse(task_cfg.system))
        except TemplateSyntaxError as e:
            raise ConfigError(f"task.prompt/system: template syntax error on line {e.lineno}: {e.message}") from None
        self._fields = sorted(names - {"labels"})

    def fields(self) -> list[str]:
        return list(self._fields)

    def render(self, row: dict) -> tuple[str | None, str | None, str | None]:
        from jinja2 import UndefinedError

        ctx = {**row, "labels": self._labels}
        try:
            prompt = self._prompt.render(ctx)
            system = self._system.render(ctx) if self._system else None
        except _NotText as e:
            nulls = [n for n in self._fields if n in row and row[n] is None]
            return None, None, str(e) + (f" (null fields: {', '.join(nulls)})" if nulls else "")
        except UndefinedError as e:
            return None, None, f"field missing: {e}"
        except Exception as e:  # a template error is the row's error, never the job's
            return None, None, f"template error: {type(e).__name__}: {e}"
        return prompt, system, None
