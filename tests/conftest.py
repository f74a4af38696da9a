"""The order `make test` hands test files to its workers (pytest-xdist, one per core, ``--dist loadfile`` with
``--no-loadscope-reorder``): the slowest files first, so that no worker starts a minute-long file while the others
run out of work (longest processing time first). The list comes from ``make test PYTEST_ARGS=--durations=0`` on 2
cores, summed per file; a file not in it runs after these, in the usual order. A stale list costs balance, not
correctness."""

SLOWEST_FIRST = [  # seconds on 2 cores, 2026-12-03: 269, 223, 196, 171, 168, 101, 68, 52, 49, 48, 44, 41, 34, 33, 33, 29, 27
    "test_methods.py", "test_cli.py", "test_resume.py", "test_recipes.py", "test_readme.py", "test_determinism.py",
    "test_scaleout.py", "test_distributed.py", "test_multinode.py", "test_nonfinite.py", "test_fastpath.py",
    "test_checkpoint_eval.py", "test_protocols.py", "test_schema.py", "test_pretext_geometry.py", "test_faithfulness.py",
    "test_dinov2.py",
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept
