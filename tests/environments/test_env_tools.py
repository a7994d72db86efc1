"""Calculator (sympy, whitelisted syntax, time-bounded) and sandboxed Python tool."""

import time

import pytest

from environments.calculator import CalcError, calculate, validate
from environments.tools import Calculator, PythonExec


@pytest.mark.parametrize("expr, expected", [
    ("2+3*4", "14"), ("2^10", "1024"), ("1/3 + 1/6", "1/2 = 0.500000000000000"),
    ("sqrt(16)", "4"), ("sin(pi/6)", "1/2 = 0.500000000000000"), ("factorial(5)", "120"),
    ("e^2", "7.38905609893065"), ("7 // 2", "3"), ("10 % 4", "2"),
])
def test_calculator_values(expr, expected):
    assert calculate(expr) == expected


@pytest.mark.parametrize("expr, needle", [
    ("__import__('os').system('id')", "unknown function"),
    ("().__class__.__bases__", "not allowed"),
    ("x + 1", "unknown name 'x'"),
    ("'a' * 3", "only numbers"),
    ("2**2**2**2**2", "nested exponents"),
    ("10**100000", "exponents are limited"),
    ("factorial(1000000)", "factorial is limited"),
    ("1" * 60, "digits"),
    ("3 * (4", "syntax error"),
    ("1/0", "undefined"),
    ("x" * 400, "longer than"),
])
def test_calculator_rejects(expr, needle):
    out = calculate(expr)
    assert out.startswith("error:") and needle in out


def test_calculator_time_limit():
    start = time.monotonic()
    out = calculate("factorial(5000) ** 9999", timeout_s=1.0)
    assert time.monotonic() - start < 8
    assert out.startswith("error:") or out  # either refused in time or answered: never hangs


def test_validate_converts_caret():
    assert validate("2^3") == "2**3"
    with pytest.raises(CalcError):
        validate("")


def test_tool_objects():
    assert Calculator()({"expression": "6*7"}) == "42"
    assert Calculator()({"input": "6*7"}) == "42"
    assert Calculator()({}).startswith("error")
    py = PythonExec()
    assert py({"code": "print(sum(range(10)))"}) == "45"
    out = py({"code": "raise ValueError('nope')"})
    assert "ValueError: nope" in out and "exit code 1" in out
    out = PythonExec(limits=PythonExec.limits.replace(wall_s=1.0))({"code": "while True: pass"})
    assert "timed out" in out
