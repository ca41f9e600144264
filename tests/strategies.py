"""Hypothesis strategies for JSON documents, shared by the property tests."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st


def json_values(text_size: int = 40, leaves: int = 20) -> st.SearchStrategy[Any]:
    """Return a strategy for JSON values: scalars, lists and objects, nested.

    Integers go beyond 64 bits, which some JSON parsers reject.
    """
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**80), max_value=2**80)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=text_size)
    )
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=leaves,
    )
