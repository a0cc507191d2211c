"""Property tests: whatever the model sends, the calculator answers a number or a ValueError, quickly."""

import operator
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tools import evaluate_expression

# ast.parse warns about odd literals such as "1e"; what the calculator then returns is what is tested here
pytestmark = pytest.mark.filterwarnings("ignore::SyntaxWarning")

FINITE_NUMBER = re.compile(r"-?\d+(\.\d+)?(e[+-]\d+)?")  # int or float repr; not inf, nan or complex
FUNCTIONS = ["sqrt", "sin", "cos", "tan", "log", "log10", "exp", "abs", "round", "floor", "ceil", "min", "max"]
BINARY_OPERATORS = ["+", "-", "*", "/", "//", "%", "**"]
TOKENS = [
    *"0123456789", ".", "e", "pi", "+", "-", "*", "/", "//", "%", "**", "(", ")", ",", " ", "sqrt(", "max(",
    "9**9", "1e308", "1j", "'a'", "__import__(", ".__class__", "[", "]", "lambda:", "<<", "not ",
]  # fmt: skip
LEAVES = st.one_of(
    st.integers(-(10**6), 10**6).map(lambda n: f"({n})"),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda x: f"({x!r})"),
    st.sampled_from(["0", "0.0", "pi", "e", "9**9", "10**400", "1e308", "x", "True", "1j", "'a'", "(1 < 2)"]),
)
EXTREMES = st.sampled_from(
    ["1e308", "(-1e308)", "5e-324", "0", "0.0", "(-8)", "0.5", "(-1)", "10**400", "2**9999", "9**9"]
)


def _grammar(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Whitelisted operators and calls over generated operands, so most strings reach the evaluator."""
    binary = st.tuples(children, st.sampled_from(BINARY_OPERATORS), children)
    unary = st.tuples(st.sampled_from(["-", "+"]), children)
    call = st.tuples(st.sampled_from(FUNCTIONS), st.lists(children, min_size=1, max_size=2))
    return st.one_of(
        binary.map(lambda parts: f"({parts[0]} {parts[1]} {parts[2]})"),
        unary.map(lambda parts: f"({parts[0]}{parts[1]})"),
        call.map(lambda parts: f"{parts[0]}({', '.join(parts[1])})"),
    )


# token soup finds parser corners, the grammar reaches the evaluator, the edges find overflow, inf and nan
ARITHMETIC_TEXT = st.one_of(
    st.lists(st.sampled_from(TOKENS), max_size=60).map("".join),
    st.recursive(LEAVES, _grammar, max_leaves=12),
    st.tuples(EXTREMES, st.sampled_from(BINARY_OPERATORS), EXTREMES).map(" ".join),
    st.tuples(st.sampled_from(FUNCTIONS), EXTREMES).map(lambda parts: f"{parts[0]}({parts[1]})"),
)

INT_OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _int_combine(children: st.SearchStrategy[tuple[str, int]]) -> st.SearchStrategy[tuple[str, int]]:
    """Join two generated expressions with an operator, keeping the value Python computes for them."""
    return st.tuples(children, st.sampled_from(list(INT_OPERATORS)), children).map(
        lambda p: (f"({p[0][0]} {p[1]} {p[2][0]})", INT_OPERATORS[p[1]](p[0][1], p[2][1]))
    )


INT_EXPRESSIONS = st.recursive(st.integers(-1000, 1000).map(lambda n: (f"({n})", n)), _int_combine, max_leaves=20)


def assert_number_or_value_error(expression: str) -> None:
    """The calculator's contract: a finite number's text, or a ValueError; anything else fails the test."""
    try:
        result = evaluate_expression(expression)
    except ValueError:
        return
    assert FINITE_NUMBER.fullmatch(result), f"{expression!r} gave {result!r}"


@settings(deadline=500, max_examples=300)
@given(st.text())
def test_arbitrary_text_gives_a_number_or_a_value_error(expression: str) -> None:
    assert_number_or_value_error(expression)


@settings(deadline=500, max_examples=300)
@given(ARITHMETIC_TEXT)
def test_arithmetic_looking_text_gives_a_number_or_a_value_error(expression: str) -> None:
    assert_number_or_value_error(expression)


@settings(deadline=500, max_examples=300)
@given(INT_EXPRESSIONS)
def test_integer_arithmetic_matches_python(expression_and_value: tuple[str, int]) -> None:
    expression, value = expression_and_value
    assert evaluate_expression(expression) == str(value)
