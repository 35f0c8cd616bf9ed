"""Dependency graphs of jobs. Standard library only: ``eventq import`` checks a CSV with
it before it loads anything else of eventq."""

from __future__ import annotations


def find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    """A dependency cycle among ``edges`` (job -> the jobs it depends on), or None.

    Iterative depth-first search: a 10,000-job chain must not hit the recursion limit.
    Each job's dependencies are walked once, by an iterator kept on the stack.
    """
    done: set[str] = set()
    for start in edges:
        if start in done:
            continue
        if all(dep in done or dep not in edges for dep in edges[start]):
            done.add(start)  # the usual row: what it depends on came first (or is outside)
            continue
        path, on_path = [start], {start}
        stack = [iter(edges[start])]
        while stack:
            for dep in stack[-1]:
                if dep in on_path:
                    return [*path[path.index(dep):], dep]
                if dep in edges and dep not in done:
                    path.append(dep)
                    on_path.add(dep)
                    stack.append(iter(edges[dep]))
                    break
            else:
                stack.pop()
                node = path.pop()
                on_path.discard(node)
                done.add(node)
    return None
