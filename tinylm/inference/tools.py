"""Safe tools a small model may call: pure functions of their JSON arguments, no I/O, no `eval`.

Each `Tool` has an OpenAI function definition (what the chat template shows the model) and a Python
function. `run_tool` executes one call and always returns text: a bad call (unknown tool, wrong
arguments, a division by zero) becomes an `error: ...` string the model reads in its next turn, as in
ReAct (Yao et al. 2023) and Toolformer (Schick et al. 2023), never an exception. Results are capped
(MAX_RESULT_CHARS): tool output is untrusted text and goes into the prompt.

The calculator parses arithmetic itself (recursive descent over + - * / // % ** and parentheses) with
bounds on the input length, exponents and magnitude, so no expression can run Python code or hang.
The same functions build the bundled tool-use dataset (scripts/build_tool_data.py) and run inside the
agent loop (agent.py) and agentic RL rollouts (agent_rl.py).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

MAX_RESULT_CHARS = 400
MAX_EXPR_CHARS = 200


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    fn: Callable[..., str]

    def spec(self) -> dict:
        """The OpenAI `tools` entry."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


class ToolError(ValueError):
    """A call the tool refuses (its message goes back to the model)."""


# ----------------------------------------------------------------------------- calculator

_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|(\*\*|//|[-+*/%()]))")


def _tokens(expr: str) -> list[str]:
    if len(expr) > MAX_EXPR_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPR_CHARS} characters")
    out, pos = [], 0
    expr = expr.replace("×", "*").replace("÷", "/").replace("^", "**").replace(",", "")
    while pos < len(expr):
        if expr[pos:].strip() == "":
            break
        m = _TOKEN.match(expr, pos)
        if not m:
            raise ToolError(f"unexpected character {expr[pos:].strip()[0]!r} in expression")
        out.append(m.group(1) or m.group(2))
        pos = m.end()
    return out


class _Parser:
    """expr := term (('+'|'-') term)*; term := unary (('*'|'/'|'//'|'%') unary)*;
    unary := ('-'|'+') unary | power; power := atom ('**' unary)?; atom := number | '(' expr ')'."""

    def __init__(self, tokens: list[str]) -> None:
        self.t, self.i = tokens, 0

    def peek(self) -> str | None:
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise ToolError("expression ends too early")
        self.i += 1
        return tok

    def expr(self) -> float:
        v = self.term()
        while self.peek() in ("+", "-"):
            v = v + self.term() if self.take() == "+" else v - self.term()
            _check(v)
        return v

    def term(self) -> float:
        v = self.unary()
        while self.peek() in ("*", "/", "//", "%"):
            op, w = self.take(), self.unary()
            if op != "*" and w == 0:
                raise ToolError("division by zero")
            v = v * w if op == "*" else v / w if op == "/" else v // w if op == "//" else v % w
            _check(v)
        return v

    def unary(self) -> float:
        if self.peek() in ("-", "+"):
            return -self.unary() if self.take() == "-" else self.unary()
        return self.power()

    def power(self) -> float:
        v = self.atom()
        if self.peek() == "**":
            self.take()
            e = self.unary()
            if abs(e) > 64 or (v == 0 and e < 0):
                raise ToolError("exponent out of range")
            v = v ** e
            if isinstance(v, complex):
                raise ToolError("result is not a real number")
            _check(v)
        return v

    def atom(self) -> float:
        tok = self.take()
        if tok == "(":
            v = self.expr()
            if self.take() != ")":
                raise ToolError("missing ')'")
            return v
        if tok[0].isdigit() or tok[0] == ".":
            return float(tok) if "." in tok else int(tok)
        raise ToolError(f"unexpected {tok!r}")


def _check(v: float) -> None:
    if isinstance(v, float) and not math.isfinite(v) or abs(v) > 1e18:
        raise ToolError("result out of range")


def format_number(v: float) -> str:
    """12.0 -> '12', 0.1 + 0.2 -> '0.3' (10 significant digits), ints unchanged."""
    if isinstance(v, int):
        return str(v)
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.10g}"


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression (numbers, + - * / // % ** ^, parentheses)."""
    p = _Parser(_tokens(str(expression)))
    if p.peek() is None:
        raise ToolError("empty expression")
    v = p.expr()
    if p.peek() is not None:
        raise ToolError(f"unexpected {p.peek()!r}")
    return format_number(v)


# ----------------------------------------------------------------------------- units, dates, lookup

# factor to the base unit of each dimension (metre, kilogram, second, litre)
UNITS = {
    "mm": ("length", 0.001), "cm": ("length", 0.01), "m": ("length", 1.0), "km": ("length", 1000.0),
    "inch": ("length", 0.0254), "ft": ("length", 0.3048), "mile": ("length", 1609.344),
    "g": ("mass", 0.001), "kg": ("mass", 1.0), "lb": ("mass", 0.45359237), "oz": ("mass", 0.028349523125),
    "s": ("time", 1.0), "min": ("time", 60.0), "h": ("time", 3600.0), "day": ("time", 86400.0),
    "ml": ("volume", 0.001), "l": ("volume", 1.0), "gallon": ("volume", 3.785411784),
}


def convert_units(value: float, from_unit: str, to_unit: str) -> str:
    """Convert between units of length, mass, time or volume; temperatures c/f/k too."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ToolError(f"value must be a number, got {value!r}") from None
    a, b = str(from_unit).lower(), str(to_unit).lower()
    temps = {"c", "f", "k"}
    if a in temps and b in temps:
        c = value if a == "c" else (value - 32) * 5 / 9 if a == "f" else value - 273.15
        out = c if b == "c" else c * 9 / 5 + 32 if b == "f" else c + 273.15
        return format_number(round(out, 6))
    if a not in UNITS or b not in UNITS:
        raise ToolError(f"unknown unit {a if a not in UNITS else b!r}; known: {', '.join(sorted(UNITS))}, c, f, k")
    if UNITS[a][0] != UNITS[b][0]:
        raise ToolError(f"cannot convert {UNITS[a][0]} ({a}) to {UNITS[b][0]} ({b})")
    return format_number(round(value * UNITS[a][1] / UNITS[b][1], 6))


def _date(s: object, field: str) -> dt.date:
    try:
        return dt.date.fromisoformat(str(s))
    except ValueError:
        raise ToolError(f"{field} must be a date YYYY-MM-DD, got {s!r}") from None


def date_diff(start: str, end: str) -> str:
    """Days from `start` to `end` (negative when end is earlier)."""
    return str((_date(end, "end") - _date(start, "start")).days)


def date_add(date: str, days: int) -> str:
    """The date `days` days after `date` (ISO format) and its weekday."""
    try:
        n = int(days)
    except (TypeError, ValueError):
        raise ToolError(f"days must be an integer, got {days!r}") from None
    if abs(n) > 100_000:
        raise ToolError("days out of range")
    d = _date(date, "date") + dt.timedelta(days=n)
    return f"{d.isoformat()} ({d.strftime('%A')})"


# A bundled table (values from the CIA World Factbook / UN 2023 rounded; the point is the lookup).
COUNTRIES = {
    "france": {"capital": "Paris", "population_millions": 68, "area_km2": 551695, "currency": "euro"},
    "japan": {"capital": "Tokyo", "population_millions": 125, "area_km2": 377975, "currency": "yen"},
    "brazil": {"capital": "Brasilia", "population_millions": 216, "area_km2": 8515767, "currency": "real"},
    "kenya": {"capital": "Nairobi", "population_millions": 55, "area_km2": 580367, "currency": "shilling"},
    "canada": {"capital": "Ottawa", "population_millions": 40, "area_km2": 9984670, "currency": "dollar"},
    "india": {"capital": "New Delhi", "population_millions": 1428, "area_km2": 3287263, "currency": "rupee"},
    "egypt": {"capital": "Cairo", "population_millions": 113, "area_km2": 1002450, "currency": "pound"},
    "norway": {"capital": "Oslo", "population_millions": 6, "area_km2": 385207, "currency": "krone"},
    "mexico": {"capital": "Mexico City", "population_millions": 128, "area_km2": 1964375, "currency": "peso"},
    "australia": {"capital": "Canberra", "population_millions": 27, "area_km2": 7692024, "currency": "dollar"},
    "germany": {"capital": "Berlin", "population_millions": 84, "area_km2": 357588, "currency": "euro"},
    "chile": {"capital": "Santiago", "population_millions": 20, "area_km2": 756102, "currency": "peso"},
    # Countries that no SFT row names: agentic RL prompts only (scripts/build_tool_data.py --rl-new).
    "italy": {"capital": "Rome", "population_millions": 59, "area_km2": 301340, "currency": "euro"},
    "spain": {"capital": "Madrid", "population_millions": 48, "area_km2": 505990, "currency": "euro"},
    "sweden": {"capital": "Stockholm", "population_millions": 10, "area_km2": 450295, "currency": "krona"},
    "peru": {"capital": "Lima", "population_millions": 34, "area_km2": 1285216, "currency": "sol"},
    "nigeria": {"capital": "Abuja", "population_millions": 224, "area_km2": 923768, "currency": "naira"},
    "vietnam": {"capital": "Hanoi", "population_millions": 99, "area_km2": 331210, "currency": "dong"},
    "argentina": {"capital": "Buenos Aires", "population_millions": 46, "area_km2": 2780400, "currency": "peso"},
    "thailand": {"capital": "Bangkok", "population_millions": 72, "area_km2": 513120, "currency": "baht"},
}


def lookup_country(country: str, field: str) -> str:
    """A field (capital, population_millions, area_km2, currency) of a country in the bundled table."""
    row = COUNTRIES.get(str(country).strip().lower())
    if row is None:
        raise ToolError(f"unknown country {country!r}")
    if field not in row:
        raise ToolError(f"unknown field {field!r}; fields: {', '.join(row)}")
    return str(row[field])


def _schema(**props: str) -> dict:
    types = {"number": {"type": "number"}, "integer": {"type": "integer"}, "string": {"type": "string"}}
    return {"type": "object", "properties": {k: types[v] for k, v in props.items()}, "required": list(props)}


TOOLS = {t.name: t for t in [
    Tool("calculator", "Evaluate an arithmetic expression.", _schema(expression="string"), calculate),
    Tool("convert_units", "Convert a value between units.", _schema(value="number", from_unit="string",
                                                                     to_unit="string"), convert_units),
    Tool("date_diff", "Days between two dates (YYYY-MM-DD).", _schema(start="string", end="string"), date_diff),
    Tool("date_add", "Add days to a date (YYYY-MM-DD).", _schema(date="string", days="integer"), date_add),
    Tool("lookup_country", "Look up a country's capital, population_millions, area_km2 or currency.",
         _schema(country="string", field="string"), lookup_country),
]}


def specs(names: list[str] | None = None) -> list[dict]:
    """OpenAI `tools` entries of the named tools (all bundled tools when None)."""
    names = list(TOOLS) if names is None else names
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        raise ValueError(f"unknown tool(s) {unknown}; available: {', '.join(TOOLS)}")
    return [TOOLS[n].spec() for n in names]


def run_tool(name: str, arguments: object, tools: dict[str, Tool] | None = None) -> str:
    """Execute one call; always returns text (an `error: ...` line for a bad call), at most MAX_RESULT_CHARS."""
    tools = TOOLS if tools is None else tools
    tool = tools.get(name)
    if tool is None:
        return f"error: unknown tool {name!r}; available: {', '.join(tools)}"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            return f"error: arguments are not valid JSON ({e.msg})"
    if not isinstance(arguments, dict):
        return "error: arguments must be a JSON object"
    want = set(tool.parameters.get("properties", {}))
    if set(arguments) - want or set(tool.parameters.get("required", [])) - set(arguments):
        return f"error: {name} takes arguments {sorted(want)}, got {sorted(arguments)}"
    try:
        out = tool.fn(**arguments)
    except (ToolError, ArithmeticError, TypeError, ValueError, RecursionError) as e:
        out = f"error: {e}"
    return out[:MAX_RESULT_CHARS]
