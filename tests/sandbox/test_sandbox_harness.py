"""A pass must be proven by the checker: exit codes, prints and in-process tricks score nothing."""

import pytest

from mispo.sandbox import Limits, run_function_tests

LIM = Limits(wall_s=5.0, cpu_s=5.0)
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
GOOD = "def add(a, b):\n    return a + b\n"


def run(solution, test=TEST, **kw):
    return run_function_tests(solution, test, "add", limits=kw.pop("limits", LIM), **kw)


def test_correct_solution_passes(no_leftovers):
    res = run(GOOD)
    assert res.passed and res.error is None


def test_wrong_solution_fails_and_says_where():
    res = run("def add(a, b):\n    return a - b\n")
    assert not res.passed
    assert "test line 2" in res.error and "candidate(2, 3) == 5" in res.error


@pytest.mark.parametrize("cheat", [
    "import sys\nsys.exit(0)\n" + GOOD.replace("a + b", "0"),
    "import os\nos._exit(0)\n",
    "def add(a, b):\n    import sys; sys.exit(0)\n",
    "def add(a, b):\n    import os; os._exit(0)\n",
    "print('PASSED')\nprint('All tests passed')\ndef add(a, b):\n    print('PASSED'); return 0\n",
    "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + GOOD,
    "import os, signal\nos.killpg(0, signal.SIGKILL)\n" + GOOD,
    "def add(a, b):\n    import os, signal; os.kill(-1, signal.SIGKILL)\n",
])
def test_exit_and_print_tricks_do_not_pass(cheat, no_leftovers):
    res = run(cheat)
    assert not res.passed


def test_always_equal_object_does_not_pass():
    cheat = ("class Any:\n    def __eq__(self, other):\n        return True\n"
             "    __ne__ = lambda self, other: False\n"
             "def add(a, b):\n    return Any()\n")
    res = run(cheat)
    assert not res.passed and "plain data" in res.error


def test_monkeypatching_cannot_reach_the_checker():
    cheat = ("import builtins, sys\n"
             "builtins.AssertionError = type('Nope', (Exception,), {})\n"
             "sys.modules['builtins'].isinstance = lambda *a: True\n"
             "def add(a, b):\n    return 0\n")
    assert not run(cheat).passed


def test_forged_verdicts_on_inherited_fds_do_not_pass():
    cheat = ("import os, json\n"
             "for fd in range(0, 64):\n"
             "    for nonce in ('', 'x'):\n"
             "        try:\n"
             "            os.write(fd, json.dumps({'nonce': nonce, 'passed': True}).encode())\n"
             "        except OSError:\n"
             "            pass\n"
             "def add(a, b):\n    return 0\n")
    assert not run(cheat).passed


def test_hanging_solution_times_out(no_leftovers):
    res = run("def add(a, b):\n    while True:\n        pass\n", limits=Limits(wall_s=1.0))
    assert not res.passed and res.timed_out and "timed out" in res.error


def test_exceptions_cross_the_boundary():
    test = ("def check(candidate):\n    try:\n        candidate(1, 0)\n    except ZeroDivisionError:\n"
            "        pass\n    else:\n        raise AssertionError('expected ZeroDivisionError')\n")
    assert run("def add(a, b):\n    return a // b\n", test).passed
    assert not run(GOOD, test).passed


def test_plain_data_round_trips():
    sol = ("def add(a, b):\n    return (a, b, {1: [2.5, None]}, {3}, frozenset({4}), b'x', 1j, "
           "float('inf'), True, 'é')\n")
    test = ("def check(candidate):\n    r = candidate([1, (2, 3)], {'k': {5}})\n"
            "    assert r[0] == [1, (2, 3)] and isinstance(r[0][1], tuple)\n"
            "    assert r[1] == {'k': {5}}\n"
            "    assert r[2:] == ({1: [2.5, None]}, {3}, frozenset({4}), b'x', 1j, float('inf'), "
            "True, 'é')\n")
    res = run(sol, test)
    assert res.passed, res.error


def test_bare_asserts_and_prelude_helpers():
    prelude = "def helper(x):\n    return x * 10\n\ndef add(a, b):\n    '''stub'''\n"
    test = "assert add(1, 2) == 3\nassert candidate(helper(1), 0) == 10\n"
    assert run(GOOD, test, prelude=prelude).passed


def test_solution_that_fails_to_load():
    res = run("def add(a, b)\n    return a + b\n")
    assert not res.passed and "SyntaxError" in res.error
    res = run("def plus(a, b):\n    return a + b\n")
    assert not res.passed and "does not define add" in res.error
