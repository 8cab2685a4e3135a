"""gptforge.runtime: releasing a thread's OpenMP workers, for models loaded on one thread and run on another."""

import os
import threading

import pytest
import torch

from gptforge import runtime

needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc (Linux)")


def thread_ids() -> set:
    return set(os.listdir("/proc/self/task"))


@needs_proc
def test_release_thread_pool_ends_the_calling_threads_openmp_workers_until_its_next_parallel_op():
    # libgomp keeps a worker pool per thread that ran parallel work; the server's scheduler needs the
    # loading thread's pool gone. Seen here as the process's threads (sets of ids, so that unrelated
    # threads coming and going do not matter).
    if not runtime._omp_pause_functions():
        pytest.skip("this torch's OpenMP runtime has no omp_pause_resource_all (OpenMP < 5.0)")
    x = torch.randn(1 << 22)

    def parallel_op():
        (x * 2.0).sum()  # big enough for ATen's parallel_for: the calling thread's pool gets a worker

    seen = {}

    def in_a_thread():  # a fresh thread, so the test owns the pool it measures
        torch.set_num_threads(2)
        seen["before"] = thread_ids()
        parallel_op()
        seen["with_pool"] = thread_ids()
        seen["released"] = runtime.release_thread_pool()
        seen["after"] = thread_ids()
        parallel_op()
        seen["again"] = thread_ids()

    threads = torch.get_num_threads()
    try:
        t = threading.Thread(target=in_a_thread)
        t.start()
        t.join()
    finally:
        torch.set_num_threads(threads)
    workers = seen["with_pool"] - seen["before"]
    assert workers, "the parallel op started no worker thread"
    assert seen["released"] is True
    assert not workers & seen["after"]  # the pool's worker ended
    assert seen["again"] - seen["after"]  # and the next parallel op started one again


@needs_proc
def test_the_pause_function_comes_from_the_openmp_runtime_torch_loaded():
    with open("/proc/self/maps") as f:
        maps = f.read()
    functions = runtime._omp_pause_functions()
    if any(name in maps for name in runtime._OPENMP_RUNTIMES):
        assert functions, "an OpenMP runtime is loaded but no omp_pause_resource_all was found"


def test_release_thread_pool_is_false_where_no_runtime_offers_the_call(monkeypatch):
    monkeypatch.setattr(runtime, "_pause_functions", [])
    assert runtime.release_thread_pool() is False
    refused = []
    monkeypatch.setattr(runtime, "_pause_functions", [lambda kind: refused.append(kind) or -1])
    assert runtime.release_thread_pool() is False and refused == [1]  # omp_pause_soft, refused
