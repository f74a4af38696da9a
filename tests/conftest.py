"""The order `make test` hands test files to its workers (pytest-xdist, one per core, ``--dist loadfile`` with
``--no-loadscope-reorder``): the slowest files first, so that no worker starts a minute-long file while the others
run out of work (longest processing time first). The list comes from ``make test PYTEST_ARGS=--durations=0`` on 2
cores, summed per file; a file not in it runs after these, in the usual order. A stale list costs balance, not
correctness."""

SLOWEST_FIRST = [  # seconds on 2 cores, 2026-12-03: 228, 225, 217, 175, 119, 106, 71, 69, 64, 62, 56, 52, 49, 33, 31, 31, 29
    "test_readme.py", "test_resume.py", "test_cli.py", "test_recipes.py", "test_methods.py", "test_determinism.py",
    "test_scaleout.py", "test_multinode.py", "test_distributed.py", "test_nonfinite.py", "test_schema.py",
    "test_checkpoint_eval.py", "test_protocols.py", "test_dinov2.py", "test_pretext_geometry.py", "test_fastpath.py",
    "test_faithfulness.py",
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept
