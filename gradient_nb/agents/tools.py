"""The tools an agent ships, as an MCP server (official SDK, ``MCPServer``): exact arithmetic, unit
conversion, and a search over local text documents.

- ``calculate`` parses the expression with ``ast`` and walks an allow-list of nodes (numbers, + - * /
  // % **, unary minus, parentheses); nothing is evaluated by Python. Arithmetic is exact on
  ``fractions.Fraction`` (so 0.1 + 0.2 is 0.3), exponents and operand sizes are bounded so an
  expression cannot eat the machine, and the answer is an integer when it is one.
- ``convert_units`` converts between units of one dimension through an SI factor table (temperatures
  through their affine maps).
- ``search_documents`` ranks the ``*.txt``/``*.md`` files under a folder by BM25 over their words.

A tool refuses bad input with ``ToolError("<Kind>: message")``; the kind travels to the caller, who
gets a typed exception (``gradient_nb.agents.mcp_mesh.ToolCallError``).
"""

from __future__ import annotations

import ast
import math
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

MAX_EXPRESSION = 500
MAX_EXPONENT = 64
MAX_DIGITS = 400

_BIN = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: Fraction(a // b), ast.Mod: lambda a, b: a % b}


def _big(x: Fraction) -> bool:
    return len(str(abs(x.numerator))) > MAX_DIGITS or len(str(x.denominator)) > MAX_DIGITS


def _walk(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _walk(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        if isinstance(node.value, float) and not math.isfinite(node.value):
            raise ToolError("InvalidExpression: numbers must be finite")
        return Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        v = _walk(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        a, b = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Pow):
            if b.denominator != 1 or abs(b) > MAX_EXPONENT:
                raise ToolError(f"InvalidExpression: exponents are integers of at most {MAX_EXPONENT}")
            if a == 0 and b < 0:
                raise ToolError("ZeroDivision: 0 to a negative power")
            out = a ** int(b)
        elif type(node.op) in _BIN:
            if b == 0 and isinstance(node.op, ast.Div | ast.FloorDiv | ast.Mod):
                raise ToolError("ZeroDivision: division by zero")
            out = _BIN[type(node.op)](a, b)
        else:
            raise ToolError(f"InvalidExpression: operator {type(node.op).__name__} is not allowed")
        if _big(out):
            raise ToolError("InvalidExpression: the result is too large")
        return out
    raise ToolError(f"InvalidExpression: {type(node).__name__} is not arithmetic")


def calculate_exact(expression: str) -> Fraction:
    """The exact value of an arithmetic expression (ToolError for anything else)."""
    if not isinstance(expression, str) or not expression.strip():
        raise ToolError("InvalidExpression: empty expression")
    if len(expression) > MAX_EXPRESSION:
        raise ToolError(f"InvalidExpression: longer than {MAX_EXPRESSION} characters")
    text = expression.replace("×", "*").replace("÷", "/").replace("^", "**").replace(",", "")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"InvalidExpression: {exc.msg}") from None
    return _walk(tree)


def format_number(x: Fraction) -> str:
    """An integer when exact, otherwise a decimal with up to 10 significant places."""
    if x.denominator == 1:
        return str(x.numerator)
    return f"{float(x):.10g}"


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly: numbers, + - * / // % ** and parentheses."""
    return format_number(calculate_exact(expression))


# Factor to the dimension's SI unit. Temperatures are affine and handled apart.
_UNITS: dict[str, tuple[str, float]] = {
    "m": ("length", 1.0), "km": ("length", 1000.0), "cm": ("length", 0.01), "mm": ("length", 0.001),
    "mi": ("length", 1609.344), "yd": ("length", 0.9144), "ft": ("length", 0.3048), "in": ("length", 0.0254),
    "kg": ("mass", 1.0), "g": ("mass", 0.001), "mg": ("mass", 1e-6), "lb": ("mass", 0.45359237),
    "oz": ("mass", 0.028349523125), "t": ("mass", 1000.0),
    "s": ("time", 1.0), "min": ("time", 60.0), "h": ("time", 3600.0), "day": ("time", 86400.0),
    "l": ("volume", 1.0), "ml": ("volume", 0.001), "gal": ("volume", 3.785411784), "m3": ("volume", 1000.0),
    "m/s": ("speed", 1.0), "km/h": ("speed", 1000 / 3600), "mph": ("speed", 1609.344 / 3600),
}
_ALIASES = {"meter": "m", "meters": "m", "metre": "m", "kilometer": "km", "kilometers": "km", "centimeter": "cm",
            "centimeters": "cm", "millimeter": "mm", "millimeters": "mm", "mile": "mi", "miles": "mi",
            "yard": "yd", "yards": "yd", "foot": "ft", "feet": "ft", "inch": "in", "inches": "in",
            "kilogram": "kg", "kilograms": "kg", "gram": "g", "grams": "g", "milligram": "mg", "pound": "lb",
            "pounds": "lb", "lbs": "lb", "ounce": "oz", "ounces": "oz", "tonne": "t", "tonnes": "t",
            "second": "s", "seconds": "s", "sec": "s", "minute": "min", "minutes": "min", "hour": "h",
            "hours": "h", "hr": "h", "days": "day", "liter": "l", "liters": "l", "litre": "l", "litres": "l",
            "milliliter": "ml", "milliliters": "ml", "gallon": "gal", "gallons": "gal", "kph": "km/h",
            "c": "celsius", "°c": "celsius", "f": "fahrenheit", "°f": "fahrenheit", "k": "kelvin"}
_TEMPS = {"celsius": (1.0, 273.15), "fahrenheit": (5 / 9, 273.15 - 32 * 5 / 9), "kelvin": (1.0, 0.0)}


def _unit(name: str) -> str:
    u = str(name).strip().lower()
    u = _ALIASES.get(u, u)
    if u not in _UNITS and u not in _TEMPS:
        raise ToolError(f"UnknownUnit: {name!r}")
    return u


def convert_units(value: float, from_unit: str, to_unit: str) -> float:
    """Convert value from one unit to another of the same dimension (length, mass, time, volume, speed,
    temperature), e.g. 5 km to mi."""
    a, b = _unit(from_unit), _unit(to_unit)
    if a in _TEMPS or b in _TEMPS:
        if not (a in _TEMPS and b in _TEMPS):
            raise ToolError(f"IncompatibleUnits: {from_unit} and {to_unit}")
        kelvin = value * _TEMPS[a][0] + _TEMPS[a][1]
        out = (kelvin - _TEMPS[b][1]) / _TEMPS[b][0]
    else:
        (da, fa), (db, fb) = _UNITS[a], _UNITS[b]
        if da != db:
            raise ToolError(f"IncompatibleUnits: {from_unit} is {da}, {to_unit} is {db}")
        out = value * fa / fb
    return float(f"{out:.10g}")


_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class DocumentIndex:
    """BM25 over the ``*.txt`` and ``*.md`` files of a folder (read once; ``reload()`` re-reads)."""

    def __init__(self, folder: str | Path, k1: float = 1.5, b: float = 0.75) -> None:
        self.folder, self.k1, self.b = Path(folder), k1, b
        self.reload()

    def reload(self) -> None:
        self.docs: list[tuple[str, str, Counter[str]]] = []
        if self.folder.is_dir():
            for p in sorted(self.folder.rglob("*")):
                if p.suffix in (".txt", ".md") and p.is_file():
                    text = p.read_text(errors="replace")
                    self.docs.append((str(p.relative_to(self.folder)), text, Counter(_words(text))))
        self.avg = sum(sum(c.values()) for _, _, c in self.docs) / max(1, len(self.docs))
        self.df: Counter[str] = Counter()
        for _, _, c in self.docs:
            self.df.update(c.keys())

    def search(self, query: str, k: int = 3) -> list[dict[str, object]]:
        n = len(self.docs)
        scored = []
        for name, text, counts in self.docs:
            length = sum(counts.values())
            score = 0.0
            for w in set(_words(query)):
                tf = counts.get(w, 0)
                if tf:
                    idf = math.log(1 + (n - self.df[w] + 0.5) / (self.df[w] + 0.5))
                    score += idf * tf * (self.k1 + 1) / (tf + self.k1 * (1 - self.b + self.b * length / self.avg))
            if score > 0:
                scored.append({"document": name, "score": round(score, 4), "snippet": text[:300]})
        scored.sort(key=lambda d: -float(d["score"]))  # type: ignore[arg-type]
        return scored[:max(1, min(int(k), 20))]


def builtin_tools(documents: str | Path | None = None) -> MCPServer:
    """The MCP server with this package's tools; ``documents`` is the folder ``search_documents`` reads."""
    srv = MCPServer("gradient-tools", instructions="Exact arithmetic, unit conversion and local document search.")
    srv.tool(name="calculate")(calculate)
    srv.tool(name="convert_units")(convert_units)
    if documents is not None:
        index = DocumentIndex(documents)

        def search_documents(query: str, k: int = 3) -> list[dict[str, object]]:
            """Search the local documents for the query words (BM25); returns the best k with snippets."""
            return index.search(query, k)

        srv.tool(name="search_documents")(search_documents)
    return srv


if __name__ == "__main__":  # a stdio MCP server: python -m gradient_nb.agents.tools [DOCUMENTS_FOLDER]
    import sys

    builtin_tools(sys.argv[1] if len(sys.argv) > 1 else None).run()
