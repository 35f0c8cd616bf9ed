"""``find_cycle`` against the standard library's topological sort, on random graphs."""

from __future__ import annotations

import graphlib
import itertools

from hypothesis import given
from hypothesis import strategies as st

from eventq.graph import find_cycle

NAMES = st.sampled_from([f"j{i}" for i in range(12)])
#: Some dependencies name jobs outside the graph (jobs submitted earlier): never a cycle.
GRAPHS = st.dictionaries(NAMES, st.lists(st.one_of(NAMES, st.just("earlier")), max_size=4),
                         max_size=12)


@given(GRAPHS)
def test_a_cycle_is_found_exactly_when_the_graph_has_one_and_it_is_real(
        edges: dict[str, list[str]]) -> None:
    inside = {job: [d for d in deps if d in edges] for job, deps in edges.items()}
    try:
        tuple(graphlib.TopologicalSorter(inside).static_order())
        acyclic = True
    except graphlib.CycleError:
        acyclic = False
    cycle = find_cycle(edges)
    assert (cycle is None) == acyclic
    if cycle is not None:
        assert cycle[0] == cycle[-1] and len(set(cycle[:-1])) == len(cycle) - 1
        for job, dep in itertools.pairwise(cycle):
            assert dep in edges[job], f"{job} -> {dep} is not an edge"


def test_long_chains_in_either_order_are_walked_without_recursion() -> None:
    forward = {f"l{i}": [f"l{i - 1}"] if i else [] for i in range(20_000)}
    backward = {f"l{i}": [f"l{i + 1}"] if i < 19_999 else [] for i in range(20_000)}
    assert find_cycle(forward) is None and find_cycle(backward) is None
    backward["l19999"] = ["l0"]
    cycle = find_cycle(backward)
    assert cycle is not None and len(cycle) == 20_001
