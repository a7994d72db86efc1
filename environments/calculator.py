"""Calculator tool: arithmetic with sympy, no evaluation of arbitrary code, bounded in time.

``validate(expr)`` checks the expression's Python syntax tree against a whitelist (numbers, + - *
/ // % ** ^, parentheses, a few functions and constants) and size bounds, so only arithmetic
reaches sympy's parser. ``evaluate(expr)`` runs in a worker process with an alarm
(mispo.sandbox.workers), since sympy can spend unbounded time in C on huge numbers.
:func:`calculate` is the tool entry point: it returns a result or an error message, never raises.
"""

from __future__ import annotations

import ast

from mispo.sandbox import workers

MAX_LEN = 300
MAX_DIGITS = 50
MAX_EXPONENT = 10_000
FUNCTIONS = {"sqrt", "cbrt", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "tanh",
             "log", "ln", "exp", "abs", "floor", "ceil", "factorial", "binomial", "gcd", "lcm",
             "Rational", "root", "round", "min", "max"}
CONSTANTS = {"pi", "e", "E", "I", "oo", "inf"}
_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)


class CalcError(ValueError):
    """The expression is not allowed or cannot be evaluated; the message is shown to the model."""


def _const(node) -> float | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _const(node.operand)
        return None if inner is None else -inner
    return None


def _check(node) -> None:
    if isinstance(node, ast.Expression):
        return _check(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise CalcError(f"only numbers are allowed, not {node.value!r}")
        if len(str(node.value)) > MAX_DIGITS:
            raise CalcError(f"numbers are limited to {MAX_DIGITS} digits")
        return None
    if isinstance(node, ast.Name):
        if node.id not in CONSTANTS and node.id not in FUNCTIONS:
            raise CalcError(f"unknown name {node.id!r}; allowed: "
                            f"{', '.join(sorted(CONSTANTS | FUNCTIONS))}")
        return None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        return _check(node.operand)
    if isinstance(node, ast.BinOp) and isinstance(node.op, _BINOPS):
        if isinstance(node.op, ast.Pow):
            exp = _const(node.right)
            if any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow) for n in ast.walk(node.right)):
                raise CalcError("nested exponents (a^b^c) are not allowed")
            if exp is not None and abs(exp) > MAX_EXPONENT:
                raise CalcError(f"exponents are limited to {MAX_EXPONENT}")
        _check(node.left)
        return _check(node.right)
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            raise CalcError(f"unknown function; allowed: {', '.join(sorted(FUNCTIONS))}")
        if node.keywords or len(node.args) > 3:
            raise CalcError("functions take at most 3 positional arguments")
        if node.func.id == "factorial" and (c := _const(node.args[0]) if node.args else None) \
                and c > 5000:
            raise CalcError("factorial is limited to 5000")
        for arg in node.args:
            _check(arg)
        return None
    raise CalcError(f"'{type(node).__name__}' is not allowed in a calculator expression")


def validate(expr: str) -> str:
    """Return the expression in Python syntax (``^`` as ``**``) or raise CalcError."""
    if not isinstance(expr, str) or not expr.strip():
        raise CalcError("empty expression")
    if len(expr) > MAX_LEN:
        raise CalcError(f"expression longer than {MAX_LEN} characters")
    text = expr.strip().replace("^", "**").replace("×", "*").replace("÷", "/")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise CalcError(f"syntax error: {exc.msg}") from None
    _check(tree)
    return text


def evaluate(expr: str) -> str:
    """Evaluate a validated expression with sympy (call through the worker pool)."""
    import sympy
    from sympy.parsing.sympy_parser import parse_expr, standard_transformations

    names = {"sqrt": sympy.sqrt, "cbrt": sympy.cbrt, "sin": sympy.sin, "cos": sympy.cos,
             "tan": sympy.tan, "asin": sympy.asin, "acos": sympy.acos, "atan": sympy.atan,
             "sinh": sympy.sinh, "cosh": sympy.cosh, "tanh": sympy.tanh, "log": sympy.log,
             "ln": sympy.log, "exp": sympy.exp, "abs": sympy.Abs, "floor": sympy.floor,
             "ceil": sympy.ceiling, "factorial": sympy.factorial, "binomial": sympy.binomial,
             "gcd": sympy.gcd, "lcm": sympy.lcm, "Rational": sympy.Rational, "root": sympy.root,
             "round": lambda x, n=0: sympy.Float(round(float(x), int(n))), "min": sympy.Min,
             "max": sympy.Max, "pi": sympy.pi, "e": sympy.E, "E": sympy.E, "I": sympy.I,
             "oo": sympy.oo, "inf": sympy.oo}
    glob = {"__builtins__": {}, "Integer": sympy.Integer, "Float": sympy.Float,
            "Rational": sympy.Rational, "Symbol": sympy.Symbol}
    value = parse_expr(validate(expr), local_dict=names, global_dict=glob,
                       transformations=standard_transformations)
    if value.has(sympy.zoo, sympy.nan):
        raise CalcError("undefined result (division by zero or similar)")
    if getattr(value, "free_symbols", None):
        raise CalcError("the expression has unknown symbols")
    if value.is_Integer:
        return str(value)
    if value.is_Rational:
        return f"{value} = {sympy.N(value, 15)}"
    approx = sympy.N(value, 15)
    return str(approx)[:1000]


def calculate(expression: str, *, timeout_s: float = 2.0) -> str:
    """Tool entry point: the value of ``expression`` or ``error: ...``."""
    try:
        validate(expression)
        return workers.call("environments.calculator:evaluate", expression, alarm_s=timeout_s,
                            deadline_s=timeout_s + 3.0)
    except CalcError as exc:
        return f"error: {exc}"
    except workers.WorkerTimeout:
        return f"error: the calculation took longer than {timeout_s:g}s"
    except workers.WorkerError as exc:
        return f"error: {str(exc).split(': ', 1)[-1][:300]}"
