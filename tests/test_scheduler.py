"""The Scheduler in-process, driven by a fake executor that runs nothing: what
it dispatches and when, and what the database holds afterwards. No subprocess,
no FUSE. The fake is also the proof that a second executor needs no change to
the Scheduler: it implements grit.Executor and nothing else."""
import collections
import concurrent.futures
import threading
import time

import pytest

import grit
from conftest import wait_for


class FakeExecutor:
    """Tasks stay in flight until the test finishes them (or at once, when not
    holding); `behave(spec, input_bytes)` gives the outputs ({name: bytes}) or
    a failure (a str)."""

    def __init__(self, db, behave, capacity=10, hold=False):
        self.db, self.behave, self.capacity, self.hold = db, behave, capacity, hold
        self.lock = threading.Lock()
        self.in_flight: dict[int, tuple[grit.TaskSpec, concurrent.futures.Future]] = {}
        self.submitted: list[grit.TaskSpec] = []
        self.most_in_flight = 0
        self.most_per_step: collections.Counter = collections.Counter()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def submit(self, spec):
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.lock:
            self.submitted.append(spec)
            self.in_flight[spec.task_id] = (spec, future)
            self.most_in_flight = max(self.most_in_flight, len(self.in_flight))
            self.most_per_step |= collections.Counter(s.step for s, _ in self.in_flight.values())
        if not self.hold:
            self.finish(spec.task_id)
        return future

    def finish(self, task_id):
        with self.lock:
            spec, future = self.in_flight.pop(task_id)
        data = b"".join(self.db.objects.open(spec.input_hash)) if spec.input_hash else b""
        outcome = self.behave(spec, data)
        if isinstance(outcome, str):
            result = grit.TaskResult(spec.task_id, exit_code=1, error=outcome)
        else:
            outputs = [grit.Output(name, *self.db.objects.put(content))
                       for name, content in outcome.items()]
            result = grit.TaskResult(spec.task_id, exit_code=0, outputs=outputs)
        future.set_result(result)

    def cancel(self):
        with self.lock:
            stopped = list(self.in_flight.values())
            self.in_flight.clear()
        for spec, future in stopped:
            future.set_result(grit.TaskResult(spec.task_id, interrupted=True))

    def running(self):
        with self.lock:
            return collections.Counter(s.step for s, _ in self.in_flight.values())

    def flying(self, step):
        with self.lock:
            return sorted(tid for tid, (s, _) in self.in_flight.items() if s.step == step)


def pipeline_behaviour(spec, data):
    """seed: in-1..in-N; upper: upper-<input>; rev: rev-<input>."""
    if spec.step == "seed":
        return {f"in-{i}": f"item {i}\n".encode() for i in range(1, 4)}
    if spec.step == "upper":
        return {f"upper-{spec.input_name}": data.upper()}
    return {f"rev-{spec.input_name}": data[::-1]}


STEPS = [grit.StepDef("seed", "seed"), grit.StepDef("upper", "upper", ("in-*",)),
         grit.StepDef("rev", "rev", ("upper-*",))]


@pytest.fixture
def db(tmp_path):
    with grit.Database.for_run(str(tmp_path / "db"), grit.Console(0)) as database:
        yield database


def scheduler(db, executor, steps=STEPS):
    versions = db.meta.register(steps)
    return grit.Scheduler(db, executor, versions, grit.Console(0)), versions


def run(db, executor, steps=STEPS):
    sched, versions = scheduler(db, executor, steps)
    return sched.run(versions)


class Background:
    """A scheduler run in a thread, so that the test can drive the executor."""

    def __init__(self, db, executor, steps=STEPS):
        self.sched, versions = scheduler(db, executor, steps)
        self.summary = None
        # a daemon: a test that fails while the scheduler waits must not keep
        # pytest from exiting
        self.thread = threading.Thread(target=self._run, args=(versions,), daemon=True)
        self.thread.start()

    def _run(self, versions):
        self.summary = self.sched.run(versions)

    def finish_everything(self, executor, pause=0.0):
        while self.thread.is_alive():
            for task_id in sorted(executor.in_flight):
                time.sleep(pause)
                executor.finish(task_id)
            time.sleep(0.01)
        self.thread.join()
        return self.summary


def seed_then_uppers(executor):
    """Finish the seed's task, then wait until its three uppers are in flight."""
    assert wait_for(lambda: executor.flying("seed"))
    executor.finish(executor.flying("seed")[0])
    assert wait_for(lambda: len(executor.flying("upper")) == 3)


def counts(db):
    return {s["name"]: s["tasks"] for s in db.meta.step_counts()}


def test_a_whole_pipeline_runs_and_is_recorded(db):
    summary = run(db, FakeExecutor(db, pipeline_behaviour))
    assert (summary.tasks, summary.failed, summary.resources) == (7, 0, 9)
    assert counts(db)["rev"] == {"pending": 0, "done": 3, "failed": 0}
    [rev1] = db.meta.resources_named("rev-upper-in-1", live_only=True)
    assert b"".join(db.objects.open(rev1["hash"])) == b"\n1 METI"


def test_downstream_starts_as_soon_as_an_upstream_result_commits(db):
    executor = FakeExecutor(db, pipeline_behaviour, hold=True)
    bg = Background(db, executor)
    seed_then_uppers(executor)
    first, *others = executor.flying("upper")
    executor.finish(first)
    # rev of that one result is dispatched while the other two uppers still run
    assert wait_for(lambda: executor.flying("rev"))
    assert executor.flying("upper") == others
    assert bg.finish_everything(executor).tasks == 7


def test_step_parallel_cap_and_executor_capacity_are_respected(db):
    def behave(spec, data):
        if spec.step == "seed":
            return {f"n-{i}": str(i).encode() for i in range(8)}
        return {f"{spec.step}-{spec.input_name}": data}

    steps = [grit.StepDef("seed", "s"), grit.StepDef("capped", "c", ("n-*",), parallel=2),
             grit.StepDef("free", "f", ("n-*",))]
    executor = FakeExecutor(db, behave, capacity=3, hold=True)
    summary = Background(db, executor, steps).finish_everything(executor, pause=0.02)
    assert summary.tasks == 17
    assert executor.most_per_step["capped"] == 2
    assert executor.most_in_flight == 3


def test_failures_are_recorded_and_retried_by_the_next_run(db):
    def flaky(spec, data):
        return "exit status 1: bad input" if spec.input_name == "in-2" else \
            pipeline_behaviour(spec, data)

    summary = run(db, FakeExecutor(db, flaky))
    assert summary.failed == 1
    [failed] = db.meta.failed_tasks()
    assert (failed["step"], failed["error"]) == ("upper", "exit status 1: bad input")
    again = FakeExecutor(db, pipeline_behaviour)
    summary = run(db, again)
    assert [s.task_id for s in again.submitted][:1] == [failed["task"]]
    assert (summary.tasks, summary.failed) == (2, 0)  # the retried upper, then its rev
    assert db.meta.failed_tasks() == []


def test_cancel_leaves_unfinished_tasks_pending(db):
    executor = FakeExecutor(db, pipeline_behaviour, hold=True)
    bg = Background(db, executor)
    seed_then_uppers(executor)
    bg.sched.request_stop()
    bg.thread.join(timeout=30)
    assert bg.summary.interrupted and bg.summary.tasks == 1
    assert counts(db)["upper"] == {"pending": 3, "done": 0, "failed": 0}


def test_identical_outputs_start_nothing_downstream(db):
    def same(spec, data):
        if spec.step == "upper":
            return {"upper-all": b"same\n"}
        return pipeline_behaviour(spec, data)

    executor = FakeExecutor(db, same)
    summary = run(db, executor)
    assert [s.step for s in executor.submitted].count("upper") == 3
    assert [s.step for s in executor.submitted].count("rev") == 1  # early cutoff
    assert summary.resources == 3 + 1 + 1


def test_results_that_complete_out_of_order(db):
    executor = FakeExecutor(db, pipeline_behaviour, hold=True)
    bg = Background(db, executor)
    seed_then_uppers(executor)
    for task_id in reversed(executor.flying("upper")):
        executor.finish(task_id)
    summary = bg.finish_everything(executor)
    assert (summary.tasks, summary.failed) == (7, 0)
    for spec in executor.submitted:
        if spec.step == "upper":
            [out] = db.meta.task(spec.task_id)["outputs"]
            assert out["name"] == f"upper-{spec.input_name}"


def test_a_queued_task_whose_input_is_retired_does_not_run(db):
    """A seed that reruns and no longer emits b and c retires them mid-run:
    the tasks already queued for them are dropped, not run."""
    emits = {"run": ["a", "b", "c"]}

    def behave(spec, data):
        if spec.step == "seed":
            return {name: name.encode() for name in emits["run"]}
        return {f"w-{spec.input_name}": data}

    steps = [grit.StepDef("seed", "s", rerun=True), grit.StepDef("work", "w", ("?",), parallel=1)]
    first = FakeExecutor(db, behave, hold=True)
    bg = Background(db, first, steps)
    assert wait_for(lambda: first.flying("seed"))
    first.finish(first.flying("seed")[0])
    assert wait_for(lambda: first.flying("work"))
    bg.sched.request_stop()  # interrupted: work on a, b, c stays pending
    bg.thread.join(timeout=30)
    versions = db.meta.register(steps)
    assert db.meta.rerun_seed(versions[0])
    emits["run"] = ["a"]
    again = FakeExecutor(db, behave, hold=True)
    bg = Background(db, again, steps)
    assert wait_for(lambda: again.flying("seed") and again.flying("work"))
    again.finish(again.flying("seed")[0])  # commits: b and c are no longer live
    summary = bg.finish_everything(again, pause=0.05)
    ran = [s.input_name for s in again.submitted if s.step == "work"]
    assert ran == ["a"] and summary.failed == 0
    assert sorted(r["name"] for r in db.meta.resources_matching("*", live_only=True)) == ["a", "w-a"]
