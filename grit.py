#!/usr/bin/env python3
"""grit — incremental pipelines of shell-script steps.

A TOML manifest names the steps. Every file a step's script writes into
$OUTPUT_DIR becomes a named, SHA-256 content-addressed resource; steps whose
`inputs` match that name get one task per resource. Metadata lives in SQLite,
small objects in LMDB, large ones as files, all under one database directory.

Sections, in the order data flows through them:
    Errors and console → Names → Vocabulary → Manifest → Object store
    → Metadata schema → Live view → Metadata store (SQLite)
    → Files, processes and mounts → Database → Sources → Output capture
    → Output capture: FUSE → Task execution → Node workers → Slurm executor
    → Scheduler → Running a pipeline → Watching files → Inspecting a database
    → Pictures of a run → Managing a database → CLI
Each section opens with what it owns and uses only itself and the sections
above it (tests/test_structure.py checks).
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import difflib
import errno
import fcntl
import filecmp
import fnmatch
import functools
import glob
import hashlib
import heapq
import importlib.util
import inspect
import io
import itertools
import json
import os
import queue
import re
import select
import shlex
import shutil
import signal
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import IO, Callable, Iterable, Iterator, Protocol, Sequence

try:
    import tomllib
except ImportError:  # Python < 3.11
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ImportError:
        sys.exit("grit: error: " + "the Python package tomli is missing (Python < 3.11 needs it):"
                 " pip install -r requirements.txt, pip install . in grit's folder, or use"
                 " grit.pyz, which carries it")

__version__ = "0.1.0"

EXIT_OK = 0
EXIT_TASK_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


# =============================================================================
# Errors and console
# =============================================================================
# How grit speaks to its user: one-line errors with exit codes, and every
# line on stderr (levels, colors, the live progress line). Knows nothing else.

class GritError(Exception):
    """A problem to report as one line on stderr, then exit with `exit_code`."""

    exit_code = EXIT_USAGE


class NotFoundError(GritError):
    """A name or hash the user asked for does not exist."""

    exit_code = EXIT_TASK_FAILED


def quote(text: str) -> str:
    """User input in a message: in quotes, with newlines and control characters
    escaped so that every error stays one line."""
    return json.dumps(text, ensure_ascii=False)


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


@dataclass(frozen=True)
class Settings:
    """grit's own environment variables, GRIT_ and the field's name in capitals
    (README: Environment variables), read once by settings()."""

    progress_seconds: float = 30.0  # between progress lines when stderr is not a terminal
    libfuse: str = ""  # "2" or "3": the libfuse FUSE mode loads; "": libfuse3, else libfuse2
    fuse_writeback: str = "1"  # "0": no kernel writeback cache on libfuse3
    slurm_poll: float = 30.0  # seconds between squeue calls of a Slurm run
    slurm_grace: float = 30.0  # seconds an ended element's records get to appear
    watch_poll: float = 0.0  # -run -watch: look every this many seconds, not through inotify


@functools.lru_cache(maxsize=None)
def settings() -> Settings:
    """A value that is not a number where one is needed is an error naming it."""
    values = asdict(Settings())
    for name, default in values.items():
        text = os.environ.get(f"GRIT_{name.upper()}", default)
        try:
            values[name] = type(default)(text)
        except ValueError:
            raise GritError(f"GRIT_{name.upper()} must be a number, not {quote(text)}") from None
    return Settings(**values)


class Console:
    """All user-facing output: levels, colors, and the live progress line.

    Messages go to stderr so that stdout stays clean for -export output.
    """

    COLORS = {"red": "31", "green": "32", "yellow": "33", "dim": "2"}

    def __init__(self, level: int = 1, stream: IO[str] | None = None) -> None:
        self.level = level  # 0 quiet, 1 normal, 2 verbose
        self.verbose = level >= 2
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.color = self.tty and "NO_COLOR" not in os.environ
        self._progress_shown = False
        self.closed = False  # the stream was closed by its reader
        self._lock = threading.Lock()
        # The first plain progress line comes only after a run has gone on a while.
        self._last_plain = time.monotonic()

    def paint(self, text: str, color: str) -> str:
        return f"\033[{self.COLORS[color]}m{text}\033[0m" if self.color else text

    def _write(self, line: str) -> None:
        with self._lock:
            if self._progress_shown:
                self._put("\r\033[K")
                self._progress_shown = False
            self._put(line + "\n")

    def _put(self, text: str) -> None:
        """Write and flush; a closed stream (`2>&1 | head`) drops the rest of the
        console output, and the run goes on to its true exit status."""
        if self.closed:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (BrokenPipeError, ValueError, OSError):
            self.closed = True
            try:  # so that Python's own flush at exit fails neither
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
            except (OSError, ValueError, io.UnsupportedOperation):
                pass

    def error(self, message: str) -> None:
        self._write(self.paint("grit: error: ", "red") + message)

    def warn(self, message: str) -> None:
        if self.level >= 1:
            self._write(self.paint("grit: warning: ", "yellow") + message)

    def info(self, message: str) -> None:
        if self.level >= 1:
            self._write(message)

    def detail(self, message: str) -> None:
        if self.verbose:
            self._write(self.paint(message, "dim"))

    def progress(self, line: str) -> None:
        """Rewrite the live status line on a terminal; elsewhere (a log file, CI)
        print it as a plain line every GRIT_PROGRESS_SECONDS. Normal mode only."""
        if self.level != 1:
            return
        if not self.tty:
            now = time.monotonic()
            if now - self._last_plain >= settings().progress_seconds:
                self._last_plain = now
                self._write(f"progress: {line}")
            return
        with self._lock:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self._put("\r\033[K" + line[:width])
            self._progress_shown = True

    def end_progress(self) -> None:
        with self._lock:
            if self._progress_shown:
                self._put("\r\033[K")
                self._progress_shown = False


def emit_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def human_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


# =============================================================================
# Names
# =============================================================================
# What a resource name and an input pattern may be, and how names match
# patterns. Pure functions of strings.

# Longest path segment most Linux filesystems accept, in bytes.
MAX_SEGMENT_BYTES = 255
GLOB_CHAR = re.compile(r"[*?\[]")
CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f]")
STEP_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+\Z")


def resource_name_problem(name: str, pattern: bool = False) -> str | None:
    """Why `name` is not a valid resource name (with pattern: input pattern), or None."""
    if not name:
        return "is empty"
    if name.startswith("/"):
        return "is absolute"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes arrive as surrogate escapes
        return "is not valid UTF-8"
    if CONTROL_CHAR.search(name):
        return "contains a control character"
    if not pattern and GLOB_CHAR.search(name):
        return "contains one of * ? [ (pattern characters in inputs)"
    for segment in name.split("/"):
        if segment == "":
            return "has an empty path segment"
        if segment in (".", ".."):
            return f'has a "{segment}" segment'
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            return f"has a segment longer than {MAX_SEGMENT_BYTES} bytes"
    return None


def is_pattern(text: str) -> bool:
    return GLOB_CHAR.search(text) is not None


def matches_inputs(name: str, inputs: Sequence[str]) -> bool:
    """fnmatch rules, case-sensitive; `*` also crosses `/` as in fnmatch."""
    return input_matcher(tuple(inputs))(name)


@functools.lru_cache(maxsize=256)
def input_matcher(inputs: tuple[str, ...]) -> Callable[[str], bool]:
    """matches_inputs for one list of inputs, compiled once: a set of the exact
    names and one regular expression of the patterns (fnmatch's translation)."""
    exact = frozenset(p for p in inputs if not is_pattern(p))
    patterns = [fnmatch.translate(p) for p in inputs if is_pattern(p)]
    regex = re.compile("|".join(f"(?:{p})" for p in patterns)).match if patterns else None
    if regex is None:
        return exact.__contains__
    return lambda name: name in exact or regex(name) is not None


def literal_prefix(pattern: str) -> str:
    """What every name an input matches starts with (all of an exact name)."""
    return re.split(r"[*?\[]", pattern, maxsplit=1)[0]


# =============================================================================
# Vocabulary
# =============================================================================
# The words every later section speaks: steps and their versions, tasks, their
# results and outputs. Plain data; nothing here reaches a store or a process.

# A chain of resources may pass through one step this many times (a step that
# consumes what it, or a step after it, produces); past it the chain stops and
# the run fails, naming the step. A converging cycle ends long before.
CYCLE_LIMIT = 100


@dataclass(frozen=True)
class StepDef:
    """One [[step]] of the manifest: what a step does and how it is scheduled."""

    name: str
    script: str
    inputs: tuple[str, ...] = ()
    parallel: int = 0  # most concurrent tasks of this step; 0 = unlimited
    timeout: float = 0  # seconds a task may run before it is killed; 0 = no limit
    cycle_limit: int = CYCLE_LIMIT  # times one chain of resources may pass through this step
    files: tuple[str, ...] = ()  # a source step's file patterns, absolute (no script then)
    rerun: bool = False  # a seed that runs on every -run (rerun = "always")
    gather: bool = False  # one task over all live matching resources (gather = true)
    # Scheduling keys (section 9), never part of a version: what one task needs.
    cpus: int = 1  # CPUs a task uses: local slots it takes, Slurm's --cpus-per-task
    mem: str = ""  # Slurm --mem of an array element ("4G"); "" = the cluster's default
    time: float = 0  # Slurm time limit per task, seconds; 0 = from timeout, else the partition's
    partition: str = ""  # Slurm partition; "" = the cluster's default
    batch: int = 0  # tasks per array element; 0 = chosen from the step's task durations
    sbatch: tuple[str, ...] = ()  # further sbatch options, as given
    retries: int = -1  # times a failed task runs again in the same run; -1 = -retries
    by_attempt: tuple[tuple[str, tuple], ...] = ()  # (key, values) of cpus/mem/time lists

    def for_attempt(self, attempt: int) -> "StepDef":
        """The step as its attempt-th try runs: each list-valued key at that
        entry, its last entry repeating."""
        return dataclasses.replace(self, **{key: values[min(attempt, len(values)) - 1]
                                            for key, values in self.by_attempt})

    @property
    def is_seed(self) -> bool:
        """No inputs: a seed (script) or a source (files)."""
        return not self.inputs


@dataclass
class Manifest:
    """A loaded manifest: its steps, in file order, and each executor's settings
    (its table, [NAME], of string keys; see EXECUTORS)."""

    path: str
    steps: list[StepDef]
    executors: dict[str, object] = field(default_factory=dict)

    def step(self, name: str) -> StepDef:
        for s in self.steps:
            if s.name == name:
                return s
        raise GritError(f"unknown step {quote(name)} in {self.path}"
                        f"{did_you_mean(name, [s.name for s in self.steps])}")


@dataclass
class StepVersion:
    """A step of this run: the manifest's definition and its stored version."""

    id: int
    definition: StepDef
    version: int
    is_new: bool = False

    @property
    def name(self) -> str:
        return self.definition.name


@dataclass
class RunOptions:
    """How to run: -run's flags, checked."""

    manifest: str
    db: str
    parallel: int  # 0: the executor's default
    start: str | None = None
    steps: list[str] = field(default_factory=list)
    output_mode: str = "auto"
    timeout: float = 0
    dry_run: bool = False
    json: bool = False
    executor: str = "local"
    executor_flags: dict[str, str] = field(default_factory=dict)  # its own flags given (-work-dir)
    retries: int = 0  # a step's retries where neither it nor its executor's table sets them
    command: list[str] = field(default_factory=list)  # grit's arguments (the run table keeps them)
    watch: bool = False  # -watch: run again whenever the files or the manifest change


# Executors by name (-executor NAME), each registered by its own section. An
# executor class declares what it adds: the dataclass of its manifest table
# ([NAME], `settings`) and its -run flags (`flags`); the manifest parser and
# the CLI take them from here, so a new executor touches neither.
EXECUTORS: dict[str, type] = {}


@dataclass
class TaskSpec:
    """Everything needed to run one task; no database access needed."""

    task_id: int
    step: str
    script: str
    input_name: str = ""
    input_hash: str = ""
    timeout: float = 0  # seconds; 0 = no limit
    previous_start: str = ""  # seed tasks: when the step last succeeded (GRIT_PREVIOUS_START)
    passes: int = 1  # times the chain of resources that led here passed through this step
    gathered: list[Output] | None = None  # a gather task's inputs, by (name, hash)
    cpus: int = 1  # script slots it takes (the step's cpus)
    attempt: int = 1  # which try this is ($GRIT_ATTEMPT); more than 1 with retries


@dataclass
class Output:
    """A file a task emitted: a resource to record, its object already stored."""

    __slots__ = ("name", "hash", "size")  # a gather task holds one per input: 50,000 and more

    name: str
    hash: str
    size: int


@dataclass
class TaskResult:
    """How a task ended: its outputs, or why it failed, or that it was interrupted."""

    task_id: int
    exit_code: int | None = None
    error: str | None = None  # set when the task failed
    outputs: list[Output] = field(default_factory=list)
    stdout_hash: str | None = None
    stderr_hash: str | None = None
    started_at: str = ""
    duration: float = 0.0
    # What the script's process tree used (os.wait4's rusage: CPU summed over
    # the processes it waited for, peak RSS that of the largest), and where.
    # Linux counts the spawning process's own peak into its child's at exec,
    # so a peak up to grit's own is known only as "under rss_under".
    cpu_user: float | None = None
    cpu_system: float | None = None
    peak_rss: int | None = None  # bytes
    rss_under: int | None = None  # bytes: when peak_rss is None
    node: str = ""
    interrupted: bool = False  # killed by grit's shutdown: stays pending
    told: bool = False  # its failure was told already, in one line with others'

    @property
    def ok(self) -> bool:
        return self.error is None and not self.interrupted


# =============================================================================
# Manifest
# =============================================================================
# The TOML manifest to StepDefs: every mistake is one line naming the file,
# the step and the key. Reads the file, nothing else.

SCHEDULING_KEYS = ("cpus", "mem", "time", "partition", "batch", "sbatch", "retries")
STEP_KEYS = ("name", "inputs", "parallel", "script", "start", "timeout", "cycle_limit", "files",
             "rerun", "gather") + SCHEDULING_KEYS


def load_manifest(path: str) -> Manifest:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise GritError(f"manifest not found: {path}") from None
    except IsADirectoryError:
        raise GritError(f"manifest is a directory: {path}") from None
    except PermissionError:
        raise GritError(f"manifest not readable: {path}") from None
    except UnicodeDecodeError as e:
        raise GritError(f"{path}: invalid TOML: not UTF-8 ({e.reason})") from None
    except tomllib.TOMLDecodeError as e:
        raise GritError(f"{path}: invalid TOML: {e}") from None
    return parse_manifest(data, path)


def parse_manifest(data: dict, path: str) -> Manifest:
    tables = {name: cls.settings for name, cls in EXECUTORS.items() if cls.settings}
    for key in data:
        if key != "step" and key not in tables:
            raise GritError(f"{path}: unknown top-level key {quote(key)}"
                            f"{did_you_mean(key, ['step', *tables])}")
    executors, defaults = {}, {}
    for name, kind in tables.items():
        executors[name] = _parse_executor_table(data.get(name, {}), f"{path}: [{name}]", kind,
                                                defaults)
    tables = data.get("step")
    if tables is None:
        raise GritError(f"{path}: no steps: add at least one [[step]] table")
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise GritError(f"{path}: \"step\" must be an array of tables, written [[step]]")
    steps: list[StepDef] = []
    names: list[str] = []
    for index, table in enumerate(tables, start=1):
        step = _parse_step(table, f"{path}: step {index}", defaults)
        if step.name in names:
            raise GritError(f"{path}: step {index}: duplicate step name {quote(step.name)}"
                            f" (also step {names.index(step.name) + 1})")
        names.append(step.name)
        steps.append(step)
    if not steps:
        raise GritError(f"{path}: no steps: add at least one [[step]] table")
    return Manifest(path, steps, executors)


def _parse_executor_table(table: object, where: str, kind: type, defaults: dict) -> object:
    """An executor's table: its settings (string keys), and the scheduling keys
    it gives, added to `defaults` for every step."""
    if not isinstance(table, dict):
        raise GritError(f"{where} must be a table, not {_toml_type(table)}")
    keys = [f.name for f in dataclasses.fields(kind)]
    for key in table:
        if key not in keys + list(SCHEDULING_KEYS):
            raise GritError(f"{where}: unknown key {quote(key)}"
                            f"{did_you_mean(key, keys + list(SCHEDULING_KEYS))}")
    for key in keys:
        if key in table:
            _string(table, key, where)
    defaults.update(_parse_scheduling(table, where, {}))
    return kind(**{key: table[key] for key in keys if key in table})


def _parse_scheduling(table: dict, where: str, defaults: dict) -> dict:
    """The scheduling keys of a step (or of [slurm]), over `defaults`."""
    keys = dict(defaults)
    by_attempt = dict(keys.get("by_attempt", ()))
    for key, parse in (("cpus", lambda t: _number(t, "cpus", where, 1, "1 or more", least=1)),
                       ("mem", lambda t: _string(t, "mem", where)),
                       ("time", lambda t: slurm_seconds(t["time"], where))):
        if key in table:  # one value, or a list by attempt (with retries)
            values = table[key] if isinstance(table[key], list) else [table[key]]
            if not values:
                raise GritError(f"{where}: \"{key}\" is an empty list: give a value, or one "
                                "per attempt")
            values = [parse({key: v}) for v in values]
            keys[key] = values[0]
            by_attempt.pop(key, None)
            by_attempt.update({key: tuple(values)} if len(values) > 1 else {})
    keys["by_attempt"] = tuple(by_attempt.items())
    if "batch" in table:
        keys["batch"] = _number(table, "batch", where, 0, "0 (chosen by grit) or more")
    if "retries" in table:
        keys["retries"] = _number(table, "retries", where, 0, "0 or more")
    if "partition" in table:
        keys["partition"] = _string(table, "partition", where)
    if "sbatch" in table:
        keys["sbatch"] = tuple(_strings(table, "sbatch", where, 'sbatch = ["--qos=long"]'))
    return keys


def _string(table: dict, key: str, where: str) -> str:
    if not isinstance(table[key], str):
        raise GritError(f"{where}: \"{key}\" must be a string, not {_toml_type(table[key])}")
    return table[key]


def slurm_seconds(value: object, where: str) -> float:
    """A time limit: seconds, or a string as sbatch --time takes it
    ("MM", "MM:SS", "HH:MM:SS", "D-HH[:MM[:SS]]")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e12:
        return float(value)
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(value)) \
        if isinstance(value, str) else None
    if not match:
        raise GritError(f"{where}: \"time\" must be seconds or a Slurm time like "
                        f"\"1:30:00\", not {quote(str(value))}")
    days, *parts = match.groups()
    numbers = [int(p) for p in parts if p is not None]
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        numbers += [0] * (3 - len(numbers))
        return int(days) * 86400 + numbers[0] * 3600 + numbers[1] * 60 + numbers[2]
    scale = {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(numbers)]
    return float(sum(n * k for n, k in zip(numbers, scale)))


def _parse_step(table: dict, where: str, defaults: dict) -> StepDef:
    if isinstance(table.get("name"), str):  # name the step in every message that follows
        where = f"{where} ({quote(table['name'])})"
    for key in table:
        if key not in STEP_KEYS:
            raise GritError(f"{where}: unknown key {quote(key)}{did_you_mean(key, STEP_KEYS)}")
    name = table.get("name")
    if name is None:
        raise GritError(f"{where}: missing key \"name\"")
    if not isinstance(name, str):
        raise GritError(f"{where}: \"name\" must be a string, not {_toml_type(name)}")
    if not STEP_NAME_RE.match(name):
        raise GritError(f"{where}: invalid step name {quote(name)}: "
                        "use letters, digits, '_', '.' and '-'")
    inputs = _strings(table, "inputs", where, 'inputs = ["data"]')
    for pattern in inputs:
        problem = resource_name_problem(pattern, pattern=True)
        if problem:
            raise GritError(f"{where}: input {quote(pattern)} {problem}")
    script, files = _parse_work(table, where, inputs)
    if _boolean(table, "start", where) and inputs:
        raise GritError(f"{where}: a start step has no inputs: remove \"start\" or \"inputs\"")
    gather = _boolean(table, "gather", where)
    if gather and not inputs:
        raise GritError(f"{where}: a gather step needs \"inputs\": the resources it gathers")
    # Sorted and deduplicated: reordering inputs is not a new definition.
    return StepDef(name=name, script=script, inputs=tuple(sorted(set(inputs))),
                   parallel=_number(table, "parallel", where, 0, "0 (unlimited) or more"),
                   timeout=float(_number(table, "timeout", where, 0, "a number of seconds "
                                         "(0 = no limit)", floats=True)),
                   cycle_limit=_number(table, "cycle_limit", where, CYCLE_LIMIT, "1 or more",
                                       least=1),
                   files=tuple(files), rerun=_parse_rerun(table, where, inputs, files),
                   gather=gather,
                   **_parse_scheduling(table, where, defaults))


def _parse_work(table: dict, where: str, inputs: list[str]) -> tuple[str, list[str]]:
    """What the step does: (script, []) or, for a source step, ("", file patterns)."""
    files = _strings(table, "files", where, 'files = ["data/*.csv"]')
    script = table.get("script")
    if "files" in table:
        if not files:
            raise GritError(f"{where}: \"files\" is empty: give at least one file pattern")
        if script is not None or inputs:
            raise GritError(f"{where}: a source step (\"files\") has no \"script\" and no "
                            "\"inputs\": it imports files")
        return "", files
    if script is None:
        raise GritError(f"{where}: missing key \"script\" (or \"files\", to import files)")
    if not isinstance(script, str):
        raise GritError(f"{where}: \"script\" must be a string, not {_toml_type(script)}")
    if not script.strip():
        raise GritError(f"{where}: \"script\" is empty")
    return script, []


def _parse_rerun(table: dict, where: str, inputs: list[str], files: list[str]) -> bool:
    rerun = table.get("rerun", "never")
    if rerun not in ("always", "never"):
        raise GritError(f"{where}: \"rerun\" must be \"always\" or \"never\", not "
                        f"{quote(str(rerun))}")
    if rerun == "always" and (inputs or files):
        raise GritError(f"{where}: only a seed step (a script without inputs) can have "
                        "rerun = \"always\"")
    return rerun == "always"


def _boolean(table: dict, key: str, where: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise GritError(f"{where}: \"{key}\" must be true or false, not {_toml_type(value)}")
    return value


def _strings(table: dict, key: str, where: str, example: str) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise GritError(f"{where}: \"{key}\" must be an array of strings, like {example}, "
                        f"not {_toml_type(value)}")
    return value


def _number(table: dict, key: str, where: str, default: int, what: str, least: int = 0,
            floats: bool = False) -> int | float:
    """A whole number (or, with floats, any number) of at least `least`."""
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float) if floats else int):
        kind = what if floats else "an integer"
        raise GritError(f"{where}: \"{key}\" must be {kind}, not {_toml_type(value)}")
    if not least <= value < float("inf"):
        raise GritError(f"{where}: \"{key}\" must be {what}, not {value}")
    return value


def _toml_type(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
             list: "an array", dict: "a table"}
    return names.get(type(value), f"a {type(value).__name__}")


# =============================================================================
# Object store
# =============================================================================
# Objects by hash: small ones in LMDB, large ones as read-only files named by
# hash; put, adopt a file, open, place, has, delete. Knows nothing of names,
# steps or tasks (the metadata's business).

# LMDB value size for object chunks. Big enough to amortise per-key cost, small
# enough that LMDB finds contiguous free pages for it and memory stays bounded.
# A large value lives on overflow pages behind a 16-byte page header: 256 KiB
# - 16 fills 64 pages exactly, where 256 KiB spilled into a 65th and was 4x
# slower to write and 2.7x slower to read back (1 GiB: 3.0 -> 0.75 s and 2.8 ->
# 1.0 s). Readers take chunks of any size, so older objects stay readable.
CHUNK_SIZE = 256 * 1024 - 16
# First LMDB map size; the map doubles whenever it fills, so this is not a limit.
# It is address space, not disk (the file grows as pages are written). Where a
# ulimit on address space refuses it, the store opens at a size from the file.
INITIAL_MAP_SIZE = 4 * 1024 * 1024 * 1024
SMALL_MAP_SIZE = 256 * 1024 * 1024
# Objects of at least this size are files (files/HASH beside objects/), smaller
# ones LMDB values. One object stored and synced (bench/RESULTS.md): 64 KiB
# 0.26 ms in LMDB, 0.33 ms as a file; 256 KiB 0.83 / 0.68 ms; 1 MiB 5.4 / 2.0 ms;
# 4 MiB 62 / 8.3 ms. Below 1 MiB LMDB also syncs many objects at once and keeps
# the number of files down.
FILE_MIN_BYTES = 1024 * 1024
BLOCK_BYTES = 1024 * 1024  # a large object is read and hashed in blocks of this size
# Bytes read per LMDB read transaction: bounds the memory of one reader.
READ_BATCH_BYTES = 4 * 1024 * 1024
# Small objects held for the next sync, at most (their bytes and ~256 B each of
# bookkeeping: a source step importing 100,000 small files holds 35 MiB otherwise).
HOLD_MAX_BYTES = 16 * 1024 * 1024
MADV_DONTNEED = 4
HEADER = struct.Struct(">QI")  # object header: size in bytes, number of chunks
# The header of a large object an older grit wrote before its hash was known:
# its chunks stay under the random key they were written under.
WRITTEN_HEADER = struct.Struct(">QI32s")
FICLONE = 0x40049409  # ioctl: make a file share another's blocks (reflink)
SYNC_FILE_RANGE_WRITE = 2


class DamagedObject(GritError):
    """An object's stored content is incomplete."""


def hash_blocks(f: IO[bytes]) -> tuple[str, int]:
    """(hash, size) of f's bytes to its end, read in BLOCK_BYTES blocks while
    a helper thread hashes the one before (reads and hashlib let go of the GIL)."""
    h, size = hashlib.sha256(), 0
    with concurrent.futures.ThreadPoolExecutor(1) as helper:
        hashing = helper.submit(lambda: None)
        for block in iter(lambda: f.read(BLOCK_BYTES), b""):
            hashing.result()
            hashing = helper.submit(h.update, block)
            size += len(block)
        hashing.result()
    return h.hexdigest(), size


def read_whole(fd: int, size: int) -> bytes:
    """A file's bytes from its offset to its end, `size` of them expected
    (plain os.read: a file object costs three more system calls)."""
    data = os.read(fd, size + 1)
    if len(data) > size:  # it grew meanwhile
        data += b"".join(iter(lambda: os.read(fd, BLOCK_BYTES), b""))
    return data


@functools.lru_cache(maxsize=None)
def _libc() -> object:
    import ctypes
    return ctypes.CDLL(None, use_errno=True)


def start_writeback(fd: int, offset: int = 0, length: int = 0, close: bool = False) -> None:
    """Have the kernel start writing [offset, offset + length) of a file (length
    0: to its end) to disk without waiting (sync_file_range), so the fdatasync
    before the file becomes an object finds little left to write (1 GiB here:
    1.2 s when all is left); then close fd if asked."""
    import ctypes
    with contextlib.suppress(AttributeError, OSError):
        _libc().sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(length),  # type: ignore[attr-defined]
                                ctypes.c_uint(SYNC_FILE_RANGE_WRITE))
    if close:
        os.close(fd)


def copy_file(src: int, dst: int) -> None:
    """src's bytes into the empty file dst without passing them through grit:
    a reflink where the filesystem shares blocks, else a copy in the kernel,
    else (another filesystem on an old kernel) read and written."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return
    except OSError:
        pass
    size, done = os.fstat(src).st_size, 0
    try:
        while done < size:
            copied = os.copy_file_range(src, dst, size - done, done, done)
            if copied == 0:
                break
            done += copied
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP) or done:
            raise
        with open(src, "rb", closefd=False) as f_in, open(dst, "wb", closefd=False) as f_out:
            f_in.seek(0)
            shutil.copyfileobj(f_in, f_out, BLOCK_BYTES)


class ObjectStore:
    """Content-addressed objects: put, adopt, open, place, has, delete. Knows
    nothing of names.

    A small object is a header under its hash in LMDB's `objects` table and its
    bytes in CHUNK_SIZE pieces under (hash, index) in `chunks`; the header is
    written last, so it is complete or absent. A large object is the read-only
    file files/HASH beside the LMDB directory, moved there by rename once whole
    and on disk, so it too is complete or absent; what a crash leaves in files/
    under other names, gc removes.
    """

    def __init__(self, path: str, readonly: bool = False) -> None:
        try:
            import lmdb  # imported here: only commands that touch objects pay for it
        except ImportError:
            raise GritError("the Python package lmdb is missing: pip install -r requirements.txt "
                            "(or pip install . in grit's folder), or use grit.pyz, which "
                            "carries it") from None

        self._lmdb = lmdb
        self.files = os.path.join(os.path.dirname(os.path.abspath(path)), "files")
        self._new_files = False  # a file object was added since the last sync
        data_file = os.path.join(path, "data.mdb")
        exists = os.path.exists(data_file)
        if not readonly and not exists and lmdb.version()[0] >= 1:
            raise GritError(f"the linked LMDB {'.'.join(map(str, lmdb.version()))} would "
                            "create a format LMDB 0.9 cannot read; install lmdb==1.7.5")
        used = os.path.getsize(data_file) if exists else 0
        try:
            try:
                self.env = self._open(path, max(INITIAL_MAP_SIZE, 2 * used), readonly)
            except lmdb.MemoryError:  # address space limited (ulimit -v)
                self.env = self._open(path, max(SMALL_MAP_SIZE, 2 * used), readonly)
            self._objects = self.env.open_db(b"objects", create=not readonly)
            self._chunks = self.env.open_db(b"chunks", create=not readonly)
            if not readonly:
                os.makedirs(self.files, 0o700, exist_ok=True)
        except (lmdb.Error, OSError) as e:
            raise GritError(f"cannot open object store {path}: {e}") from None
        # Every transaction holds this lock: LMDB may only be resized while no
        # transaction of this process is open.
        self._guard = threading.Lock()
        # Small objects put since the last sync, written by it in one transaction
        # (one write transaction per object cost six system calls; bench/budget.py).
        # Only where sync() comes before anything outside this process needs them.
        self.hold = False
        self._held: dict[str, bytes] = {}
        self._held_bytes = 0
        self._map_name = " " + os.path.realpath(os.path.join(path, "data.mdb"))  # in /proc/self/maps

    def _open(self, path: str, size: int, readonly: bool) -> object:
        # readahead: an object is read front to back, in chunks of 64 contiguous
        # pages; without it every page of a large object that is not in the page
        # cache is one 4 KiB read from disk.
        return self._lmdb.open(path, map_size=size, max_dbs=2, readonly=readonly, sync=False,
                               metasync=False, readahead=True, subdir=True,
                               create=not readonly, mode=0o600)

    def close(self) -> None:
        self.env.close()

    def sync(self, held: bool = True) -> None:
        """Write the held objects (or, with held=False, drop them: no recorded
        task names them) and flush to disk; called before metadata that names
        them commits. File objects were synced when adopted; their names are now."""
        try:
            with self._guard:
                if not held:
                    self._held, self._held_bytes = {}, 0
                self._write_held()
                self._drop_map()
            self.env.sync(True)
        except self._lmdb.Error as e:  # a full disk shows up as EIO here
            raise OSError(f"cannot write the object store: {e}") from None
        if self._new_files:
            self._new_files = False
            fd = os.open(self.files, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _drop_map(self) -> None:
        """Unmap the pages of LMDB's map that reads touched (the page cache keeps
        them): else a run's RSS grows by every page it read, 62 MiB at 100,000
        tasks. Call with the guard held: no transaction is open."""
        import ctypes
        try:
            with open("/proc/self/maps") as f:
                spans = [line.split("-", 1) for line in f
                         if line.rstrip("\n").endswith(self._map_name)]
        except OSError:  # no /proc: the pages stay mapped, nothing else changes
            return
        for start, rest in spans:
            end = int(rest.split(maxsplit=1)[0], 16)
            _libc().madvise(ctypes.c_void_p(int(start, 16)),  # type: ignore[attr-defined]
                            ctypes.c_size_t(end - int(start, 16)), MADV_DONTNEED)

    def _write(self, fn: Callable[[object], None]) -> None:
        """Run fn(txn) in a write transaction, growing the map when it is full
        (or adopting the size another process grew it to)."""
        with self._guard:
            self._transact(fn)

    def _transact(self, fn: Callable[[object], None]) -> None:
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    fn(txn)
                return
            except self._lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except self._lmdb.MapResizedError:
                self.env.set_mapsize(0)

    def file_path(self, digest: str) -> str:
        return os.path.join(self.files, digest)

    def has(self, digest: str) -> bool:
        with self._guard, self._reader() as txn:
            if digest in self._held or txn.get(bytes.fromhex(digest), db=self._objects) is not None:
                return True
        return os.path.exists(self.file_path(digest))

    def put(self, data: bytes) -> tuple[str, int]:
        """Store bytes held in memory; returns (hash, size)."""
        digest = hashlib.sha256(data).hexdigest()
        if len(data) < FILE_MIN_BYTES:
            self._put_lmdb(digest, data)
            return digest, len(data)
        fd, path = tempfile.mkstemp(dir=self.files, prefix=".new-")
        with open(fd, "wb") as f:
            f.write(data)
        self.adopt(path, digest)
        return digest, len(data)

    def put_file(self, path: str, move: bool = False) -> tuple[str, int]:
        """Store a file's bytes; returns (hash, size). A large file is moved in
        with `move` (hashed, then renamed: it must be ours and finished), else
        copied in (in the kernel) and the copy hashed, so the object is what
        was hashed even if the file changes meanwhile."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size < FILE_MIN_BYTES:
                stored = self.put(read_whole(fd, size))
            elif not move:
                return self._copy_in(fd)
            else:
                with open(fd, "rb", buffering=0, closefd=False) as f:
                    stored = hash_blocks(f)  # type: ignore[arg-type]
        finally:
            os.close(fd)
        if move and stored[1] >= FILE_MIN_BYTES:
            self.adopt(path, stored[0])
        elif move:
            os.unlink(path)
        return stored

    def _copy_in(self, src: int) -> tuple[str, int]:
        fd, path = tempfile.mkstemp(dir=self.files, prefix=".new-")
        try:
            copy_file(src, fd)
            os.lseek(fd, 0, os.SEEK_SET)
            with open(fd, "rb", buffering=0, closefd=False) as f:
                stored = hash_blocks(f)  # type: ignore[arg-type]
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self.adopt(path, stored[0])
        return stored

    def adopt(self, path: str, digest: str) -> None:
        """Make the file at `path`, whose bytes hash to `digest` and which
        nothing writes any more, the object: read-only, on disk, renamed into
        files/ (or removed, when the object is there already). A file on
        another filesystem is copied in instead."""
        target = self.file_path(digest)
        if os.path.exists(target):
            os.unlink(path)
            return
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o444)
            os.fdatasync(fd)
            try:
                os.rename(path, target)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                self._copy_in(fd)
                os.unlink(path)
        finally:
            os.close(fd)
        self._new_files = True

    @functools.cached_property
    def placing(self) -> str:
        """How place() puts a large object for a script: "reflink" where files/
        shares blocks (tried on two unnamed files), else "link" for an ordinary
        user, else "copy" (root, whom permissions do not stop)."""
        with tempfile.TemporaryFile(dir=self.files) as a, \
                tempfile.TemporaryFile(dir=self.files) as b:
            a.write(b"probe")
            a.flush()
            try:
                fcntl.ioctl(b.fileno(), FICLONE, a.fileno())
                return "reflink"
            except OSError:
                return "link" if os.geteuid() != 0 else "copy"

    def place(self, digest: str, target: str) -> bool:
        """Put a large object at `target` for a script to read (its $INPUT_FILE)
        so that writing into it never changes the object: a reflink, a hard
        link to the read-only file (writes fail with EACCES) or a private copy
        made in the kernel, as `placing` says. False if the object is not a file."""
        source = self.file_path(digest)
        if not os.path.exists(source):  # a small object: one failed stat
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        if self.placing == "link":
            os.link(source, target)
            return True
        with open(source, "rb", buffering=0) as src, open(os.open(
                target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600),
                "wb", buffering=0) as dst:
            copy_file(src.fileno(), dst.fileno())  # a reflink where it can
        return True

    def _put_lmdb(self, digest: str, data: bytes) -> None:
        """An object under FILE_MIN_BYTES: held (with `hold`) until the next
        sync writes all held ones in one transaction, else written now."""
        with self._guard:
            if digest not in self._held:
                self._held[digest] = data
                self._held_bytes += len(data) + 256
            if not self.hold or self._held_bytes >= HOLD_MAX_BYTES:
                self._write_held()

    def _write_held(self) -> None:
        """Each held object, unless stored already: its chunks, then its header.
        Call with the guard held, so that readers find it in one place or the other."""
        def write(txn: object) -> None:
            for digest, data in self._held.items():
                key = bytes.fromhex(digest)
                if txn.get(key, db=self._objects) is None:  # type: ignore[attr-defined]
                    chunks = [data[i:i + CHUNK_SIZE]
                              for i in range(0, len(data), CHUNK_SIZE)] or [b""]
                    for i, chunk in enumerate(chunks):
                        txn.put(key + struct.pack(">I", i), chunk, db=self._chunks)  # type: ignore[attr-defined]
                    txn.put(key, HEADER.pack(len(data), len(chunks)), db=self._objects)  # type: ignore[attr-defined]

        if self._held:
            self._transact(write)
        self._held, self._held_bytes = {}, 0

    def small(self, digest: str) -> bytes | None:
        """A small object's bytes (held, or read in one transaction); None if
        it is not one (a file, or absent)."""
        digest_key = bytes.fromhex(digest)
        with self._guard:
            data = self._held.get(digest)
            if data is not None:
                return data
            with self._reader() as txn:
                header = txn.get(digest_key, db=self._objects)
                if header is None:
                    return None
                size, count, key = self._unpack(digest_key, header)
                if size >= FILE_MIN_BYTES:  # an older grit's large object
                    return None
                return b"".join(self._chunks_in(txn, key, 0, count, count))

    def open(self, digest: str) -> Iterator[bytes]:
        """The object's bytes, block by block. Raises KeyError if absent."""
        data = self.small(digest)
        if data is not None:
            return iter((data,))
        try:
            f = open(self.file_path(digest), "rb", buffering=0)
        except FileNotFoundError:
            _, count, key = self._header(digest)  # an older grit's large object, or KeyError
            return self._read_chunks(key, count)
        return self._read_file(f)

    @staticmethod
    def _read_file(f: IO[bytes]) -> Iterator[bytes]:
        with f:
            yield from iter(lambda: f.read(BLOCK_BYTES), b"")

    def size(self, digest: str) -> int:
        data = self._held.get(digest)
        if data is not None:
            return len(data)
        try:
            return self._header(digest)[0]
        except KeyError:
            try:
                return os.stat(self.file_path(digest)).st_size
            except FileNotFoundError:
                raise KeyError(digest) from None

    def read(self, digest: str, offset: int, size: int) -> bytes:
        """Up to `size` bytes of an object from `offset` (the FUSE server's
        reads of a gather task's inputs). Chunks of one object are all of its
        first chunk's length but the last."""
        with self._guard, self._reader() as txn:
            header = txn.get(bytes.fromhex(digest), db=self._objects)
            if header is None:
                with open(self.file_path(digest), "rb", buffering=0) as f:
                    return os.pread(f.fileno(), size, offset)
            total, count, key = self._unpack(bytes.fromhex(digest), header)
            if offset >= total:
                return b""
            first = txn.get(key + struct.pack(">I", 0), db=self._chunks)
            index, data = offset // len(first), bytearray()
            skip = offset - index * len(first)
            while len(data) < size + skip and index < count:
                chunk = first if index == 0 else txn.get(key + struct.pack(">I", index),
                                                        db=self._chunks)
                if chunk is None:
                    raise DamagedObject(f"object {digest} is missing chunk {index} of {count}")
                data += chunk
                index += 1
        return bytes(data[skip:skip + size])

    def _reader(self) -> object:
        """A read transaction; a read-only store adopts a map another process grew."""
        try:
            return self.env.begin()
        except self._lmdb.MapResizedError:
            self.env.set_mapsize(0)
            return self.env.begin()

    def _header(self, digest: str) -> tuple[int, int, bytes]:
        """(size, chunks, key of the chunks) of an LMDB object; KeyError if absent."""
        with self._guard, self._reader() as txn:
            header = txn.get(bytes.fromhex(digest), db=self._objects)
        if header is None:
            raise KeyError(digest)
        return self._unpack(bytes.fromhex(digest), header)

    @staticmethod
    def _unpack(key: bytes, header: bytes) -> tuple[int, int, bytes]:
        if len(header) == WRITTEN_HEADER.size:
            return WRITTEN_HEADER.unpack(header)
        return HEADER.unpack(header) + (key,)

    def _read_chunks(self, key: bytes, count: int) -> Iterator[bytes]:
        """A large object an older grit kept in LMDB, a few chunks per transaction."""
        per_txn = max(1, READ_BATCH_BYTES // CHUNK_SIZE)
        for first in range(0, count, per_txn):
            with self._guard, self._reader() as txn:
                batch = self._chunks_in(txn, key, first, min(count, first + per_txn), count)
            yield from batch

    def _chunks_in(self, txn: object, key: bytes, first: int, end: int, count: int) -> list[bytes]:
        chunks = [txn.get(key + struct.pack(">I", i), db=self._chunks)  # type: ignore[attr-defined]
                  for i in range(first, end)]
        if None in chunks:
            missing = first + chunks.index(None)
            raise DamagedObject(f"object {key.hex()} is missing chunk {missing} of {count}")
        return chunks

    def check(self, digest: str) -> str | None:
        """What is wrong with the stored object, or None if it matches its hash."""
        h = hashlib.sha256()
        try:
            for chunk in self.open(digest):
                h.update(chunk)
        except KeyError:
            return "is missing from the object store"
        except DamagedObject:
            return "is missing a chunk (content damaged)"
        except OSError as e:
            return f"cannot be read: {e.strerror or e} ({self.file_path(digest)})"
        if h.hexdigest() != digest:
            where = f" ({self.file_path(digest)})" if os.path.exists(self.file_path(digest)) else ""
            return f"does not match its hash (content damaged){where}"
        return None

    def free_bytes(self) -> int:
        """Bytes of the LMDB file that hold no data (free pages, unused tail)."""
        with self._guard, self._reader() as txn:
            stats = [self.env.stat()] + [txn.stat(db) for db in (self._objects, self._chunks)]
        used = 2 + sum(s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"] for s in stats)
        path = os.path.join(self.env.path(), "data.mdb")
        return max(0, os.path.getsize(path) - used * stats[0]["psize"])

    def hashes(self) -> set[str]:
        """Every object's hash, the key of LMDB chunks no object names (an older
        grit's write cut short) and the name of every other file in files/ (a
        copy cut short); delete() takes any of them."""
        objects, named, keys = set(), set(), set()
        with self._guard, self._reader() as txn:
            for key, header in txn.cursor(db=self._objects):
                objects.add(key)
                named.add(self._unpack(key, header)[2])
            for key in txn.cursor(db=self._chunks).iternext(keys=True, values=False):
                keys.add(key[:32])
        files = set(os.listdir(self.files)) if os.path.isdir(self.files) else set()
        return {k.hex() for k in objects | (keys - named)} | files

    def copy_compacted(self, target: str) -> None:
        """Write a copy of the LMDB store without its free pages into directory `target`."""
        self.env.copy(target, compact=True)

    def delete(self, name: str) -> None:
        """Remove an object, or what hashes() lists beside objects."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.files, name))
        if not re.fullmatch(r"[0-9a-f]{64}", name):
            return
        key = bytes.fromhex(name)

        def remove(txn: object) -> None:
            header = txn.get(key, db=self._objects)  # type: ignore[attr-defined]
            if header is not None:
                txn.delete(key, db=self._objects)  # type: ignore[attr-defined]
                self._delete_chunks(txn, self._unpack(key, header)[2])
            self._delete_chunks(txn, key)

        self._write(remove)

    def _delete_chunks(self, txn: object, key: bytes) -> None:
        cursor = txn.cursor(db=self._chunks)  # type: ignore[attr-defined]
        if cursor.set_range(key):
            while cursor.key()[:32] == key and cursor.delete():
                pass


# =============================================================================
# Metadata schema
# =============================================================================
# The SQLite schema of steps and their versions, tasks and resources, its
# migrations, and the small rules the queries share. Knows nothing of object bytes.

SCHEMA_VERSION = 10
# Every table and index of the current schema, by name: SCHEMA creates them
# all, and the migration that added one creates it from the same text.
DDL = {
    # One row per version of a step definition (script, inputs, files, gather). A
    # changed definition adds a version; old versions stay as history.
    "step": """CREATE TABLE step (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    version     INTEGER NOT NULL,
    script      TEXT NOT NULL,              -- "" for a source step
    inputs      TEXT NOT NULL,              -- JSON array of names/patterns; [] = seed or source
    files       TEXT,                       -- a source step's JSON array of file patterns
    created_at  TEXT NOT NULL,
    current     INTEGER NOT NULL DEFAULT 0, -- 1: what the last -run's manifest says this step is
    gather      INTEGER NOT NULL DEFAULT 0, -- 1: one task per distinct set of live inputs
    UNIQUE (name, version))""",
    # A named object: (name, hash) is unique, so producing it again makes nothing new.
    "resource": """CREATE TABLE resource (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    hash        TEXT NOT NULL,              -- SHA-256 of the content, lowercase hex
    size        INTEGER NOT NULL,
    task_id     INTEGER REFERENCES task(id),  -- the task that first produced it
    created_at  TEXT NOT NULL,
    deleted_at  TEXT,                       -- set by -delete/-prune: content gone, record kept
    live        INTEGER NOT NULL DEFAULT 0, -- 1: a clean run would make it (the live view)
    UNIQUE (name, hash))""",
    "resource_name": "CREATE INDEX resource_name ON resource(name)",  # name lookups in id order
    "resource_hash": "CREATE INDEX resource_hash ON resource(hash)",
    "resource_live": "CREATE INDEX resource_live ON resource(name) WHERE live = 1",
    # One unit of work: a step version applied to one input resource (NULL for a
    # seed, source or gather task). Outputs and status='done' commit in one transaction.
    "task": """CREATE TABLE task (
    id          INTEGER PRIMARY KEY,
    step_id     INTEGER NOT NULL REFERENCES step(id),
    input_resource_id INTEGER REFERENCES resource(id),
    run         INTEGER NOT NULL DEFAULT 0, -- a seed's run number (rerun = "always"), else 0
    status      TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'failed')),
    live        INTEGER NOT NULL DEFAULT 0, -- 1: current step version, live input (or newest seed run)
    exit_code   INTEGER,
    error       TEXT,                       -- why it failed: exit status, last line of stderr
    stdout_hash TEXT,                       -- objects holding its output, NULL when empty
    stderr_hash TEXT,
    started_at  TEXT,
    finished_at TEXT,
    duration    REAL,
    passes      TEXT,                       -- JSON {step name: times the chain of resources
                                            -- that led here passed through it, this task included}
    input_set   TEXT,                       -- a gather task: SHA-256 of the "name<TAB>hash<LF>"
                                            -- lines of its inputs, sorted (its identity)
    run_id      INTEGER,                    -- the run (run.id) that ran it last; NULL: before
                                            -- schema 10 (no index: one per task costs more
                                            -- than -trace's scan of the table)
    cpu_user    REAL,                       -- seconds of CPU its script's processes used;
    cpu_system  REAL,                       -- NULL: not measured (before schema 10)
    peak_rss    INTEGER,                    -- bytes: the largest resident set among them;
    rss_under   INTEGER,                    -- NULL: under rss_under bytes (grit's own peak)
    node        TEXT,                       -- the host (Slurm: node) it ran on
    UNIQUE (step_id, input_resource_id))""",
    # NULLs are distinct in UNIQUE, so seed tasks need their own rule: one per step
    # version and run.
    "task_seed": "CREATE UNIQUE INDEX task_seed ON task(step_id, run) "
                 "WHERE input_resource_id IS NULL AND input_set IS NULL",
    # A gather step version runs a set of inputs once.
    "task_gather": "CREATE UNIQUE INDEX task_gather ON task(step_id, input_set) "
                   "WHERE input_set IS NOT NULL",
    # Pending and failed tasks of a step, in id order, without reading its done ones.
    "task_status": "CREATE INDEX task_status ON task(step_id, status)",
    "task_input": "CREATE INDEX task_input ON task(input_resource_id)",  # a resource's consumers
    # Every resource every task emitted (a resource may come from several tasks:
    # dedup and early cutoff); a resource is live while a live task emits it.
    "emission": """CREATE TABLE emission (
    task_id     INTEGER NOT NULL REFERENCES task(id),
    resource_id INTEGER NOT NULL REFERENCES resource(id),
    PRIMARY KEY (task_id, resource_id)) WITHOUT ROWID""",
    "emission_resource": "CREATE INDEX emission_resource ON emission(resource_id)",
    # The inputs of each gather task.
    "gathered": """CREATE TABLE gathered (
    task_id     INTEGER NOT NULL REFERENCES task(id),
    resource_id INTEGER NOT NULL REFERENCES resource(id),
    PRIMARY KEY (task_id, resource_id)) WITHOUT ROWID""",
    "gathered_resource": "CREATE INDEX gathered_resource ON gathered(resource_id)",
    # The files a source step imported: a file whose stat signature is unchanged
    # is not read again.
    "source_file": """CREATE TABLE source_file (
    step        TEXT NOT NULL,              -- the source step's name
    path        TEXT NOT NULL,
    resource_id INTEGER NOT NULL REFERENCES resource(id),
    dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    PRIMARY KEY (step, path)) WITHOUT ROWID""",
    # -executor slurm's array jobs still to be finished with: a run after a kill -9
    # adopts them (section "Slurm executor").
    "slurm_job": """CREATE TABLE slurm_job (
    name        TEXT PRIMARY KEY,           -- its folder in the work dir, and its --comment
    folder      TEXT NOT NULL,              -- absolute path of that folder
    step        TEXT NOT NULL,
    slurm_id    TEXT,                       -- NULL until sbatch answered
    tasks       INTEGER NOT NULL,
    elements    INTEGER NOT NULL,
    queued      INTEGER NOT NULL DEFAULT 0, -- elements pending at the last squeue
    running     INTEGER NOT NULL DEFAULT 0, -- elements running at the last squeue
    submitted_at TEXT NOT NULL,
    looked_at   TEXT                        -- when squeue last answered for it
    )""",
    # A try of a task that failed and ran again in the same run (retries); the
    # task row holds its last try.
    "attempt": """CREATE TABLE attempt (
    task_id     INTEGER NOT NULL REFERENCES task(id),
    attempt     INTEGER NOT NULL,           -- 1, 2, ...: $GRIT_ATTEMPT of that try
    exit_code   INTEGER,
    error       TEXT NOT NULL,
    stdout_hash TEXT,
    stderr_hash TEXT,
    started_at  TEXT NOT NULL,
    duration    REAL NOT NULL,
    run_id      INTEGER,                    -- as in task
    cpu_user    REAL,
    cpu_system  REAL,
    peak_rss    INTEGER,
    rss_under   INTEGER,
    node        TEXT)""",
    "attempt_task": "CREATE INDEX attempt_task ON attempt(task_id)",
    # Every -run (not -dry-run): its counts are written as it ends, so a run
    # killed with -9 keeps finished_at NULL.
    "run": """CREATE TABLE run (
    id          INTEGER PRIMARY KEY,        -- N of -runs, -trace -run N, -report -run N
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    command     TEXT NOT NULL,              -- JSON array: grit's arguments
    executor    TEXT NOT NULL,
    output_mode TEXT NOT NULL,              -- fuse or dir where known, else as asked
    started     INTEGER NOT NULL DEFAULT 0, -- tasks handed to the executor
    done        INTEGER NOT NULL DEFAULT 0,
    failed      INTEGER NOT NULL DEFAULT 0,
    known       INTEGER NOT NULL DEFAULT 0, -- outputs already known: early cutoff, no work after
    resources   INTEGER NOT NULL DEFAULT 0, -- resources created
    exit_status INTEGER,                    -- NULL while running, or killed
    interrupted INTEGER NOT NULL DEFAULT 0)"""}
SCHEMA = "".join(f"{statement};\n" for statement in DDL.values())
# Statements that bring a database of schema N to N + 1.
MIGRATIONS = {1: ["ALTER TABLE resource ADD COLUMN deleted_at TEXT"],
              2: ["ALTER TABLE task ADD COLUMN passes TEXT"],
              3: ["ALTER TABLE step ADD COLUMN files TEXT",
                  "ALTER TABLE step ADD COLUMN current INTEGER NOT NULL DEFAULT 0",
                  "ALTER TABLE resource ADD COLUMN live INTEGER NOT NULL DEFAULT 0",
                  "ALTER TABLE task ADD COLUMN run INTEGER NOT NULL DEFAULT 0",
                  "ALTER TABLE task ADD COLUMN live INTEGER NOT NULL DEFAULT 0",
                  "DROP INDEX task_seed",  # schema 3's form: no gather tasks yet
                  "CREATE UNIQUE INDEX task_seed ON task(step_id, run) "
                  "WHERE input_resource_id IS NULL",
                  DDL["task_input"], DDL["resource_live"], DDL["emission"],
                  DDL["emission_resource"], DDL["source_file"],
                  # what was known of emissions: each resource's first producer
                  "INSERT INTO emission SELECT task_id, id FROM resource WHERE task_id IS NOT NULL",
                  "UPDATE step SET current = (version = (SELECT max(version) FROM step s "
                  "WHERE s.name = step.name))"],
              4: ["ALTER TABLE step ADD COLUMN gather INTEGER NOT NULL DEFAULT 0",
                  "ALTER TABLE task ADD COLUMN input_set TEXT",
                  "DROP INDEX task_seed", DDL["task_seed"], DDL["task_gather"],
                  DDL["gathered"], DDL["gathered_resource"]],
              5: [DDL["slurm_job"]],
              # No SQL: schema 7 marks the object store's second header form
              # (large objects written as they arrived), which a grit of schema
              # 6 cannot read; schema 8 large objects as files in files/, which
              # a grit of schema 7 cannot find.
              6: [], 7: [],
              # slurm_job made anew (schema 5's step makes today's form)
              8: ["ALTER TABLE slurm_job RENAME TO slurm_job_8", DDL["slurm_job"],
                  "INSERT INTO slurm_job (name, folder, step, slurm_id, tasks, elements, queued, "
                  "running, submitted_at) SELECT name, folder, step, slurm_id, tasks, elements, "
                  "queued, running, submitted_at FROM slurm_job_8", "DROP TABLE slurm_job_8",
                  # the attempt table of schema 9; schema 10 adds its last six columns
                  DDL["attempt"].split(",\n    run_id")[0] + ")", DDL["attempt_task"]],
              9: [f"ALTER TABLE {table} ADD COLUMN {column}" for table in ("task", "attempt")
                  for column in ("run_id INTEGER", "cpu_user REAL", "cpu_system REAL",
                                 "peak_rss INTEGER", "rss_under INTEGER", "node TEXT")]
              + [DDL["run"]]}
# Schemas before 4 had no live view: it is computed once, after the upgrade.
LIVE_VIEW_SINCE = 4

# What a task used and where (task and attempt tables), as TaskResult names them.
USAGE_COLUMNS = ("run_id", "cpu_user", "cpu_system", "peak_rss", "rss_under", "node")
# -trace's columns, in order (Metadata.trace).
TRACE_COLUMNS = ("task", "step", "version", "input", "status", "attempt", "exit", "error",
                 "started", "wall", "cpu_user", "cpu_system", "rss", "rss_under", "node",
                 "bytes_in", "bytes_out")

# A file's stat signature (dev, ino, size, mtime_ns, ctime_ns), packed: 73 bytes
# a file where a tuple of five ints takes 220 (50,000 source files: 11 MB less).
SIGNATURE = struct.Struct("<QQQqq")


@contextlib.contextmanager
def sql_transaction(db: sqlite3.Connection, commit: bool = True) -> Iterator[None]:
    """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on an exception (or always, for
    a dry run: commit=False)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT" if commit else "ROLLBACK")


_SECOND: list[tuple[int, str]] = [(0, "")]  # the last second formatted, kept: 3 calls a task


def utc_now() -> str:
    t = time.time()
    second, text = _SECOND[0]
    if int(t) != second:
        second, text = int(t), time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
        _SECOND[0] = second, text
    return f"{text}.{int(t % 1 * 1000):03d}Z"


def parse_utc(text: str) -> float:
    """Seconds since the epoch of a utc_now() text."""
    import calendar
    return calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")) + float(text[19:-1] or 0)


@functools.lru_cache(maxsize=1024)
def passes_through(passes: str | None, step_name: str) -> int:
    """The how-manieth time a task's chain reaches its step (1: the first)."""
    return json.loads(passes).get(step_name, 1) if passes else 1


@functools.lru_cache(maxsize=1024)
def one_more_pass(passes: str | None, step_name: str) -> str:
    """The passes (JSON, see the task table) of a task of `step_name` whose input
    was made by a task with `passes`."""
    counts = json.loads(passes) if passes else {}
    counts[step_name] = counts.get(step_name, 0) + 1
    return json.dumps(counts, separators=(",", ":"))


# =============================================================================
# Live view
# =============================================================================
# Which tasks and resources are live: what a clean run on the current manifest
# and files would make. Kept incrementally in the metadata's own connection
# and transaction; knows the schema, nothing of objects or processes.

@dataclass
class Consumer:
    """A current step version with inputs: the tasks a live resource gets."""

    step_id: int
    name: str
    inputs: tuple[str, ...]


@dataclass
class Gathering:
    """What settling a gather step found: how many live inputs, and whether
    their set is the one its live task has (unchanged), one it ran or tried
    before (seen before), a new one, or empty (no inputs)."""

    inputs: int
    outcome: str
    task_id: int | None = None


GATHER_TEXT = {"new": "a new set of inputs", "unchanged": "its inputs have not changed",
               "seen before": "a set of inputs it ran before (its results come back)",
               "no inputs": "no inputs",
               "waiting": "waiting for upstream: it runs once the steps before it are done, "
                          "over what they leave live"}


def input_set_key(pairs: Iterable[tuple[str, str]]) -> str:
    """A gather task's identity: SHA-256 of its inputs' sorted name<TAB>hash lines."""
    h = hashlib.sha256()
    for batch in iter(lambda it=iter(pairs): list(itertools.islice(it, 1000)), []):
        h.update("".join(f"{name}\t{digest}\n" for name, digest in batch)
                 .encode("utf-8", "surrogateescape"))
    return h.hexdigest()


class LiveView:
    """Keeps task.live and resource.live true to the rule: a seed's newest run
    and a source's current files are live; a task of a current step version is
    live while its input is; a resource is live while a live task emits it.

    A resource that becomes live makes (or revives) the tasks of current
    versions that match it, so nothing is found by scanning. Retiring is
    delete and re-derive: everything that depended on what went is retired,
    then what is still emitted by a live task comes back. Both cost what they
    touch, and a cycle cannot keep itself alive. A gather step's live task is
    the one for its inputs' set when the run last reached it (settle).
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.new_tasks: collections.Counter = collections.Counter()  # step id -> made since taken
        self.retired_tasks: set[int] = set()  # retired since taken (a run drops them if queued)
        self.load_steps()

    def load_steps(self) -> None:
        """Read the current step versions (after registration changes them)."""
        rows = self.db.execute("SELECT id, name, inputs FROM step WHERE current = 1 "
                               "AND inputs != '[]' AND gather = 0").fetchall()
        self.exact: dict[str, list[Consumer]] = collections.defaultdict(list)
        self.patterned: list[Consumer] = []
        for step_id, name, inputs in rows:
            consumer = Consumer(step_id, name, tuple(json.loads(inputs)))
            for pattern in consumer.inputs:
                if is_pattern(pattern):
                    self.patterned.append(consumer)
                    break
            else:
                for exact in consumer.inputs:
                    self.exact[exact].append(consumer)

    def emitted(self, task_id: int) -> list[int]:
        return [r for (r,) in self.db.execute("SELECT resource_id FROM emission WHERE task_id = ?",
                                              (task_id,))]

    # -- becoming live -----------------------------------------------------------

    def make_live(self, resource_ids: Iterable[int]) -> None:
        """These resources are emitted by a live task now: they, and what
        depends on them, are live."""
        stack = list(resource_ids)
        while stack:
            rid = stack.pop()
            name, live, producer, deleted = self.db.execute(
                "SELECT name, live, task_id, deleted_at FROM resource WHERE id = ?",
                (rid,)).fetchone()
            if not live:
                self.db.execute("UPDATE resource SET live = 1 WHERE id = ?", (rid,))
                if not deleted:  # no task reads a resource whose content -delete removed
                    stack.extend(self.spread(rid, name, producer))

    def spread(self, rid: int, name: str, producer: int | None) -> list[int]:
        """Give a newly live resource its tasks in every current version that
        matches it; returns what revived done tasks emitted (live in turn)."""
        consumers = self.exact.get(name, []) + [c for c in self.patterned
                                                if input_matcher(c.inputs)(name)]
        passes = self.passes_of(producer) if consumers else None
        return [r for consumer in consumers for r in self.task_for(consumer, rid, passes)]

    def passes_of(self, task_id: int | None) -> str | None:
        row = self.db.execute("SELECT passes FROM task WHERE id = ?",
                              (task_id,)).fetchone() if task_id else None
        return row[0] if row else None

    def task_for(self, consumer: Consumer, rid: int, passes: str | None) -> list[int]:
        """The live task of `consumer` on resource `rid`: made, or revived (then
        what it emitted, if it is done)."""
        made = self.db.execute(
            "INSERT OR IGNORE INTO task (step_id, input_resource_id, passes, live) "
            "VALUES (?, ?, ?, 1)", (consumer.step_id, rid,
                                    one_more_pass(passes, consumer.name))).rowcount
        if made:
            self.new_tasks[consumer.step_id] += 1
            return []
        task_id, live, status = self.db.execute(
            "SELECT id, live, status FROM task WHERE step_id = ? AND input_resource_id = ?",
            (consumer.step_id, rid)).fetchone()
        if live:
            return []
        return self.revive(task_id, consumer.step_id, status)

    def revive(self, task_id: int, step_id: int, status: str) -> list[int]:
        """A task is live again: what it emitted, if it is done and all of that
        is still stored; otherwise it is to run (again)."""
        self.db.execute("UPDATE task SET live = 1 WHERE id = ?", (task_id,))
        if status == "done" and not self.db.execute(
                "SELECT 1 FROM emission e JOIN resource r ON r.id = e.resource_id WHERE "
                "e.task_id = ? AND r.deleted_at IS NOT NULL LIMIT 1", (task_id,)).fetchone():
            return self.emitted(task_id)
        if status == "done":  # -gc -retired deleted some of its outputs: make them again
            self.db.execute("UPDATE task SET status = 'pending' WHERE id = ?", (task_id,))
        self.new_tasks[step_id] += 1
        return []

    # -- retiring ------------------------------------------------------------------

    def retire(self, tasks: Iterable[int] = (), emissions: Iterable[tuple[int, int]] = ()) -> None:
        """Tasks no longer live (an old version, a replaced seed run) and
        emissions that no longer hold (a source's changed or gone file), with
        everything that depended only on them."""
        doubtful: list[int] = []
        for task_id in tasks:
            self.db.execute("UPDATE task SET live = 0 WHERE id = ?", (task_id,))
            doubtful += self.emitted(task_id)
        for task_id, rid in emissions:
            self.db.execute("DELETE FROM emission WHERE task_id = ? AND resource_id = ?",
                            (task_id, rid))
            doubtful.append(rid)
        gone_resources, gone_tasks = self.reachable(doubtful)
        self.db.executemany("UPDATE resource SET live = 0 WHERE id = ?",
                            ((r,) for r in gone_resources))
        self.db.executemany("UPDATE task SET live = 0 WHERE id = ?", ((t,) for t in gone_tasks))
        self.retired_tasks |= gone_tasks
        # Re-derive: what a live task outside the retired part still emits stays.
        still = [r for r in gone_resources if self.db.execute(
            "SELECT 1 FROM emission e JOIN task t ON t.id = e.task_id WHERE e.resource_id = ? "
            "AND t.live = 1 AND t.status = 'done' LIMIT 1", (r,)).fetchone()]
        self.make_live(still)

    def reachable(self, resources: list[int]) -> tuple[set[int], set[int]]:
        """The live resources among these and every live task and resource that
        depends on them, following inputs and emissions."""
        gone_resources: set[int] = set()
        gone_tasks: set[int] = set()
        stack = list(resources)
        while stack:
            rid = stack.pop()
            if rid in gone_resources or not self.db.execute(
                    "SELECT live FROM resource WHERE id = ?", (rid,)).fetchone()[0]:
                continue
            gone_resources.add(rid)
            for task_id, status in self.db.execute(
                    "SELECT id, status FROM task WHERE input_resource_id = ? AND live = 1",
                    (rid,)).fetchall():
                gone_tasks.add(task_id)
                if status == "done":
                    stack += self.emitted(task_id)
        return gone_resources, gone_tasks

    # -- whole steps ---------------------------------------------------------------

    def adopt(self, step_id: int) -> None:
        """A step version just became current: its root task (a seed's or a
        source's) is live, and it has a live task for every live resource its
        inputs match (made, or revived when it ran before)."""
        inputs, gather = self.db.execute("SELECT inputs, gather FROM step WHERE id = ?",
                                         (step_id,)).fetchone()
        inputs = json.loads(inputs)
        if gather:  # its task comes when the run reaches it (settle)
            return
        if not inputs:  # its newest successful run, and a newer one still to run
            for done in ("status = 'done'", "status != 'done'"):
                for task_id, status in self.db.execute(
                        "SELECT id, status FROM task WHERE step_id = ? AND input_resource_id IS "
                        f"NULL AND {done} ORDER BY run DESC LIMIT 1", (step_id,)).fetchall():
                    self.make_live(self.revive(task_id, step_id, status))
            return
        name = self.db.execute("SELECT name FROM step WHERE id = ?", (step_id,)).fetchone()[0]
        consumer = Consumer(step_id, name, tuple(inputs))
        live = "live = 1 AND deleted_at IS NULL"
        rows = self.db.execute(f"SELECT id, name, task_id FROM resource WHERE {live}").fetchall() \
            if any(map(is_pattern, inputs)) else self.db.execute(
            f"SELECT id, name, task_id FROM resource WHERE {live} AND name IN (%s)"
            % ",".join("?" * len(inputs)), inputs).fetchall()
        self.make_live([r for rid, rname, producer in rows if matches_inputs(rname, inputs)
                        for r in self.task_for(consumer, rid, self.passes_of(producer))])

    def recompute(self) -> None:
        """The whole live view from the roots (after an upgrade from a schema
        without one): cost proportional to the database, once. Adopting the
        seeds and sources reaches every current step through make_live."""
        self.db.execute("UPDATE task SET live = 0")
        self.db.execute("UPDATE resource SET live = 0 WHERE live = 1")
        for (step_id,) in self.db.execute("SELECT id FROM step WHERE current = 1 AND "
                                          "inputs = '[]' ORDER BY id").fetchall():
            self.adopt(step_id)

    # -- gather steps ----------------------------------------------------------------

    def gather_set(self, inputs: Sequence[str]) -> list[tuple[int, str, str]]:
        """(id, name, hash) of the live resources `inputs` match, by name and hash."""
        live = "SELECT id, name, hash FROM resource WHERE live = 1 AND deleted_at IS NULL"
        prefixes = sorted({literal_prefix(p) for p in inputs})
        if "" in prefixes:  # a pattern such as "*.txt": every live resource is a candidate
            ranges, where = [()], ""
        else:  # only the names that start like an input (the live index, by range)
            ranges, where = [(p, p + "\U0010ffff") for p in prefixes], " AND name >= ? AND name < ?"
        match = input_matcher(tuple(inputs))
        found = [r for bounds in ranges
                 for r in self.db.execute(f"{live}{where} ORDER BY name, hash", bounds)
                 if match(r[1])]
        if len(ranges) > 1:  # one prefix may start another's: each resource once, in order
            found = sorted(set(found), key=lambda r: (r[1], r[2]))
        return found

    def current_set(self, inputs: Sequence[str]) -> tuple[list[tuple[int, str, str]], str | None]:
        """The live resources `inputs` match now, and their set's key (None if none)."""
        found = self.gather_set(inputs)
        return found, input_set_key((n, h) for _, n, h in found) if found else None

    def settle(self, step: Consumer) -> Gathering:
        """Make a gather step version's live task the one for the set of live
        resources its inputs match now: kept; found again (done: its outputs
        are live again, else it is to run); or made. The task it replaces
        retires, with what its outputs led to."""
        found, key = self.current_set(step.inputs)
        live = self.db.execute("SELECT id, input_set FROM task WHERE step_id = ? AND live = 1",
                               (step.step_id,)).fetchone()
        if live and live[1] == key:
            return Gathering(len(found), "unchanged", live[0])
        if live:
            self.retire(tasks=[live[0]])
        if key is None:
            return Gathering(0, "no inputs")
        cur = self.db.execute("INSERT OR IGNORE INTO task (step_id, input_set, passes, live) "
                              "VALUES (?, ?, ?, 1)",
                              (step.step_id, key, one_more_pass(None, step.name)))
        if cur.rowcount:
            self.db.executemany("INSERT INTO gathered VALUES (?, ?)",
                                ((cur.lastrowid, r[0]) for r in found))
            self.new_tasks[step.step_id] += 1
            return Gathering(len(found), "new", cur.lastrowid)
        task_id, status = self.db.execute("SELECT id, status FROM task WHERE step_id = ? AND "
                                          "input_set = ?", (step.step_id, key)).fetchone()
        self.make_live(self.revive(task_id, step.step_id, status))
        return Gathering(len(found), "seen before", task_id)

    def take_new_tasks(self) -> tuple[collections.Counter, set[int]]:
        """Tasks made (or revived) to run since the last call, per step id, and
        the ids of tasks retired meanwhile (those still live are left out)."""
        made, self.new_tasks = self.new_tasks, collections.Counter()
        retired, self.retired_tasks = self.retired_tasks, set()
        return made, {t for t in retired if not self.db.execute(
            "SELECT live FROM task WHERE id = ?", (t,)).fetchone()[0]}


# =============================================================================
# Metadata store (SQLite)
# =============================================================================
# Every query of the metadata: steps and versions, tasks, resources, sources,
# and what the inspecting commands read. All of grit's SQL is in this section
# and the two above it. Knows nothing of object bytes.

class Metadata:
    """Steps, tasks and resources in SQLite. Knows nothing of object bytes."""

    def __init__(self, path: str, readonly: bool = False) -> None:
        if sqlite3.sqlite_version_info < (3, 24):  # ON CONFLICT ... DO UPDATE
            raise GritError(f"this Python's SQLite is {sqlite3.sqlite_version}; grit needs "
                            "3.24 or newer")
        self.path = path
        try:
            if readonly:
                self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                          isolation_level=None, check_same_thread=False)
            else:
                self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode: a power cut may lose the last commits but
                # never corrupts; lost tasks simply run again.
                self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA busy_timeout=5000")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate(readonly)
            self.live = LiveView(self.db)
            self.run_id: int | None = None  # the -run whose tasks record() records
        except sqlite3.DatabaseError as e:
            raise GritError(f"cannot use metadata database {path}: {e}") from None

    def _migrate(self, readonly: bool) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise GritError(f"database schema {version} is newer than this grit "
                            f"({__version__}, schema {SCHEMA_VERSION}): upgrade grit")
        tables = self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if version == 0 and tables == 0 and not readonly:
            with self.transaction():
                self.db.executescript("BEGIN;" + SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION};")
            return
        if version not in MIGRATIONS:
            raise GritError("not a grit database (unknown schema)")
        # An older grit's database: upgrade it in place (a read-only command
        # too, through a connection of its own), in one transaction.
        db = sqlite3.connect(self.path, isolation_level=None) if readonly else self.db
        with sql_transaction(db):
            for v in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[v]:
                    db.execute(statement)
            if version < LIVE_VIEW_SINCE:
                LiveView(db).recompute()
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        if readonly:
            db.close()

    @classmethod
    def copy_of(cls, path: str) -> "Metadata":
        """A private copy in memory of the metadata at `path` (empty when there
        is none), upgraded like the real one: what -dry-run changes and forgets."""
        meta = cls(":memory:")
        if os.path.isfile(path):
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as source:
                source.backup(meta.db)  # a file that is no database: "database error: …"
            meta._migrate(readonly=False)
            meta.live = LiveView(meta.db)
        return meta

    def close(self) -> None:
        self.db.close()

    def transaction(self, commit: bool = True) -> contextlib.AbstractContextManager:
        """BEGIN IMMEDIATE … COMMIT; commit=False rolls back (a dry run)."""
        return sql_transaction(self.db, commit)

    def integrity_problems(self) -> list[str]:
        """What SQLite's integrity and foreign key checks find, one line each."""
        problems = [row[0] for row in self.db.execute("PRAGMA integrity_check") if row[0] != "ok"]
        return problems + [f"{table} row {rowid} refers to a missing {parent}" for table, rowid,
                           parent, _ in self.db.execute("PRAGMA foreign_key_check")]

    # -- steps ---------------------------------------------------------------

    def register(self, definitions: Sequence[StepDef]) -> list[StepVersion]:
        """Make these the current steps: a new version for each changed
        definition, and the live view follows (in one transaction): the tasks of
        versions no longer current retire, versions that became current adopt
        what is live."""
        with self.transaction():
            versions = [self._register(d) for d in definitions]
            ids = [v.id for v in versions]
            marks = ",".join("?" * len(ids))
            retired = [r[0] for r in self.db.execute(
                f"SELECT id FROM step WHERE current = 1 AND id NOT IN ({marks})", ids)]
            adopted = [r[0] for r in self.db.execute(
                f"SELECT id FROM step WHERE current = 0 AND id IN ({marks}) ORDER BY id", ids)]
            self.db.execute(f"UPDATE step SET current = (id IN ({marks}))", ids)
            self.live.load_steps()
            for step_id in retired:
                self.live.retire(tasks=[r[0] for r in self.db.execute(
                    "SELECT id FROM task WHERE step_id = ? AND live = 1", (step_id,))])
            for step_id in adopted:
                self.live.adopt(step_id)
        return versions

    def _register(self, definition: StepDef) -> StepVersion:
        """The step's newest stored version if it has this definition (script,
        inputs, files, gather), else a new version: the rule for new versions."""
        stored = (definition.script, json.dumps(list(definition.inputs)),
                  json.dumps(list(definition.files)) if definition.files else None,
                  int(definition.gather))
        row = self.db.execute("SELECT id, version, script, inputs, files, gather FROM step "
                              "WHERE name = ? ORDER BY version DESC LIMIT 1",
                              (definition.name,)).fetchone()
        if row and tuple(row[2:]) == stored:
            return StepVersion(row[0], definition, row[1])
        version = row[1] + 1 if row else 1
        step_id = self.db.execute(
            "INSERT INTO step (name, version, script, inputs, files, gather, created_at) "
            "VALUES (?,?,?,?,?,?,?)", (definition.name, version, *stored, utc_now())).lastrowid
        if definition.is_seed:  # a source's one task is done at once: it runs no script
            self.db.execute("INSERT INTO task (step_id, status) VALUES (?, ?)",
                            (step_id, "done" if definition.files else "pending"))
        return StepVersion(step_id, definition, version, is_new=True)

    def rerun_seed(self, step: StepVersion) -> bool:
        """A seed with rerun = "always": a new run (task) of it, unless one is
        still to run. Its previous run's outputs stay live until it succeeds."""
        if self.db.execute("SELECT 1 FROM task WHERE step_id = ? AND input_resource_id IS NULL "
                           "AND status != 'done'", (step.id,)).fetchone():
            return False
        with self.transaction():
            self.db.execute("INSERT INTO task (step_id, run, live) SELECT ?, max(run) + 1, 1 "
                            "FROM task WHERE step_id = ?", (step.id, step.id))
        return True

    def retry_failed(self, step_id: int) -> int:
        """Failed live tasks of a step version are to run again (a failed task
        whose input is no longer live is not: a clean run would not have it)."""
        return self.db.execute("UPDATE task SET status = 'pending' WHERE step_id = ? "
                               "AND status = 'failed' AND live = 1", (step_id,)).rowcount

    def count_tasks(self, step_id: int, status: str) -> int:
        """Live tasks of a step version in that status."""
        return self.db.execute("SELECT count(*) FROM task WHERE step_id = ? AND status = ? "
                               "AND live = 1", (step_id, status)).fetchone()[0]

    def pending_among(self, task_ids: Iterable[int]) -> set[int]:
        """Those of these tasks that are pending."""
        ids = list(task_ids)
        return {row[0] for i in range(0, len(ids), 500) for row in self.db.execute(
            f"SELECT id FROM task WHERE status = 'pending' AND id IN "
            f"({','.join('?' * len(ids[i:i + 500]))})", ids[i:i + 500])}

    def has_tasks(self, step_id: int) -> bool:
        return self.db.execute("SELECT 1 FROM task WHERE step_id = ? LIMIT 1",
                               (step_id,)).fetchone() is not None

    def steps_pending(self, exclude: Sequence[int]) -> list[str]:
        """Current steps, other than these step ids, with live tasks to run."""
        marks = ",".join("?" * len(exclude))
        return [r[0] for r in self.db.execute(
            "SELECT DISTINCT s.name FROM step s JOIN task t ON t.step_id = s.id WHERE "
            f"s.current = 1 AND t.live = 1 AND t.status = 'pending' AND s.id NOT IN ({marks}) "
            "ORDER BY s.id", list(exclude))]

    def names_produced_by(self, step_name: str) -> set[str]:
        rows = self.db.execute(
            "SELECT DISTINCT r.name FROM resource r JOIN task t ON t.id = r.task_id "
            "JOIN step s ON s.id = t.step_id WHERE s.name = ?", (step_name,))
        return {r[0] for r in rows}

    # -- scheduling ----------------------------------------------------------

    def pending(self, step: StepVersion, after_task_id: int, limit: int) -> list[TaskSpec]:
        rows = self.db.execute(
            "SELECT t.id, r.name, r.hash, t.passes FROM task t LEFT JOIN resource r "
            "ON r.id = t.input_resource_id WHERE t.step_id = ? AND t.status = 'pending' "
            "AND t.live = 1 AND t.id > ? ORDER BY t.id LIMIT ?",
            (step.id, after_task_id, limit)).fetchall()
        since = self.previous_start(step.name) if step.definition.is_seed else ""
        return [TaskSpec(tid, step.name, step.definition.script, name or "", digest or "",
                         step.definition.timeout, since,
                         passes_through(passes, step.name),
                         self.gathered(tid) if step.definition.gather else None,
                         step.definition.cpus)
                for tid, name, digest, passes in rows]

    def gathered(self, task_id: int) -> list[Output]:
        """A gather task's inputs, by name and hash."""
        return [Output(*row) for row in self.db.execute(
            "SELECT r.name, r.hash, r.size FROM gathered g JOIN resource r ON r.id = g.resource_id "
            "WHERE g.task_id = ? ORDER BY r.name, r.hash", (task_id,))]

    def settle(self, step: StepVersion) -> Gathering:
        """A gather step version's task for its live inputs now (see LiveView.settle)."""
        with self.transaction():
            return self.live.settle(Consumer(step.id, step.name, step.definition.inputs))

    def previous_start(self, step_name: str) -> str:
        """When the last successful task of any version of a step started: a
        seed can pick up only the files changed since then. It comes from the
        database, so it moves only when that task's outputs are committed."""
        row = self.db.execute(
            "SELECT max(t.started_at) FROM task t JOIN step s ON s.id = t.step_id "
            "WHERE s.name = ? AND t.status = 'done'", (step_name,)).fetchone()
        return row[0] or ""

    def record(self, result: TaskResult) -> int:
        """Store a finished task and what it emitted; returns resources created.
        A live task's outputs are live and get their tasks; a seed run that
        succeeds retires the run before it. Call inside a transaction, so that
        all of it commits together."""
        self.db.execute(
            "UPDATE task SET status = ?, exit_code = ?, error = ?, stdout_hash = ?, "
            "stderr_hash = ?, started_at = ?, finished_at = ?, duration = ?, run_id = ?, "
            "cpu_user = ?, cpu_system = ?, peak_rss = ?, rss_under = ?, node = ? WHERE id = ?",
            ("done" if result.ok else "failed", result.exit_code, result.error,
             result.stdout_hash, result.stderr_hash, result.started_at, utc_now(),
             result.duration, self.run_id, result.cpu_user, result.cpu_system,
             result.peak_rss, result.rss_under, result.node or None, result.task_id))
        if not result.ok:
            return 0
        live, step_id, input_id = self.db.execute(
            "SELECT live, step_id, input_resource_id FROM task WHERE id = ?",
            (result.task_id,)).fetchone()
        created = self.emit(result.task_id, result.outputs, live)
        if live and input_id is None:  # done before the older run retires, so what it
            self.live.retire(tasks=[r[0] for r in self.db.execute(  # re-emitted stays
                "SELECT id FROM task WHERE step_id = ? AND input_resource_id IS NULL "
                "AND live = 1 AND status = 'done' AND id != ?", (step_id, result.task_id))])
        return created

    def record_attempt(self, result: TaskResult, attempt: int) -> None:
        """A failed try of a task that runs again."""
        self.db.execute("INSERT INTO attempt VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (result.task_id, attempt, result.exit_code, result.error or "",
                         result.stdout_hash, result.stderr_hash, result.started_at,
                         result.duration, self.run_id, result.cpu_user, result.cpu_system,
                         result.peak_rss, result.rss_under, result.node or None))

    def attempts(self, task_id: int) -> list[dict]:
        """A task's failed tries before its last, oldest first."""
        columns = ("attempt", "exit_code", "error", "stdout_hash", "stderr_hash", "started_at",
                   "duration") + USAGE_COLUMNS
        return [dict(zip(columns, row)) for row in self.db.execute(
            f"SELECT {', '.join(columns)} FROM attempt WHERE task_id = ? ORDER BY rowid",
            (task_id,))]

    def emit(self, task_id: int, outputs: Iterable[Output], live: int) -> int:
        """Record what a task emitted; a live task's outputs are live and get
        their tasks. Returns the resources created (or back after -delete)."""
        created = 0
        revive: list[int] = []
        for out in outputs:
            rid, inserted, new = self._emit(task_id, out, live)
            created += new
            if live and inserted:  # live already: its tasks come next
                revive += self.live.spread(rid, out.name, task_id)
            elif live and new:  # back after -delete: it gets the tasks it missed meanwhile
                revive += self.live.spread(rid, out.name, task_id)
                revive.append(rid)
            elif live:
                revive.append(rid)  # made before: live again if it was not
        self.live.make_live(revive)
        return created

    def _emit(self, task_id: int, out: Output, live: int) -> tuple[int, bool, int]:
        """Record that a task emitted `out`: (resource id, whether this inserted
        it (live with a live task), 1 if it is new or back after -delete)."""
        cur = self.db.execute("INSERT OR IGNORE INTO resource (name, hash, size, task_id, "
                              "created_at, live) VALUES (?,?,?,?,?,?)",
                              (out.name, out.hash, out.size, task_id, utc_now(), live))
        inserted = cur.rowcount == 1
        if inserted:
            rid, new = cur.lastrowid, 1
        else:
            rid, deleted = self.db.execute("SELECT id, deleted_at FROM resource WHERE name = ? "
                                           "AND hash = ?", (out.name, out.hash)).fetchone()
            new = 0
            if deleted:  # made again after -delete: visible again, with its content
                self.db.execute("UPDATE resource SET deleted_at = NULL WHERE id = ?", (rid,))
                new = 1
        self.db.execute("INSERT OR IGNORE INTO emission VALUES (?, ?)", (task_id, rid))
        return rid, inserted, new

    # -- source steps ------------------------------------------------------------

    def source_task(self, step_id: int) -> tuple[int, bool]:
        """A source step version's one task, and whether it emitted anything yet."""
        task_id = self.db.execute("SELECT id FROM task WHERE step_id = ? AND "
                                  "input_resource_id IS NULL", (step_id,)).fetchone()[0]
        return task_id, self.db.execute("SELECT 1 FROM emission WHERE task_id = ? LIMIT 1",
                                        (task_id,)).fetchone() is not None

    def source_files(self, step_name: str, chunk: int = 1000
                     ) -> Iterator[tuple[str, int, bytes]]:
        """(path, resource id, stat signature) of each file the step imported,
        in path order, read `chunk` rows at a time past the last path read:
        the caller may write rows at or before that path meanwhile."""
        after = ""
        while True:
            rows = self.db.execute(
                "SELECT path, resource_id, dev, ino, size, mtime_ns, ctime_ns FROM source_file "
                "WHERE step = ? AND path > ? ORDER BY path LIMIT ?",
                (step_name, after, chunk)).fetchall()
            yield from ((path, rid, SIGNATURE.pack(*sig)) for path, rid, *sig in rows)
            if len(rows) < chunk:
                return
            after = rows[-1][0]

    def count_source_files(self, step_names: list[str]) -> int:
        """Files these source steps imported, as their last scan left them."""
        marks = ", ".join("?" * len(step_names))
        return self.db.execute(f"SELECT count(*) FROM source_file WHERE step IN ({marks})",
                               step_names).fetchone()[0]

    def resource_id(self, name: str, digest: str) -> int | None:
        row = self.db.execute("SELECT id FROM resource WHERE name = ? AND hash = ?",
                              (name, digest)).fetchone()
        return row[0] if row else None

    def output_of(self, resource_id: int) -> Output:
        return Output(*self.db.execute("SELECT name, hash, size FROM resource WHERE id = ?",
                                       (resource_id,)).fetchone())

    def set_source_file(self, step_name: str, path: str, resource_id: int, sig: bytes) -> None:
        self.db.execute("INSERT OR REPLACE INTO source_file VALUES (?,?,?,?,?,?,?,?)",
                        (step_name, path, resource_id, *SIGNATURE.unpack(sig)))

    def drop_source_file(self, step_name: str, path: str) -> None:
        self.db.execute("DELETE FROM source_file WHERE step = ? AND path = ?", (step_name, path))

    # -- export, inspection and data management ------------------------------

    def _resources(self, where: str, *params: object) -> list[dict]:
        """Resources as dicts (the shape -json shows), selected by a WHERE clause."""
        rows = self.db.execute("SELECT id, name, hash, size, task_id, created_at, deleted_at, "
                               f"live = 1 FROM resource WHERE {where}", params).fetchall()
        keys = ("id", "name", "hash", "size", "task", "created_at", "deleted_at")
        return [{**dict(zip(keys, row)), "live": bool(row[-1])} for row in rows]

    def retired_resources(self) -> list[dict]:
        """Resources not live whose content is still kept (what -gc -retired deletes)."""
        return self._resources("live = 0 AND deleted_at IS NULL")

    def resources_named(self, name: str, live_only: bool = False) -> list[dict]:
        """Resources of that name (not deleted), oldest first; only live ones if asked."""
        return self._resources("name = ? AND deleted_at IS NULL" + (" AND live = 1" if live_only
                                                                   else "") + " ORDER BY id", name)

    def resources_matching(self, pattern: str, live_only: bool = False) -> list[dict]:
        """Resources whose name is `pattern` or matches it, oldest first."""
        if not is_pattern(pattern):
            return self.resources_named(pattern, live_only)
        return [r for r in self._resources("deleted_at IS NULL" + (" AND live = 1" if live_only
                                                                   else "") + " ORDER BY id")
                if matches_inputs(r["name"], [pattern])]

    def newest_per_name(self, pattern: str, live_only: bool = False) -> list[dict]:
        """The newest resource of each name matching `pattern`, by name."""
        live = " AND live = 1" if live_only else ""
        newest = self._resources("id IN (SELECT max(id) FROM resource WHERE deleted_at IS NULL"
                                f"{live} GROUP BY name) ORDER BY name")
        return [r for r in newest if matches_inputs(r["name"], [pattern])]

    def resources_with_hash(self, prefix: str) -> list[dict]:
        """Resources (deleted ones too) whose hash starts with `prefix`, oldest first."""
        return self._resources("hash >= ? AND hash < ? ORDER BY id", prefix, prefix + "g")

    def referenced_hashes(self) -> list[str]:
        """Every object hash the metadata refers to: resources and task logs."""
        rows = self.db.execute("SELECT hash FROM resource WHERE deleted_at IS NULL "
                               "UNION SELECT stdout_hash FROM task UNION SELECT stderr_hash FROM task "
                               "UNION SELECT stdout_hash FROM attempt "
                               "UNION SELECT stderr_hash FROM attempt")
        return sorted(r[0] for r in rows if r[0])

    def step_counts(self) -> list[dict]:
        """Tasks pending / done / failed per step version, in registration order;
        a current gather step's entry says what it gathered or why it waits."""
        rows = self.db.execute(
            "SELECT s.id, s.name, s.version, s.inputs, s.current AND s.gather, "
            "coalesce(sum(t.status = 'pending' AND t.live = 1), 0), "
            "coalesce(sum(t.status = 'done'), 0), coalesce(sum(t.status = 'failed'), 0) "
            "FROM step s LEFT JOIN task t ON t.step_id = s.id GROUP BY s.id ORDER BY s.id"
        ).fetchall()
        latest = dict(self.db.execute("SELECT name, max(version) FROM step GROUP BY name"))
        return [{"name": name, "version": version, "latest": latest[name] == version,
                 "inputs": json.loads(inputs),
                 "tasks": {"pending": pending, "done": done, "failed": failed},
                 **({"gather": self.gather_state(step_id, json.loads(inputs))} if gather else {})}
                for step_id, name, version, inputs, gather, pending, done, failed in rows]

    def gather_state(self, step_id: int, inputs: Sequence[str]) -> str:
        """A current gather step, for -status: `waiting for upstream`, `no inputs`,
        or how many inputs it gathered or will."""
        waiting = self.steps_pending(exclude=[step_id])
        if waiting:
            return f"waiting for upstream ({', '.join(waiting)})"
        found, key = self.live.current_set(inputs)
        if key is None:
            return "no inputs"
        row = self.db.execute("SELECT id FROM task WHERE step_id = ? AND input_set = ? AND "
                              "live = 1", (step_id, key)).fetchone()
        return f"{len(found)} input(s) " + (f"gathered by task {row[0]}" if row else
                                            "to gather at the next -run")

    def failed_tasks(self) -> list[dict]:
        """Failed tasks: the live ones first (the next -run retries them), then
        those superseded (an old version, an input no longer live); oldest first."""
        rows = self.db.execute(
            "SELECT t.id, s.name, s.version, t.exit_code, t.error, t.live = 1 FROM task t "
            "JOIN step s ON s.id = t.step_id WHERE t.status = 'failed' ORDER BY t.live DESC, t.id")
        return [{**dict(zip(("task", "step", "version", "exit_code", "error"), row)),
                 "current": bool(row[5])} for row in rows]

    def slurm_jobs(self) -> list[dict]:
        return SlurmJobs.rows(self.db)

    def mean_durations(self) -> dict[str, float]:
        return dict(self.db.execute(
            "SELECT s.name, avg(t.duration) FROM task t JOIN step s ON s.id = t.step_id "
            "WHERE t.status = 'done' AND t.duration > 0 GROUP BY s.name"))

    def name_counts(self, live_only: bool = False) -> dict[str, int]:
        """Resources per name (deleted ones left out), by name."""
        live = " AND live = 1" if live_only else ""
        return dict(self.db.execute("SELECT name, count(*) FROM resource WHERE deleted_at "
                                    f"IS NULL{live} GROUP BY name ORDER BY name"))

    def resource_totals(self) -> dict:
        count, live, deleted = self.db.execute(
            "SELECT coalesce(sum(deleted_at IS NULL), 0), coalesce(sum(deleted_at IS NULL AND "
            "live = 1), 0), coalesce(sum(deleted_at IS NOT NULL), 0) FROM resource").fetchone()
        objects, size = self.db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM (SELECT DISTINCT hash, size "
            "FROM resource WHERE deleted_at IS NULL)").fetchone()
        return {"count": count, "live": live, "deleted": deleted, "objects": objects,
                "bytes": size}

    def task(self, task_id: int) -> dict | None:
        row = self.db.execute(
            "SELECT t.id, s.name, s.version, t.status, t.exit_code, t.error, t.duration, "
            "t.started_at, t.finished_at, t.stdout_hash, t.stderr_hash, t.input_resource_id, "
            "t.input_set, " + ", ".join(f"t.{c}" for c in USAGE_COLUMNS) + " FROM task t "
            "JOIN step s ON s.id = t.step_id WHERE t.id = ?", (task_id,)).fetchone()
        if row is None:
            return None
        keys = ("task", "step", "version", "status", "exit_code", "error", "duration",
                "started_at", "finished_at", "stdout_hash", "stderr_hash")
        task = dict(zip(keys, row), **dict(zip(USAGE_COLUMNS, row[13:])))
        task["input"] = self._resources("id = ?", row[11])[0] if row[11] else None
        if row[12] is not None:  # a gather task: its inputs
            task["gathered"] = self._resources("id IN (SELECT resource_id FROM gathered WHERE "
                                              "task_id = ?) ORDER BY name, hash", task_id)
        task["outputs"] = self._resources("id IN (SELECT resource_id FROM emission "
                                          "WHERE task_id = ?) ORDER BY id", task_id)
        return task

    def start_run(self, command: list[str], executor: str, output_mode: str) -> int:
        """A -run begins: its row, and the id its tasks are recorded with."""
        with self.transaction():
            self.run_id = self.db.execute(
                "INSERT INTO run (started_at, command, executor, output_mode) VALUES "
                "(?, ?, ?, ?)", (utc_now(), json.dumps(command), executor, output_mode)).lastrowid
        return self.run_id

    def end_run(self, counts: dict[str, int], output_mode: str) -> None:
        """The run's counts (columns of the run table) and exit status as it ends."""
        with self.transaction():
            self.db.execute(f"UPDATE run SET finished_at = ?, output_mode = ?, "
                            f"{', '.join(f'{k} = ?' for k in counts)} WHERE id = ?",
                            (utc_now(), output_mode, *counts.values(), self.run_id))

    def runs(self, run_id: int | None = None) -> list[dict]:
        """Every run, newest first (or the one asked for; the last for 0)."""
        where = "" if run_id is None else " WHERE id = (SELECT max(id) FROM run)" \
            if run_id == 0 else f" WHERE id = {int(run_id)}"
        cursor = self.db.execute(f"SELECT * FROM run{where} ORDER BY id DESC")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row), command=json.loads(row[3]), interrupted=bool(row[-1]))
                for row in cursor.fetchall()]

    def trace(self, run_id: int) -> list[dict]:
        """The tasks a run ran (and their failed tries), oldest first, with
        their bytes in (input or gathered inputs) and out (resources emitted)."""
        size_in = ("coalesce((SELECT size FROM resource WHERE id = t.input_resource_id), "
                   "(SELECT sum(r.size) FROM gathered g JOIN resource r ON r.id = g.resource_id "
                   "WHERE g.task_id = t.id), 0)")
        size_out = ("(SELECT coalesce(sum(r.size), 0) FROM emission e JOIN resource r "
                    "ON r.id = e.resource_id WHERE e.task_id = t.id)")
        usage = ", ".join(f"x.{c}" for c in USAGE_COLUMNS[1:])
        rows = self.db.execute(
            f"SELECT t.id, s.name, s.version, coalesce(i.name, ''), x.status, x.attempt, "
            f"x.exit_code, x.error, x.started_at, x.duration, {usage}, {size_in}, x.bytes_out "
            f"FROM (SELECT id, status, NULL AS attempt, exit_code, error, started_at, duration, "
            f"{', '.join(USAGE_COLUMNS[1:])}, {size_out} AS bytes_out FROM task t "
            f"WHERE run_id = ? AND status != 'pending' UNION ALL SELECT task_id, 'failed', "
            f"attempt, exit_code, error, started_at, duration, "
            f"{', '.join(USAGE_COLUMNS[1:])}, 0 FROM attempt WHERE run_id = ?) x "
            f"JOIN task t ON t.id = x.id JOIN step s ON s.id = t.step_id "
            f"LEFT JOIN resource i ON i.id = t.input_resource_id ORDER BY x.started_at, t.id",
            (run_id, run_id))
        return [dict(zip(TRACE_COLUMNS, row)) for row in rows]

    def step_graph(self) -> tuple[list[dict], list[tuple[str, str, int]]]:
        """The current steps (name, kind) and who fed whom: (producer step,
        consumer step, resources the consumer took that the producer made)."""
        steps = [{"name": name, "kind": "source" if files else "gather" if gather
                  else "seed" if inputs == "[]" else "step"}
                 for name, files, gather, inputs in self.db.execute(
                     "SELECT name, files, gather, inputs FROM step WHERE current = 1 ORDER BY id")]
        edges = self.db.execute(
            "SELECT sa.name, sb.name, count(DISTINCT c.resource_id) FROM (SELECT id, "
            "step_id, input_resource_id AS resource_id FROM task WHERE input_resource_id "
            "IS NOT NULL UNION ALL SELECT g.task_id, t.step_id, g.resource_id FROM gathered g "
            "JOIN task t ON t.id = g.task_id) c JOIN step sb ON sb.id = c.step_id "
            "JOIN emission e ON e.resource_id = c.resource_id JOIN task ta ON ta.id = e.task_id "
            "JOIN step sa ON sa.id = ta.step_id WHERE sb.current = 1 AND sa.current = 1 "
            "GROUP BY sa.name, sb.name ORDER BY sa.name, sb.name").fetchall()
        return steps, edges

    def made_by_run(self, run_id: int) -> dict[str, tuple[int, int]]:
        """Resources a run created, per step that made them: (live, superseded)."""
        return {step: (live, total - live) for step, live, total in self.db.execute(
            "SELECT s.name, sum(r.live), count(*) FROM resource r JOIN task t ON "
            "t.id = r.task_id JOIN step s ON s.id = t.step_id WHERE t.run_id = ? "
            "GROUP BY s.name ORDER BY min(s.id)", (run_id,))}

    def producer(self, resource: dict) -> int | None:
        """The task a resource comes from: the newest live task that emitted it
        (what a clean run would make it from), else the first that made it."""
        row = self.db.execute("SELECT max(t.id) FROM emission e JOIN task t ON t.id = e.task_id "
                              "WHERE e.resource_id = ? AND t.live = 1", (resource["id"],))
        return row.fetchone()[0] or resource["task"]

    def consumers(self, resource_id: int) -> list[dict]:
        """Tasks that took this resource as input, with what they first produced."""
        rows = self.db.execute(
            "SELECT t.id, s.name, s.version, t.status FROM task t JOIN step s "
            "ON s.id = t.step_id WHERE t.input_resource_id = ? OR t.id IN (SELECT task_id "
            "FROM gathered WHERE resource_id = ?) ORDER BY t.id", (resource_id, resource_id))
        return [{"task": tid, "step": name, "version": version, "status": status,
                 "outputs": self._resources("id IN (SELECT resource_id FROM emission WHERE "
                                            "task_id = ?) ORDER BY id", tid)}
                for tid, name, version, status in rows.fetchall()]

    def mark_deleted(self, resource_ids: list[int]) -> None:
        """Forget these resources' content but keep their records, so lineage
        stays whole; tasks that would still read them (pending or failed) go.
        Call inside a transaction."""
        now = utc_now()
        for rid in resource_ids:
            self.db.execute("UPDATE resource SET deleted_at = ? WHERE id = ?", (now, rid))
            self.db.execute("DELETE FROM attempt WHERE task_id IN (SELECT id FROM task WHERE "
                            "input_resource_id = ? AND status != 'done')", (rid,))
            self.db.execute("DELETE FROM task WHERE input_resource_id = ? AND status != 'done'",
                            (rid,))


class SlurmJobs:
    """The slurm_job table through a connection of its own: the Slurm executor's
    poller thread writes it while the scheduler's transactions use theirs."""

    COLUMNS = ("name", "folder", "step", "slurm_id", "tasks", "elements", "queued", "running",
               "submitted_at", "looked_at")

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA busy_timeout=60000")

    @classmethod
    def rows(cls, db: sqlite3.Connection) -> list[dict]:
        return [dict(zip(cls.COLUMNS, row)) for row in db.execute(
            f"SELECT {', '.join(cls.COLUMNS)} FROM slurm_job ORDER BY submitted_at, name")]

    def all(self) -> list[dict]:
        return self.rows(self.db)

    def add(self, name: str, folder: str, step: str, tasks: int, elements: int) -> None:
        self.db.execute("INSERT INTO slurm_job (name, folder, step, tasks, elements, "
                        "submitted_at) VALUES (?, ?, ?, ?, ?, ?)",
                        (name, folder, step, tasks, elements, utc_now()))

    def submitted(self, name: str, slurm_id: str) -> None:
        self.db.execute("UPDATE slurm_job SET slurm_id = ? WHERE name = ?", (slurm_id, name))

    def states(self, counts: dict[str, tuple[int, int]]) -> None:
        """(queued, running) elements per job, from the last squeue."""
        now = utc_now()
        self.db.executemany("UPDATE slurm_job SET queued = ?, running = ?, looked_at = ? "
                            "WHERE name = ?", [(q, r, now, name) for name, (q, r) in counts.items()])

    def more_tasks(self, name: str, tasks: int) -> None:
        """Its elements took further tasks."""
        self.db.execute("UPDATE slurm_job SET tasks = tasks + ? WHERE name = ?", (tasks, name))

    def remove(self, name: str) -> None:
        self.db.execute("DELETE FROM slurm_job WHERE name = ?", (name,))

    def close(self) -> None:
        self.db.close()


# =============================================================================
# Files, processes and mounts
# =============================================================================
# What grit asks of the operating system beyond files of its own: which
# filesystem holds a path, unmounting what a killed run left, process groups
# and signals. Knows nothing of grit's data.

# Filesystems on which LMDB's memory map and locks, and SQLite's WAL, are not
# safe (both projects say: use a local disk).
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "afs", "9p", "lustre", "gpfs",
                       "beegfs", "ceph", "glusterfs", "fuse.sshfs", "fuse.glusterfs",
                       "fuse.ceph-fuse"}

# RELEASE reaches the filesystem asynchronously after a script closes a file;
# the end of a task waits this long for them before failing the task.
RELEASE_GRACE_SECONDS = 2.0


def _unmount(mount: str, fuse: bool = True) -> None:
    """Unmount, waiting a little for busy files, then detach lazily (a FUSE
    mount through fusermount where there is one)."""
    fusermount = fuse and (shutil.which("fusermount") or shutil.which("fusermount3"))
    for attempt in range(20):
        if fusermount:
            done = os.spawnv(os.P_WAIT, fusermount,
                             [fusermount, "-u", "-q"] + (["-z"] if attempt == 19 else []) + [mount])
            if done == 0:
                return
        elif _libc().umount2(mount.encode(), 2 if attempt == 19 else 0) == 0:  # type: ignore[attr-defined]
            return  # 2 = MNT_DETACH
        time.sleep(RELEASE_GRACE_SECONDS / 20)


def mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount, in mount order."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    return parse_mountinfo(lines)


def parse_mountinfo(lines: Iterable[str]) -> list[tuple[str, str]]:
    found = []
    for line in lines:
        before, _, after = line.partition(" - ")  # optional fields end at " - "
        fields = before.split()
        if len(fields) >= 5 and after:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            found.append((point, after.split()[0]))
    return found


def filesystem_type(path: str, table: list[tuple[str, str]]) -> str:
    """The type of the filesystem holding `path`: its deepest mount (the last
    one mounted, if several share a point)."""
    path = os.path.realpath(path) + "/"
    best, kind = "", ""
    for point, fstype in table:
        if path.startswith(point.rstrip("/") + "/") and len(point) >= len(best):
            best, kind = point, fstype
    return kind


def unmount_stale(root: str) -> None:
    """Unmount what a grit that was killed left mounted under `root` (FUSE,
    overlays of $INPUT_FILE)."""
    root = os.path.realpath(root) + "/"
    for point, kind in mounts():
        if (point + "/").startswith(root):
            _unmount(point, fuse=kind.startswith("fuse"))


def mount_overlay(lower: str, upper: str, work: str, target: str) -> bool:
    """An overlay filesystem at `target`: `lower` read-only beneath, what is
    written going to `upper`. False where this process may not mount one (not
    root, no CAP_SYS_ADMIN, a filesystem overlayfs cannot write to, or a path
    its option syntax cannot carry)."""
    if any(c in "".join((lower, upper, work)) for c in ",:\\"):
        return False
    options = f"lowerdir={lower},upperdir={upper},workdir={work}".encode()
    return _libc().mount(b"overlay", target.encode(), b"overlay", 0, options) == 0  # type: ignore[attr-defined]


def _last_line(path: str) -> str:
    """The last line of a log, for an error message ("" if none)."""
    try:
        with open(path, errors="replace") as f:
            lines = f.read().strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def close_slot(path: str) -> bool:
    """Create `path` empty, unless it exists: False if someone else made it
    first (exclusive creation, which NFS and sshfs keep across hosts). A
    filesystem that refuses counts as closed."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return False
    except OSError:
        pass
    return True


def write_atomically(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Readers on other nodes see the whole file or none: write, then rename."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.rename(tmp, path)


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextlib.contextmanager
def stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """While inside, SIGINT and SIGTERM call `stop` instead of killing grit."""
    saved = {sig: signal.signal(sig, lambda *_: stop()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# =============================================================================
# Database
# =============================================================================
# The database directory (-db): its two stores (db.meta, db.objects), the run
# lock and scratch space, and what spans both stores (recording a batch of
# finished tasks). Below this section nothing touches sqlite3 or LMDB: the
# scheduler and the commands go through db.meta and db.objects.

DISK_WARN_FRACTION = 0.85  # warn before a run when the database's disk is fuller

def warn_about_disk(path: str, console: Console) -> None:
    """Before a run: the database on a network filesystem, or on a disk nearly full."""
    kind = filesystem_type(path, mounts())
    if kind in NETWORK_FILESYSTEMS:
        console.warn(f"the database {path} is on a network filesystem ({kind}), where LMDB "
                     "and SQLite cannot lock and sync safely: keep -db on a local disk "
                     "(-export and -export-tar copy results anywhere)")
    usage = shutil.disk_usage(path)
    if usage.total and usage.used / usage.total > DISK_WARN_FRACTION:
        console.warn(f"the disk holding {path} is {usage.used / usage.total:.0%} full "
                     f"({usage.free // 2**20} MiB free)")


class Database:
    """One -db directory: metadata.sqlite, objects/, files/, lock and tmp/."""

    def __init__(self, path: str, readonly: bool = True) -> None:
        self.path = path
        self.readonly = readonly
        self._meta: Metadata | None = None
        self._objects: ObjectStore | None = None

    # -- opening -----------------------------------------------------------------

    @classmethod
    def for_reading(cls, path: str) -> "Database":
        """An existing database, for commands that only look."""
        db = cls(path)
        db.require()
        return db

    @classmethod
    @contextlib.contextmanager
    def for_run(cls, path: str, console: Console) -> Iterator["Database"]:
        """Created if missing, locked, its scratch space fresh; on leaving, objects
        synced, stores closed, scratch space removed and the lock released.
        The path is made absolute: every path grit hands a script is."""
        db = cls(os.path.abspath(path), readonly=False)
        db.create()
        with db.locked():
            warn_about_disk(db.path, console)
            db.clear_tmp()
            try:
                yield db
            finally:
                db.close()
                db.clear_tmp(recreate=False)

    @classmethod
    @contextlib.contextmanager
    def for_change(cls, path: str) -> Iterator["Database"]:
        """An existing database, locked, for commands that change it (-gc, -delete)."""
        db = cls(path, readonly=False)
        db.require()
        with db.locked():
            try:
                yield db
            finally:
                db.close()

    @property
    def meta(self) -> "Metadata":
        if self._meta is None:
            self._meta = Metadata(self.metadata_path, readonly=self.readonly)
        return self._meta

    @property
    def objects(self) -> ObjectStore:
        if self._objects is None:
            self._objects = ObjectStore(self.objects_path, readonly=self.readonly)
        return self._objects

    def close_objects(self) -> None:
        """Close the object store (-gc replaces its files). Objects still held
        belong to tasks a stopped run did not record: they run again."""
        if self._objects is not None:
            if not self.readonly:
                self._objects.sync(held=False)
            self._objects.close()
            self._objects = None

    def close(self) -> None:
        self.close_objects()
        if self._meta is not None:
            self._meta.close()
            self._meta = None

    # -- what spans both stores ----------------------------------------------------

    def record(self, results: list[TaskResult],
               attempts: Sequence[tuple[TaskResult, int]] = ()) -> list[int]:
        """Record finished tasks and their outputs, and failed attempts before
        them (call inside a transaction); returns the resources each task
        created. Their objects reach the disk first, so a committed row never
        names a missing object."""
        self.objects.sync()
        for result, attempt in attempts:
            self.meta.record_attempt(result, attempt)
        return [self.meta.record(result) for result in results]

    def slurm_jobs(self) -> "SlurmJobs":
        """The Slurm executor's job book, on a connection of its own."""
        self.meta  # created or migrated first
        return SlurmJobs(self.metadata_path)

    # -- the directory -------------------------------------------------------------

    @property
    def metadata_path(self) -> str:
        return os.path.join(self.path, "metadata.sqlite")

    @property
    def objects_path(self) -> str:
        return os.path.join(self.path, "objects")

    @property
    def tmp_path(self) -> str:
        return os.path.join(self.path, "tmp")

    def create(self) -> None:
        """The directory; its object store is made once the lock is held."""
        self._not_a_file()
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            os.chmod(self.path, 0o700)
        except OSError as e:
            raise GritError(f"cannot create database directory {self.path}: {e.strerror}") from None

    def clear_tmp(self, recreate: bool = True) -> None:
        """Remove scratch space, and any FUSE mount a killed run left in it."""
        unmount_stale(self.tmp_path)
        shutil.rmtree(self.tmp_path, ignore_errors=True)
        if recreate:
            os.mkdir(self.tmp_path, 0o700)

    def _not_a_file(self) -> None:
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise GritError(f"-db {self.path} is not a directory (the database is a directory)")

    def require(self) -> None:
        self._not_a_file()
        if not os.path.isfile(self.metadata_path):
            raise GritError(f"no grit database at {self.path}")

    def sizes(self) -> dict[str, int]:
        """Bytes of the metadata and of the objects (LMDB's file and files/)."""
        def size(*names: str) -> int:
            return sum(os.path.getsize(p) for p in (os.path.join(self.path, n) for n in names)
                       if os.path.exists(p))
        files = os.path.join(self.path, "files")
        large = [f"files/{name}" for name in os.listdir(files)] if os.path.isdir(files) else []
        return {"metadata": size("metadata.sqlite", "metadata.sqlite-wal"),
                "objects": size("objects/data.mdb", *large)}

    @property
    def lmdb_bytes(self) -> int:
        """The size of LMDB's file (what -gc compacts)."""
        return os.path.getsize(os.path.join(self.objects_path, "data.mdb"))

    def run_in_progress(self) -> int | None:
        """The pid of the process holding the run lock, read from /proc/locks
        (taking the lock to test it could make a run starting now fail)."""
        try:
            st = os.stat(os.path.join(self.path, "lock"))
            with open("/proc/locks") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        for line in lines:
            fields = line.split()
            if "FLOCK" in fields and device in fields:
                return int(fields[fields.index(device) - 1])
        return None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock while inside; the kernel drops it when the
        process dies, so a killed run never blocks the next one."""
        with open(os.path.join(self.path, "lock"), "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                raise GritError(f"database {self.path} is in use by another grit run "
                                f"(pid {holder}); wait for it or stop it") from None
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            self._finish_compaction()
            yield

    def _finish_compaction(self) -> None:
        """Complete or undo what a -gc killed while compacting left (see compact_objects)."""
        objects, fresh, old = (self.objects_path + s for s in ("", ".compact", ".old"))
        if not os.path.exists(objects) and os.path.exists(fresh) and os.path.exists(old):
            os.rename(fresh, objects)  # the copy was complete: it was being swapped in
        if os.path.exists(objects):
            shutil.rmtree(fresh, ignore_errors=True)  # a copy cut short
            shutil.rmtree(old, ignore_errors=True)    # swapped out, not yet removed
        os.makedirs(objects, mode=0o700, exist_ok=True)


# =============================================================================
# Sources
# =============================================================================
# Files on disk as resources: a source step's patterns are walked on every
# -run and each file stat'ed; only new or changed files are read, hashed and
# stored. Uses the Database; knows nothing of the scheduler or executors.

@dataclass
class SourceScan:
    """What one walk of a source step's files found (or, for -dry-run, would)."""

    new: int = 0
    changed: int = 0
    gone: int = 0
    failed: list[str] = field(default_factory=list)  # one line per file not imported


def fixed_prefix(pattern: str) -> str:
    """The folder a pattern's names are relative to: its segments before the
    first one with a pattern character (a plain path: its folder)."""
    parts = pattern.split("/")
    fixed = list(itertools.takewhile(lambda p: not is_pattern(p), parts))
    return "/".join(fixed if len(fixed) < len(parts) else fixed[:-1]) or "/"


def stat_signature(st: os.stat_result) -> bytes:
    """What says a file may have changed (a file that keeps it is not read again),
    packed (see SIGNATURE)."""
    return SIGNATURE.pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def match_files(step: StepDef, base_dir: str) -> Iterator[tuple[str, str, bytes]]:
    """Every regular file the step's patterns match, as (path, resource name,
    stat signature), in path order, each once (a file two patterns or "**/**"
    match). Two files with one name are an error, before anything is read."""
    patterns = [os.path.normpath(os.path.join(base_dir, p)) for p in step.files]
    walks = [(pattern, walk_pattern(pattern)) for pattern in patterns]

    def merged() -> Iterator[tuple[str, str, bytes]]:
        last = None
        for found in heapq.merge(*(pattern_files(p, entries) for p, entries in walks)):
            if found[:2] != last:
                last = found[:2]
                yield found
    if len(walks) > 1:
        paths: dict[str, str] = {}
        for path, name, _ in merged():
            if paths.setdefault(name, path) != path:
                raise GritError(f"step {quote(step.name)}: files {paths[name]} and {path} "
                                f"would both be the resource {quote(name)}")
    return merged()


def walk_pattern(pattern: str) -> list[str]:
    """The regular files a pattern matches, sorted, each as one string: its
    path, NUL and its stat signature as latin-1 text (a third of a tuple's
    memory: 12 MiB for 100,000 files; the path sorts first, as text)."""
    found = []
    for path in glob.iglob(pattern, recursive=True):
        try:
            st = os.stat(path)
        except OSError:
            continue  # gone between listing and stat: as if not there
        if stat.S_ISREG(st.st_mode):
            found.append(f"{path}\0{stat_signature(st).decode('latin-1')}")
    found.sort()
    return found


def pattern_files(pattern: str, entries: list[str]) -> Iterator[tuple[str, str, bytes]]:
    """walk_pattern's entries as (path, resource name, stat signature)."""
    prefix = fixed_prefix(pattern).rstrip("/") + "/"
    for entry in entries:
        path = entry[:-SIGNATURE.size - 1]
        # glob builds each path on the pattern's text: the prefix is a slice
        # away (os.path.relpath cost 35 us a file)
        name = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, prefix)
        yield path, name, entry[-SIGNATURE.size:].encode("latin-1")


def compare_source(meta: Metadata, step: StepDef, base_dir: str, emitted: bool,
                   read: Callable[[str, str], Output | None]
                   ) -> Iterator[tuple[str, str, bytes, int | None, Output | None]]:
    """The source rule, for -run and -dry-run alike: each matched file as
    (verdict, path, stat signature, the resource id it had, its output), in
    path order, beside the files imported before (a merge of two sorted
    lists: no second list of every file in memory).
    "unchanged": the signature it was imported with, under the same name, so it
    is not read (output: what it was, for a version that has not emitted it
    yet); else `read` gives its output, or None: "unreadable"; the same
    content: "touched"; else "changed" or "new". A file imported before and
    not matched now: "gone"."""
    known = meta.source_files(step.name)
    head = next(known, None)
    for path, name, signature in match_files(step, base_dir):
        while head and head[0] < path:
            yield "gone", head[0], b"", head[1], None
            head = next(known, None)
        rid, imported = None, b""
        if head and head[0] == path:
            (_, rid, imported), head = head, next(known, None)
        if rid is not None and imported == signature:
            before = None if emitted else meta.output_of(rid)
            if before is None or before.name == name:
                yield "unchanged", path, signature, rid, before
                continue
        out = read(name, path)
        verdict = "unreadable" if out is None else "new" if rid is None else \
            "touched" if meta.resource_id(name, out.hash) == rid else "changed"
        yield verdict, path, signature, rid, out
    while head:
        yield "gone", head[0], b"", head[1], None
        head = next(known, None)


def import_source(meta: Metadata, store: ObjectStore | None, step: StepVersion,
                  base_dir: str) -> SourceScan:
    """Bring a source step's resources up to date with its files, in one
    transaction: a changed, unreadable or gone file retires what was made from
    it. Without a store (-dry-run) files are only hashed."""
    scan = SourceScan()
    task, emitted = meta.source_task(step.id)

    def read(name: str, path: str) -> Output | None:
        return read_source_file(store.put_file if store else file_digest, step.name, name,
                                path, scan)

    with meta.transaction():
        for verdict, path, signature, rid, out in compare_source(
                meta, step.definition, base_dir, emitted, read):
            if verdict == "touched":
                meta.set_source_file(step.name, path, rid, signature)
            elif verdict == "unchanged" and out:  # a new version's task emits what is there
                meta.emit(task, [out], live=1)
            elif rid is not None and verdict in ("unreadable", "gone", "changed"):
                meta.live.retire(emissions=[(task, rid)])
                if verdict != "changed":
                    meta.drop_source_file(step.name, path)
                scan.gone += verdict == "gone"
            if verdict in ("new", "changed") and out:
                setattr(scan, verdict, getattr(scan, verdict) + 1)
                meta.emit(task, [out], live=1)
                meta.set_source_file(step.name, path, meta.resource_id(out.name, out.hash),
                                     signature)
        if store:
            store.sync()  # the objects reach the disk before the rows that name them
    return scan


def read_source_file(put: Callable[[str], tuple[str, int]], step_name: str, name: str,
                     path: str, scan: SourceScan) -> Output | None:
    """The file as an output, its content put (stored, or only hashed), or None
    and a line in scan.failed saying why not."""
    problem = resource_name_problem(name)
    if problem:
        scan.failed.append(f"{step_name}: file {path}: name {quote(name)} {problem}")
        return None
    try:
        digest, size = put(path)
    except OSError as e:
        scan.failed.append(f"{step_name}: cannot read {path}: {e.strerror or e}")
        return None
    return Output(name, digest, size)


def file_digest(path: str) -> tuple[str, int]:
    """(hash, size) of a file's content."""
    with open(path, "rb") as f:
        return hash_blocks(f)


# =============================================================================
# Output capture
# =============================================================================
# What a task's $OUTPUT_DIR is, and how the files a script writes there become
# outputs with their objects stored. Knows the object store, nothing of the
# metadata, the scheduler or how scripts are started.

class OutputError(Exception):
    """A task's outputs cannot become resources (bad name, symlink, …)."""


class OutputCapture(Protocol):
    """How $OUTPUT_DIR captures a task's files: a context manager for the run
    (the FUSE server lives as long as it), then three verbs per task."""

    mode: str  # "fuse" or "dir"
    description: str  # for -verbose

    def __enter__(self) -> "OutputCapture": ...

    def __exit__(self, *exc: object) -> None: ...

    def prepare(self, slot: str, task_id: int) -> str:
        """An empty $OUTPUT_DIR for the task, given its worker's scratch directory."""

    def inputs(self, slot: str, out: str, tree: list[tuple[str, Output]],
               store: ObjectStore) -> str:
        """A gather task's $INPUT_DIR: each resource of `tree` at its path,
        read-only, until the task's outputs are collected or discarded."""

    def collect(self, out: str, store: ObjectStore) -> list[Output]:
        """The task succeeded: store its files as objects; OutputError if they
        cannot be."""

    def discard(self, out: str) -> str | None:
        """The task failed or was stopped: drop its files; returns a problem that
        may explain the failure (a refused write), or None."""


# Dir mode hashes a file of at least FILE_MIN_BYTES while the script writes it,
# looking every FOLLOW_SECONDS (and starts its bytes on their way to disk), as
# FUSE mode does: collecting it then costs one more hashing pass, beside the
# hashing of what the follower had not reached (proof_pieces), and a rename.
# SHA-256 (1.1 GB/s here) is slower than `head -c` writes (1.7 GB/s), so the
# sooner following starts the less is left at the end: 0.05 s follows ~480 MiB
# of a 1 GiB `head -c` by its exit, 0.2 s ~300 MiB; a look at a small task's
# directory costs ~20 us.
FOLLOW_SECONDS = 0.05
# An $OUTPUT_DIR with more entries than this is not walked again (small files,
# or more than are worth following); files followed already still are.
FOLLOW_MAX_ENTRIES = 1000
FOLLOW_MAX_FILES = 8
# Proving a followed file hashes its bytes anew, in pieces at once (up to
# PROOF_CORES), while one thread hashes what following had not reached. Each
# piece starts from the hash state the following had at its first byte,
# copied every CHECKPOINT_BYTES: following pays no second hashing pass for the split.
CHECKPOINT_BYTES = 64 * 1024 * 1024
PROOF_CORES = max(1, min(4, os.cpu_count() or 1))


def proof_pieces(followed: int, left: int) -> int:
    """Pieces for proving `followed` bytes while `left` more are taken in: one
    per core when taking them in is no longer than a piece, else one core is
    left to it (1 GiB here: 0.7 s in one piece, 0.4 s in two with nothing
    left; with 700 MiB left on 2 cores, one piece 0.69-0.88 s, two 0.88-0.99 s)."""
    return PROOF_CORES if left * (PROOF_CORES - 1) <= followed else max(1, PROOF_CORES - 1)


F_SETLEASE = 1024  # fcntl: a read lease is refused while anyone has the file open for writing


def still_written(path: str) -> bool:
    """Whether an output file may change after its script exited: it has
    another link, or a process the script left behind holds it open for
    writing. Such a file is copied into the store, never moved there."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_nlink != 1:
            return True
        try:
            fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
        except OSError as e:  # EAGAIN: a writer; anything else: no leases here
            return e.errno == errno.EAGAIN
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


@dataclass
class _Piece:
    """Bytes [start, end) of a followed file, with the hash states the
    following had at `start` and at `end`."""
    start: int
    state: "hashlib._Hash"
    end: int
    end_state: "hashlib._Hash"


@dataclass
class _Followed:
    """One growing output file: its bytes so far, hashed."""
    fd: int
    hash: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    size: int = 0
    checkpoints: list[tuple[int, "hashlib._Hash"]] = field(default_factory=list)  # (size, hash then)

    def read_new(self, follower: "_Follower | None" = None) -> bool:
        """Take in what the file gained since the last look (or until the
        follower is stopped); False once it shrank or was deleted (it is
        stored the ordinary way then)."""
        end = os.fstat(self.fd)
        if end.st_nlink == 0 or end.st_size < self.size:
            return False
        start = self.size
        for block in self._blocks(self.size, end.st_size):
            if follower and follower.stopped:
                break
            self.hash.update(block)
            self.size += len(block)
            if self.size // CHECKPOINT_BYTES > len(self.checkpoints):
                self.checkpoints.append((self.size, self.hash.copy()))
        start_writeback(self.fd, start, self.size - start)
        return True

    def proven(self) -> tuple[str, int] | None:
        """(hash, size) when hashing anew the bytes followed so far gives what
        was followed, so the hash is the file's content's (a script may have
        rewritten a part already taken in); None otherwise. The pieces hash on
        other cores while the bytes written since the last look, final now
        that the script has exited, are taken in."""
        pieces = self._pieces(proof_pieces(self.size, os.fstat(self.fd).st_size - self.size))
        with concurrent.futures.ThreadPoolExecutor(len(pieces)) as helpers:
            hashed = [helpers.submit(self._hash_piece, piece) for piece in pieces]
            caught_up = self.read_new()
            found = [h.result() for h in hashed]
        if not caught_up or found != [(p.end_state.hexdigest(), p.end) for p in pieces]:
            return None
        return self.hash.hexdigest(), self.size

    def _pieces(self, count: int) -> list[_Piece]:
        """The bytes followed so far in up to `count` pieces of about equal size,
        split at checkpoints."""
        ends, share = [], self.size / count
        for size, state in self.checkpoints:
            if size >= share * (len(ends) + 1) and size < self.size and len(ends) < count - 1:
                ends.append((size, state))
        ends.append((self.size, self.hash.copy()))
        starts = [(0, hashlib.sha256())] + ends[:-1]
        return [_Piece(start, state, end, end_state)
                for (start, state), (end, end_state) in zip(starts, ends)]

    def _hash_piece(self, piece: _Piece) -> tuple[str, int]:
        """(the hash state at the piece's start updated with its bytes now, where they ended)."""
        h, offset = piece.state.copy(), piece.start
        for block in self._blocks(piece.start, piece.end):
            h.update(block)
            offset += len(block)
        return h.hexdigest(), offset

    def _blocks(self, start: int, end: int) -> Iterator[bytes]:
        """The file's bytes [start, end) as they are now, block by block (fewer if it shrank)."""
        while start < end:
            block = os.pread(self.fd, min(BLOCK_BYTES, end - start), start)
            if not block:
                return
            yield block
            start += len(block)

    def close(self) -> None:
        os.close(self.fd)


class _Follower:
    """The large files of one running script's $OUTPUT_DIR, followed by
    DirCapture's thread until the task's outputs are collected or discarded."""

    def __init__(self, out: str, store: ObjectStore) -> None:
        self.out = out
        self.store = store
        self.files: dict[tuple[int, int], _Followed] = {}  # (st_dev, st_ino) -> file
        self.lock = threading.Lock()  # held for a look; stop() waits for it
        self.stopped = False  # also cuts short a look catching up
        self._dropped: set[tuple[int, int]] = set()
        self._walking = True

    def look(self) -> None:
        with self.lock:
            if self.stopped:
                return
            try:
                if self._walking:
                    self._walk()
                for identity, followed in list(self.files.items()):
                    if not followed.read_new(self):
                        self._drop(identity)
            except Exception:  # its files are stored the ordinary way at the end
                self.stopped = True
                self._close_files()

    def _walk(self) -> None:
        seen, todo = 0, [self.out]
        while todo:
            with contextlib.suppress(OSError), os.scandir(todo.pop()) as entries:
                for entry in entries:
                    seen += 1
                    if seen > FOLLOW_MAX_ENTRIES:
                        self._walking = False
                        return
                    if entry.is_dir(follow_symlinks=False):
                        todo.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        self._consider(entry)

    def _consider(self, entry: os.DirEntry) -> None:
        try:
            st = entry.stat(follow_symlinks=False)
            identity = (st.st_dev, st.st_ino)
            if st.st_size < FILE_MIN_BYTES or identity in self.files or \
                    identity in self._dropped or len(self.files) >= FOLLOW_MAX_FILES:
                return
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # gone, or unreadable: collect says why, if it still matters
            return
        opened = os.fstat(fd)
        if stat.S_ISREG(opened.st_mode) and (opened.st_dev, opened.st_ino) == identity:
            self.files[identity] = _Followed(fd)
        else:
            os.close(fd)  # replaced since the walk saw it

    def _drop(self, identity: tuple[int, int]) -> None:
        self.files.pop(identity).close()
        self._dropped.add(identity)

    def stop(self) -> None:
        """Stop following; what is left is taken in by put(), beside the proof."""
        self.stopped = True
        with self.lock:
            pass  # a look under way has seen it

    def put(self, path: str) -> tuple[str, int]:
        """Store a collected file (after stop()): a large one is moved into the
        store, by the hash followed when it proves to be its content's; one that
        may still change is copied in instead; a small one is read once."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            data = read_whole(fd, st.st_size) if st.st_size < FILE_MIN_BYTES else None
        finally:
            os.close(fd)
        followed = self.files.pop((st.st_dev, st.st_ino), None)
        if data is not None:
            if followed:
                followed.close()
            os.unlink(path)
            return self.store.put(data)
        try:
            if still_written(path):
                stored = self.store.put_file(path)
                os.unlink(path)
                return stored
            stored = followed.proven() if followed else None
        finally:
            if followed:
                followed.close()
        if stored and stored[1] >= FILE_MIN_BYTES:
            self.store.adopt(path, stored[0])
            return stored
        return self.store.put_file(path, move=True)

    def close(self) -> None:
        """Stop following what is still followed (a failed task, or files not collected)."""
        self.stop()
        self._close_files()

    def _close_files(self) -> None:
        for followed in self.files.values():
            followed.close()
        self.files.clear()


class DirCapture:
    """$OUTPUT_DIR as a plain private directory, collected after the script exits
    (a large file is stored while it is written, and proven by its hash then).

    Only the final content of each name is seen, so rewriting one name in a
    loop yields one resource here (FUSE mode sees every rewrite).
    """

    mode = "dir"
    description = "dir (rewriting one name in a task yields only its final content)"

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self._previous: dict[str, str] = {}  # worker slot -> its last output directory
        self._followers: dict[str, _Follower] = {}  # running task's $OUTPUT_DIR -> follower
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "DirCapture":
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread:
            self._thread.join()

    def prepare(self, slot: str, task_id: int) -> str:
        """An empty output directory for the task, followed while it runs: the
        worker's previous one, emptied and renamed (no new inode), so a process
        the last script left behind that writes by path finds nothing there."""
        out = f"{slot}/out-{task_id}"
        previous = self._previous.get(slot)
        self._previous[slot] = out
        if previous and _is_real_dir(previous):
            os.rename(previous, out)
        else:
            if previous and os.path.lexists(previous):
                os.unlink(previous)  # a script replaced it (with a symlink, say): never follow it
            os.mkdir(out, 0o700)
        self._followers[out] = _Follower(out, self._store)
        if self._thread is None:
            self._thread = threading.Thread(target=self._follow, name="follow", daemon=True)
            self._thread.start()
        return out

    def _follow(self) -> None:
        """Look at every running task's $OUTPUT_DIR in turn, until the run ends."""
        while not self._done.wait(FOLLOW_SECONDS):
            for follower in list(self._followers.values()):
                follower.look()

    def inputs(self, slot: str, out: str, tree: list[tuple[str, Output]],
               store: ObjectStore) -> str:
        """Each object as $INPUT_FILE would be (ObjectStore.place), or a copy
        of a small one: a plain directory cannot show objects any other way
        (FUSE mode serves them without copying)."""
        top = os.path.join(slot, "inputs")
        made = {top}
        os.mkdir(top, 0o700)
        for path, resource in tree:
            target = os.path.join(top, path)
            parent = os.path.dirname(target)
            if parent not in made:
                os.makedirs(parent, 0o700, exist_ok=True)
                made.add(parent)
            if not store.place(resource.hash, target):
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
                with os.fdopen(fd, "wb") as f:
                    f.writelines(store.open(resource.hash))
            os.chmod(target, 0o444)
        return top

    def collect(self, out: str, store: ObjectStore) -> list[Output]:
        """Store every file as an object and empty the directory."""
        _remove_gathered(out)
        if not _is_real_dir(out):
            raise OutputError("$OUTPUT_DIR was replaced by something other than a directory")
        escaped = _remove_escapes(out)
        if escaped:
            raise OutputError(escaped)
        found: list[tuple[str, str]] = []
        has_dirs = _find_outputs(out, "", found)
        follower = self._followers.pop(out, None) or _Follower(out, store)
        follower.stop()
        outputs = []
        try:
            for name, path in found:
                outputs.append(Output(name, *follower.put(path)))
        finally:
            follower.close()
        if has_dirs:
            self.discard(out)
        return outputs

    def discard(self, out: str) -> str | None:
        """Empty the directory, whatever the script left in it; returns what
        the script wrote outside it, if anything."""
        follower = self._followers.pop(out, None)
        if follower:
            follower.close()
        _remove_gathered(out)
        escaped = _remove_escapes(out)
        if not _is_real_dir(out):
            return escaped  # prepare() replaces it; never follow what a script put there
        for entry in os.scandir(out):
            _remove(entry.path)
        return escaped


# What a worker's scratch directory holds beside $OUTPUT_DIR (see LocalExecutor).
SLOT_FILES = frozenset({"input", "stdout", "stderr", "inputs", "input-list", "input-index",
                        "in", "in-lower", "in-upper", "in-work"})


def input_tree(gathered: list[Output]) -> list[tuple[str, Output]]:
    """Where each resource a gather task takes appears in $INPUT_DIR: at its
    name, or at NAME@HASH12 (the first 12 digits of its hash) when several
    live resources share the name (fan-out by rewrite) or another's name
    needs it as a directory."""
    counts = collections.Counter(r.name for r in gathered)
    dirs = {name[:i] for name in counts for i, c in enumerate(name) if c == "/"}
    return [(r.name if counts[r.name] == 1 and r.name not in dirs else f"{r.name}@{r.hash[:12]}",
             r) for r in gathered]


def _remove_gathered(out: str) -> None:
    """A dir-mode gather task's copies of its inputs."""
    top = out.rpartition("/")[0] + "/inputs"
    if _is_real_dir(top):
        shutil.rmtree(top)


def _remove_escapes(out: str) -> str | None:
    """Remove what a script wrote next to its $OUTPUT_DIR (`$OUTPUT_DIR/../x`,
    which FUSE mode refuses) and say what it was; None if nothing."""
    slot, _, name = out.rpartition("/")
    stray = set(os.listdir(slot)) - SLOT_FILES - {name}
    if not stray:
        return None
    names = sorted(stray)
    for name in names:
        _remove(os.path.join(slot, name))
    return (f"the script wrote {quote(names[0])} outside $OUTPUT_DIR (in its parent "
            f"{slot}); only files inside $OUTPUT_DIR become resources")


def _remove(path: str) -> None:
    if _is_real_dir(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _find_outputs(directory: str, prefix: str, found: list[tuple[str, str]]) -> bool:
    """Add (name, path) of every file below `directory` to `found`, in name
    order; refuses symlinks, special files and bad names. Uses the types
    readdir reports (no stat per file). Returns whether it met a directory."""
    with os.scandir(directory) as it:
        entries = sorted(it, key=lambda e: e.name)
    has_dirs = False
    for entry in entries:
        name = prefix + entry.name
        if entry.is_dir(follow_symlinks=False):
            _find_outputs(entry.path, name + "/", found)
            has_dirs = True
            continue
        if entry.is_symlink():
            raise OutputError(f"output {name!r} is a symbolic link, not a file")
        if not entry.is_file(follow_symlinks=False):
            raise OutputError(f"output {name!r} is not a regular file")
        problem = resource_name_problem(name)
        if problem:
            raise OutputError(f"output name {name!r} {problem}")
        found.append((name, entry.path))
    return has_dirs


def _is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


# =============================================================================
# Output capture: FUSE
# =============================================================================
# One write-only FUSE filesystem per run, served by a child process forked
# before grit opens its stores or starts threads: the FUSE handlers then
# never wait for the GIL behind busy scheduler threads, and libfuse's signal
# handlers stay out of grit's own process. Each task's $OUTPUT_DIR is an
# unguessable subdirectory of the mount (the root cannot be listed). The child
# keeps each name's pending content (in memory while small, else in a spool
# file), hashes it as it streams, and at the end of the task hands the parent
# the list of emitted resources; the parent stores them. A large content's
# spool file, hashed in order as it was written, becomes its object by a
# rename (bench/compare.py W4).

# A name's content stays in memory up to this size, then moves to a spool file
# on disk, so memory does not grow with a file's size.
SPOOL_MEMORY_LIMIT = CHUNK_SIZE
# All pending contents together keep at most this much in memory; past it,
# every growing content spills to disk at once (10,000 small files in a task).
SPOOL_MEMORY_BUDGET = 64 * 1024 * 1024
# Consecutive writes to a spooled content are gathered up to this size before
# one pwrite and one hand-off to the hasher: writers like `head -c` send 8 KiB
# requests, and per-request work was a third of the server's time.
SPOOL_GATHER_BYTES = 1024 * 1024
# Blocks waiting for the hasher thread (each at most SPOOL_GATHER_BYTES).
HASH_QUEUE_ITEMS = 8
# How long a run waits for the trial mount to answer, and for the server to exit.
MOUNT_TIMEOUT_SECONDS = 10.0
# Under the writeback cache the kernel keeps a FUSE file's pages after sending
# them: a second copy of a large output, next to the spool, all of it fresh
# memory. Each time an output grows past a multiple of this, the server asks
# the kernel to drop its copy (W4: 1.15x -> 1.10x make, bench/RESULTS.md), and
# starts the spool's new bytes on their way to disk.
KERNEL_CACHE_DROP_BYTES = 64 * 1024 * 1024


class FuseUnavailable(Exception):
    """FUSE cannot be used here; the message says why."""


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """All of `data` at `offset`: a full disk gives a short write first, then ENOSPC."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[written:], offset + written


class _Content:
    """The pending content of one name: bytes in memory, or a spool file.

    SHA-256 is computed as bytes arrive in order, which proves a spool
    file's content: the parent renames it into the store as it is. A write
    before the hashed prefix (or a truncation into it) makes the end of the
    task hash the spool file again.
    """

    def __init__(self, fs: "OutputFS") -> None:
        self.fs = fs
        self.buf = bytearray()
        self.spool: int | None = None  # fd of the spool file
        self.spool_path = ""
        self.gathered = bytearray()  # consecutive writes not yet in the spool file
        self.gathered_at = 0         # their offset
        self.size = 0
        self.hasher: "hashlib._Hash | None" = hashlib.sha256()
        self.hashed = 0
        self.closed = False    # a close came after the last change
        self.handles = 0
        self.frozen = False    # emitted: no more changes
        self.detached = False  # unlinked or replaced while open
        self.failed = ""       # why the spool file lacks bytes the script wrote

    def write(self, data: bytes, offset: int) -> None:
        end = offset + len(data)
        if self.spool is None and (end > SPOOL_MEMORY_LIMIT or self.fs.over_budget()):
            self._spill()
        if self.spool is not None:
            if offset != self.gathered_at + len(self.gathered):
                self._flush()
                self.gathered_at = offset
            if not self.gathered and len(data) >= SPOOL_GATHER_BYTES:
                # already large (the writeback cache sends 1 MiB requests): no gathering copy
                self._spool_write(data, offset)
                self._hash_in_order(data, offset, later=True)
                self.gathered_at = offset + len(data)
            else:
                self.gathered += data
                if len(self.gathered) >= SPOOL_GATHER_BYTES:
                    self._flush()
        else:
            grow = max(0, end - len(self.buf))
            if offset > len(self.buf):
                self.buf.extend(bytes(offset - len(self.buf)))
            self.buf[offset:end] = data
            self.fs.memory += grow
            self._hash_in_order(data, offset, later=False)
        self.size = max(self.size, end)
        self.closed = False

    def _hash_in_order(self, data: bytes, offset: int, later: bool) -> None:
        if self.hasher is None:
            return
        if offset == self.hashed:
            if later:  # large: hash on another core
                self.fs.hash_later(self.hasher, data)
            else:
                self.hasher.update(data)
            self.hashed = offset + len(data)
        elif offset < self.hashed:
            self.hasher = None

    def _flush(self) -> None:
        """Write the gathered bytes to the spool file (before it is read, cut or closed)."""
        if self.gathered:
            data = bytes(self.gathered)
            self.gathered = bytearray()
            self._spool_write(data, self.gathered_at)
            self._hash_in_order(data, self.gathered_at, later=True)

    def _spool_write(self, data: bytes, offset: int) -> None:
        try:
            _pwrite_all(self.spool, data, offset)  # type: ignore[arg-type]
        except OSError as e:
            # the task fails at its end even if the script ignored the error
            self.failed = self.failed or (e.strerror or str(e)).lower()
            raise

    def truncate(self, length: int) -> None:
        if self.spool is not None:
            self._flush()
        if length < self.hashed:
            self.hasher, self.hashed = (hashlib.sha256(), 0) if length == 0 else (None, 0)
        if self.spool is not None:
            os.ftruncate(self.spool, length)
        elif length <= len(self.buf):
            self.fs.memory -= len(self.buf) - length
            del self.buf[length:]
        else:
            self.write(bytes(length - self.size), self.size)
        self.size = length
        self.closed = False

    def read(self, offset: int, size: int) -> bytes:
        if self.frozen:  # emitted (the name was created again) while this handle stayed open
            raise _fuse_error(errno.EIO)
        if self.spool is None:
            return bytes(self.buf[offset:offset + size])
        self._flush()
        return os.pread(self.spool, size, offset)

    def _spill(self) -> None:
        self.spool, self.spool_path = self.fs.new_spool()  # emission or discard removes it
        buf, self.buf = self.buf, bytearray()
        self.fs.memory -= len(buf)
        self._spool_write(buf, 0)

    def write_back(self) -> None:
        """Start the spool file's bytes on their way to disk (see start_writeback)."""
        if self.spool is not None:
            self._flush()
            self.fs.write_back_later(self.spool)

    def digest(self) -> str:
        """Finish the hash: read whatever was not hashed in order."""
        if self.spool is not None:
            self._flush()
        self.fs.hash_queue.join()
        if self.hasher is None:
            self.hasher, self.hashed = hashlib.sha256(), 0
        while self.hashed < self.size:
            n = min(CHUNK_SIZE, self.size - self.hashed)
            if self.spool is not None:
                block = os.pread(self.spool, n, self.hashed)
            else:
                block = bytes(self.buf[self.hashed:self.hashed + n])
            self.hasher.update(block)
            self.hashed += len(block)
        return self.hasher.hexdigest()

    def emission(self, name: str) -> dict:
        """Freeze this content as an emitted resource description."""
        self.frozen = True
        try:
            digest = self.digest()
        except OSError:  # _spool_write said why
            digest = ""
        out = {"name": name, "hash": digest, "size": self.size}
        if self.failed:
            out["failed"] = self.failed
        if self.spool is not None:
            os.close(self.spool)
            self.spool = None
            out["spool"] = self.spool_path
        else:
            out["data"] = bytes(self.buf).hex()
            self.fs.memory -= len(self.buf)
            self.buf = bytearray()
        return out

    def discard(self) -> None:
        self.gathered = bytearray()
        if self.spool is not None:
            os.close(self.spool)
            os.unlink(self.spool_path)
            self.spool = None
        self.fs.memory -= len(self.buf)
        self.buf = bytearray()


@dataclass
class _TaskDir:
    """What one task has written so far."""

    names: dict = field(default_factory=dict)     # name -> _Content
    dirs: set = field(default_factory=set)
    emitted: list = field(default_factory=list)   # emission dicts, in order
    errors: list = field(default_factory=list)
    refused_read: str | None = None  # a name the script tried to read back
    open_handles: int = 0


@dataclass
class _Handle:
    task: _TaskDir
    content: _Content


@dataclass
class _InputView:
    """A gather task's $INPUT_DIR in the mount: read-only, served from the object store."""

    files: dict = field(default_factory=dict)  # path -> (hash, size)
    dirs: dict = field(default_factory=lambda: {"": []})  # path ("" = top) -> entry names

    @classmethod
    def load(cls, index: str) -> "_InputView":
        """From the index the task's worker wrote: path<TAB>hash<TAB>size lines."""
        view = cls()
        with open(index, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                path, digest, size = line.rstrip("\n").split("\t")
                view.files[path] = (digest, int(size))
                view.add(path)
        return view

    def add(self, path: str) -> None:
        """Enter `path` in its directory, making the directories above it."""
        parent, _, base = path.rpartition("/")
        known = parent in self.dirs
        self.dirs.setdefault(parent, []).append(base)
        if not known:
            self.add(parent)


FUSE_ROOT_ID = 1  # the inode number of the mount's top folder


class _KernelCache:
    """Drops large outputs' pages from the kernel's cache of the FUSE files
    (libfuse3 with the writeback cache), and ended tasks' folders. Drops and
    forgets run on threads of their own: the kernel first sends the file's
    dirty pages, which the FUSE thread must be free to serve, so that thread
    only queues names and never waits."""

    def __init__(self) -> None:
        self._fuse: int | None = None  # libfuse's struct fuse, while it exists
        self._lock = threading.Lock()  # held by a drop or a forget, and by stop()
        self._paths: "queue.Queue[str]" = queue.Queue(maxsize=4)
        self._ended: "queue.SimpleQueue[str]" = queue.SimpleQueue()  # tasks' folders

    def start(self) -> None:
        """In the FUSE thread at init, where libfuse's context names the filesystem."""
        import ctypes

        class Context(ctypes.Structure):  # the first field of libfuse's fuse_context
            _fields_ = [("fuse", ctypes.c_void_p)]
        try:
            lib = ctypes.CDLL(os.environ.get("FUSE_LIBRARY_PATH") or "libfuse3.so.3")
            lib.fuse_get_context.restype = ctypes.POINTER(Context)
            lib.fuse_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            lib.fuse_get_session.argtypes = [ctypes.c_void_p]
            lib.fuse_get_session.restype = ctypes.c_void_p
            lib.fuse_lowlevel_notify_inval_entry.argtypes = [
                ctypes.c_void_p, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_size_t]
            fuse = lib.fuse_get_context().contents.fuse
            session = lib.fuse_get_session(fuse)
        except (OSError, AttributeError, ValueError):  # no library, symbol or context:
            return  # the pages stay until the task's files are removed, as before
        self._fuse = fuse
        for names, call in ((self._paths, lambda path: lib.fuse_invalidate_path(fuse, path)),
                            (self._ended, lambda name: lib.fuse_lowlevel_notify_inval_entry(
                                session, FUSE_ROOT_ID, name, len(name)))):
            threading.Thread(target=self._serve, args=(names, call), daemon=True).start()

    def drop_later(self, path: str | None) -> None:
        """Queue a drop (skipped when a few are queued already: the next will do)."""
        if self._fuse and isinstance(path, str):  # None: the file was removed
            with contextlib.suppress(queue.Full):
                self._paths.put_nowait(path)

    def forget_later(self, token: str) -> None:
        """Have the kernel drop an ended task's folder and what it held: else
        it keeps them cached, and libfuse a node for each (the server grew by
        0.34 KiB a task, 47 MiB at N = 100,000)."""
        if self._fuse:
            self._ended.put(token)

    def _serve(self, names: "queue.Queue[str] | queue.SimpleQueue[str]",
               call: Callable[[bytes], object]) -> None:
        """Pass each name queued to call, while libfuse's struct fuse exists
        (a path removed or renamed since is unknown to it: no harm)."""
        while True:
            name = names.get().encode("latin-1")
            with self._lock:
                if self._fuse:
                    call(name)

    def stop(self) -> None:
        """Before libfuse frees its struct fuse."""
        with self._lock:
            self._fuse = None


def _fuse_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _operation(method: Callable) -> Callable:
    """A FUSE operation: it runs under the filesystem's lock (the control
    threads share its state), and a path inside a gather task's $INPUT_DIR
    goes to the read-only view's method of the same name (EROFS if none)."""
    in_view = "view_" + method.__name__

    @functools.wraps(method)  # mfusepy reads the signature (inspect follows __wrapped__)
    def operation(fs: "OutputFS", *args: object) -> object:
        with fs.mutex:
            if fs.views and args and isinstance(args[0], str):
                if in_view == "view_release" and args[1] in fs.view_handles:
                    del fs.view_handles[args[1]]  # type: ignore[arg-type]
                    return None
                view, rel = fs._view_of(args[0])
                if view is not None:
                    handler = getattr(fs, in_view, None)
                    if handler is None:
                        raise _fuse_error(errno.EROFS)
                    return handler(view, rel, *args[1:])
            return method(fs, *args)
    return operation


# libfuse3 capabilities asked for in init (fuse_common.h).
FUSE_CAP_ATOMIC_O_TRUNC = 1 << 3    # O_TRUNC reaches open(), where re-creating a name emits it
FUSE_CAP_WRITEBACK_CACHE = 1 << 16  # the kernel gathers small writes in its page cache
FUSE_MAX_WRITE = 1024 * 1024        # bytes per WRITE request under libfuse3


class OutputFS:
    """The FUSE operations (called by mfusepy in the server process).

    Only the operations defined here are offered to the kernel. getxattr is
    left out on purpose: the kernel then stops asking for security.capability
    before every write, which halves the cost of small writes.
    """

    use_ns = True

    def __init__(self, spool_dir: str, objects_path: str = "", libfuse: int = 3) -> None:
        self.spool_dir = spool_dir
        self.libfuse = libfuse  # the major version of the libfuse serving it
        self.writeback = False  # the kernel granted its writeback cache
        self.objects_path = objects_path  # for gather tasks' inputs
        self._store: ObjectStore | None = None  # opened when first needed
        self.views: dict[str, _InputView] = {}  # task token -> its $INPUT_DIR
        self.view_handles: dict[int, tuple[str, int]] = {}  # fh -> (hash, size)
        self.tasks: dict[str, _TaskDir] = {}
        self.handles: dict[int, _Handle] = {}
        self.memory = 0
        self.mutex = threading.Condition()  # FUSE thread vs. control threads
        self.ready = threading.Event()
        # Hashing a large file's writes in a thread of its own overlaps it with
        # serving the next write (hashlib releases the GIL); 1 GiB end to end
        # went from 285 to 393 MB/s here (bench/capture.py). Each item names
        # the hasher it feeds, so a reset never mixes data.
        self.hash_queue: "queue.Queue[tuple]" = queue.Queue(maxsize=HASH_QUEUE_ITEMS)
        threading.Thread(target=self._hash_worker, daemon=True).start()
        self.kernel_cache = _KernelCache()
        self._next_fh = 1
        self._spools = 0
        self._uid, self._gid = os.getuid(), os.getgid()
        self._now = time.time_ns()

        # mfusepy reads create's signature at every call: 21 µs of inspect for a
        # method, 2 µs for a function that carries its signature.
        def create(path: str, mode: int) -> int:
            return OutputFS.create(self, path, mode)
        create.__signature__ = inspect.signature(create)  # type: ignore[attr-defined]
        self.create = create  # type: ignore[method-assign]

    # -- helpers (names that are not FUSE operations) ---------------------------

    def hash_later(self, hasher: "hashlib._Hash", data: bytes) -> None:
        self.hash_queue.put((hasher.update, data))

    def write_back_later(self, spool: int) -> None:
        """start_writeback on the hash thread, with a descriptor of its own."""
        self.hash_queue.put((functools.partial(start_writeback, close=True), os.dup(spool)))

    def _hash_worker(self) -> None:
        while True:
            work, argument = self.hash_queue.get()
            try:
                work(argument)
            finally:
                self.hash_queue.task_done()  # digest() waits on join()

    def objects(self) -> ObjectStore:
        if self._store is None:
            self._store = ObjectStore(self.objects_path)
        return self._store

    def over_budget(self) -> bool:
        return self.memory > SPOOL_MEMORY_BUDGET

    def new_spool(self) -> tuple[int, str]:
        self._spools += 1
        path = os.path.join(self.spool_dir, f"{self._spools}")
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), path

    def _split(self, path: str) -> tuple[_TaskDir | None, str]:
        """(task, name) of a path: paths arrive decoded as latin-1, so every
        byte string does; the name is decoded as UTF-8 here."""
        raw = path.encode("latin-1").lstrip(b"/")
        if not raw:
            return None, ""
        token, _, rest = raw.partition(b"/")
        task = self.tasks.get(token.decode("latin-1"))
        if task is None:
            raise _fuse_error(errno.ENOENT)
        return task, rest.decode("utf-8", "surrogateescape")

    def _file(self, path: str) -> tuple[_TaskDir, str, _Content]:
        task, name = self._split(path)
        if task is None or not name:
            raise _fuse_error(errno.EISDIR)
        content = task.names.get(name)
        if content is None:
            raise _fuse_error(errno.EISDIR if name in task.dirs else errno.ENOENT)
        return task, name, content

    def _check_new(self, task: _TaskDir | None, name: str, what: str = "output") -> None:
        if task is None or not name:
            raise _fuse_error(errno.EACCES)
        problem = resource_name_problem(name)
        if problem:
            shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            task.errors.append(f"{what} name {shown!r} {problem}")
            raise _fuse_error(errno.EINVAL)
        parent = name.rpartition("/")[0]
        if parent and parent not in task.dirs:
            raise _fuse_error(errno.ENOENT)

    def _emit_if_closed(self, task: _TaskDir, name: str) -> _Content:
        """A name created again or truncated to zero after it was closed: its
        pending content becomes a resource, and the name starts empty."""
        old = task.names[name]
        if old.closed and old.size > 0:
            task.emitted.append(old.emission(name))
            if old.handles:
                old.detached = True
            fresh = task.names[name] = _Content(self)
            return fresh
        old.truncate(0)
        return old

    def _name_of(self, handle: _Handle) -> str | None:
        for name, content in handle.task.names.items():
            if content is handle.content:
                return name
        return None  # unlinked

    @staticmethod
    def _refuse_read(task: _TaskDir | None, name: str) -> None:
        """Write-only: reading fails. The name is kept to explain a failure."""
        if task is not None and task.refused_read is None:
            task.refused_read = name
        raise _fuse_error(errno.EACCES)

    def _open_handle(self, task: _TaskDir, content: _Content) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = _Handle(task, content)
        content.handles += 1
        task.open_handles += 1
        return fh

    def _attrs(self, mode: int, size: int = 0) -> dict:
        t = self._now
        return {"st_mode": mode, "st_nlink": 1 if stat.S_ISREG(mode) else 2, "st_size": size,
                "st_uid": self._uid, "st_gid": self._gid,
                "st_atime": t, "st_mtime": t, "st_ctime": t}

    # -- a gather task's $INPUT_DIR (read-only) ------------------------------------

    def _view_of(self, path: str) -> tuple[_InputView | None, str]:
        raw = path.encode("latin-1").lstrip(b"/")
        token, _, rest = raw.partition(b"/")
        if not token.endswith(b".in"):
            return None, ""
        view = self.views.get(token[:-3].decode("latin-1"))
        if view is None:
            raise _fuse_error(errno.ENOENT)
        return view, rest.decode("utf-8", "surrogateescape")

    def view_getattr(self, view: _InputView, rel: str, fh: int | None = None) -> dict:
        if rel in view.files:
            return self._attrs(stat.S_IFREG | 0o444, view.files[rel][1])
        if rel in view.dirs:
            return self._attrs(stat.S_IFDIR | 0o555)
        raise _fuse_error(errno.ENOENT)

    def view_access(self, view: _InputView, rel: str, amode: int) -> None:
        self.view_getattr(view, rel)
        if amode & os.W_OK:
            raise _fuse_error(errno.EROFS)

    def view_opendir(self, view: _InputView, rel: str) -> int:
        if rel not in view.dirs:
            raise _fuse_error(errno.ENOTDIR if rel in view.files else errno.ENOENT)
        return 0

    def view_readdir(self, view: _InputView, rel: str, fh: int) -> list:
        return [".", ".."] + view.dirs[rel]

    def view_releasedir(self, view: _InputView, rel: str, fh: int) -> None:
        pass

    def view_open(self, view: _InputView, rel: str, flags: int) -> int:
        if rel not in view.files:
            raise _fuse_error(errno.EISDIR if rel in view.dirs else errno.ENOENT)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise _fuse_error(errno.EROFS)
        fh = self._next_fh
        self._next_fh += 1
        self.view_handles[fh] = view.files[rel]
        return fh

    def view_read(self, view: _InputView, rel: str, size: int, offset: int, fh: int) -> bytes:
        return self.objects().read(self.view_handles[fh][0], offset, size)

    def view_flush(self, view: _InputView, rel: str, fh: int) -> None:
        pass

    def view_statfs(self, view: _InputView, rel: str) -> dict:
        return self.statfs(rel)

    # -- control (called by the control threads) -------------------------------

    def view(self, token: str, index: str) -> None:
        loaded = _InputView.load(index)
        with self.mutex:
            self.views[token] = loaded

    def begin(self, token: str) -> None:
        with self.mutex:
            self.tasks[token] = _TaskDir()

    def end(self, token: str, keep: bool) -> dict:
        """Wait for the task's files to be released; then its emissions, or an error."""
        with self.mutex:
            self.views.pop(token, None)
            task = self.tasks.get(token)
            if task is None:  # already ended
                return {"error": None, "outputs": []}
            deadline = time.monotonic() + RELEASE_GRACE_SECONDS
            while task.open_handles and time.monotonic() < deadline:
                self.mutex.wait(deadline - time.monotonic())
            if task.open_handles:
                still = sorted({n for n, c in task.names.items() if c.handles})
                task.errors.append(f"{task.open_handles} file(s) still open "
                                   f"{RELEASE_GRACE_SECONDS:.0f} s after the script exited "
                                   f"(a background process?): {', '.join(still)[:200]}")
            del self.tasks[token]
            self.kernel_cache.forget_later(token)
            for name in sorted(task.names):
                task.emitted.append(task.names[name].emission(name))
            task.errors += [f"output {out['name']!r} could not be written: {out['failed']}"
                            for out in task.emitted if "failed" in out]
            if task.errors or not keep:
                for out in task.emitted:
                    if "spool" in out:
                        os.unlink(out["spool"])
                if not task.errors and task.refused_read:  # may be why the script failed
                    task.errors.append(f"the script tried to read {quote(task.refused_read)} "
                                       "back, but $OUTPUT_DIR is write-only (-output-mode dir "
                                       "allows it)")
                return {"error": task.errors[0] if task.errors else None, "outputs": []}
            return {"error": None, "outputs": task.emitted}

    # -- FUSE operations ---------------------------------------------------------

    def init_with_config(self, conn: object, config: object) -> None:
        """libfuse3: ask for the writeback cache and 1 MiB writes where the kernel
        offers them (libfuse2 got its options at mount)."""
        if self.libfuse >= 3 and conn is not None:
            wanted = [FUSE_CAP_ATOMIC_O_TRUNC]
            if settings().fuse_writeback != "0":
                wanted.append(FUSE_CAP_WRITEBACK_CACHE)
            for capability in wanted:
                if conn.capable & capability:  # type: ignore[attr-defined]
                    conn.want |= capability  # type: ignore[attr-defined]
            self.writeback = bool(conn.want & FUSE_CAP_WRITEBACK_CACHE)  # type: ignore[attr-defined]
            if self.writeback:
                self.kernel_cache.start()
            conn.max_write = FUSE_MAX_WRITE  # type: ignore[attr-defined]
            if not self.writeback and config is not None:
                config.direct_io = 1  # type: ignore[attr-defined]  # as on libfuse2
        self.ready.set()

    def destroy(self, path: str) -> None:
        """At unmount, before libfuse frees what a queued drop would use."""
        self.kernel_cache.stop()

    @_operation
    def getattr(self, path: str, fh: int | None = None) -> dict:
        if fh is not None and fh in self.handles:
            return self._attrs(stat.S_IFREG | 0o600, self.handles[fh].content.size)
        task, name = self._split(path)
        if task is None or not name or name in task.dirs:
            return self._attrs(stat.S_IFDIR | 0o700)
        content = task.names.get(name)
        if content is None:
            raise _fuse_error(errno.ENOENT)
        return self._attrs(stat.S_IFREG | 0o600, content.size)

    @_operation
    def access(self, path: str, amode: int) -> None:
        self.getattr(path)
        if amode & os.R_OK:
            task, name = self._split(path)
            self._refuse_read(task, name or ".")

    @_operation
    def opendir(self, path: str) -> int:
        # A directory can be opened (tar -C and other openat-based tools need
        # the descriptor), but not listed: readdir fails.
        self._split(path)
        return 0

    @_operation
    def readdir(self, path: str, fh: int) -> list:
        task, name = self._split(path)
        self._refuse_read(task, f"{name}/" if name else "$OUTPUT_DIR")
        return []

    @_operation
    def releasedir(self, path: str, fh: int) -> None:
        pass

    @_operation
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        """A descriptor opened for writing reads back what the task wrote to it:
        the kernel's writeback cache reads pages to complete partial writes, and
        it opens write-only files read-write (opening for reading only fails)."""
        return self.handles[fh].content.read(offset, size)

    @_operation
    def mkdir(self, path: str, mode: int) -> None:
        task, name = self._split(path)
        self._check_new(task, name, "directory")
        assert task is not None
        if name in task.names or name in task.dirs:
            raise _fuse_error(errno.EEXIST)
        task.dirs.add(name)

    @_operation
    def rmdir(self, path: str) -> None:
        task, name = self._split(path)
        if task is None or name not in task.dirs:
            raise _fuse_error(errno.EACCES if task is None or not name else errno.ENOENT)
        prefix = name + "/"
        if any(n.startswith(prefix) for n in task.names) or any(
                d.startswith(prefix) for d in task.dirs):
            raise _fuse_error(errno.ENOTEMPTY)
        task.dirs.discard(name)

    @_operation
    def create(self, path: str, mode: int) -> int:
        task, name = self._split(path)
        self._check_new(task, name)
        assert task is not None
        if name in task.dirs:
            raise _fuse_error(errno.EISDIR)
        if name in task.names:
            content = self._emit_if_closed(task, name)
        else:
            content = task.names[name] = _Content(self)
        return self._open_handle(task, content)

    @_operation
    def open(self, path: str, flags: int) -> int:
        task, name, content = self._file(path)
        if flags & os.O_ACCMODE == os.O_RDONLY:
            self._refuse_read(task, name)
        if flags & os.O_TRUNC:
            content = self._emit_if_closed(task, name)
        return self._open_handle(task, content)

    @_operation
    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        content = self.handles[fh].content
        if content.frozen:
            raise _fuse_error(errno.EIO)
        before = content.size
        content.write(data, offset)
        if content.size // KERNEL_CACHE_DROP_BYTES > before // KERNEL_CACHE_DROP_BYTES:
            self.kernel_cache.drop_later(path)
            content.write_back()
        return len(data)

    @_operation
    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        handle = self.handles.get(fh) if fh is not None else None
        if handle is not None and handle.content.frozen:
            raise _fuse_error(errno.EIO)
        task, name, content = self._file(path) if handle is None else (
            handle.task, self._name_of(handle), handle.content)
        if length == 0 and name is not None and task.names.get(name) is content:
            fresh = self._emit_if_closed(task, name)
            if fresh is not content:  # truncating keeps the file: its descriptors follow
                for other in self.handles.values():
                    if other.content is content:
                        content.handles -= 1
                        fresh.handles += 1
                        other.content = fresh
        else:
            content.truncate(length)

    @_operation
    def flush(self, path: str, fh: int) -> None:
        self.handles[fh].content.closed = True

    @_operation
    def release(self, path: str, fh: int) -> None:
        handle = self.handles.pop(fh)
        content = handle.content
        content.closed = True
        content.handles -= 1
        if content.detached and not content.handles and not content.frozen:
            content.discard()
        handle.task.open_handles -= 1
        if not handle.task.open_handles:
            self.mutex.notify_all()

    @_operation
    def fsync(self, path: str, datasync: int, fh: int) -> None:
        pass

    @_operation
    def unlink(self, path: str) -> None:
        task, name, content = self._file(path)
        del task.names[name]
        if content.handles:
            content.detached = True
        else:
            content.discard()

    @_operation
    def rename(self, old: str, new: str) -> None:
        task, name = self._split(old)
        new_task, new_name = self._split(new)
        if task is None or not name:
            raise _fuse_error(errno.EACCES)
        if new_task is not task:
            raise _fuse_error(errno.EXDEV)
        self._check_new(task, new_name)
        if name in task.dirs:
            self._rename_dir(task, name, new_name)
            return
        content = task.names.get(name)
        if content is None:
            raise _fuse_error(errno.ENOENT)
        if new_name in task.dirs:
            raise _fuse_error(errno.EISDIR)
        if new_name in task.names and new_name != name:
            # Replacing a name is creating it again: emit what it held.
            target = self._emit_if_closed(task, new_name)
            target.detached = True
            if not target.handles:
                target.discard()
        task.names[new_name] = task.names.pop(name)

    def _rename_dir(self, task: _TaskDir, name: str, new_name: str) -> None:
        if new_name in task.names:
            raise _fuse_error(errno.ENOTDIR)
        old_prefix, new_prefix = name + "/", new_name + "/"
        if new_prefix.startswith(old_prefix):
            raise _fuse_error(errno.EINVAL)
        if any(n.startswith(new_prefix) for n in list(task.names) + list(task.dirs)):
            raise _fuse_error(errno.ENOTEMPTY)
        for key in [k for k in task.names if k.startswith(old_prefix)]:
            task.names[new_prefix + key[len(old_prefix):]] = task.names.pop(key)
        task.dirs = {new_prefix + d[len(old_prefix):] if d.startswith(old_prefix) else d
                     for d in task.dirs if d != name} | {new_name}

    @_operation
    def chmod(self, path: str, mode: int) -> None:
        self.getattr(path)

    @_operation
    def chown(self, path: str, uid: int, gid: int) -> None:
        self.getattr(path)

    @_operation
    def utimens(self, path: str, times: object = None) -> None:
        pass  # libfuse asks getattr next, which fails for a name that does not exist

    @_operation
    def statfs(self, path: str) -> dict:
        sv = os.statvfs(self.spool_dir)
        return {key: getattr(sv, key) for key in (
            "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
            "f_favail", "f_namemax")}

    @_operation
    def symlink(self, link: str, target: str) -> None:
        self._refuse(link, "is a symbolic link, not a file")

    @_operation
    def link(self, link: str, target: str) -> None:
        self._refuse(link, "is a hard link, not a new file")

    @_operation
    def mknod(self, path: str, mode: int, dev: int) -> None:
        self._refuse(path, "is not a regular file")

    def _refuse(self, path: str, why: str) -> None:
        task, name = self._split(path)
        if task is not None:
            task.errors.append(f"output {name!r} {why}")
        raise _fuse_error(errno.EPERM)


def _fuse_server(mount: str, spool_dir: str, control: "socket.socket",
                 workers: list, objects_path: str) -> None:
    """Body of the FUSE server process: wait to be told to mount (a run that
    never starts a task never mounts), mount, serve, unmount when told or when
    grit's end of the control socket closes (grit was killed)."""
    import logging

    if _read_line(control) != b"mount":
        return
    try:
        fuse = fuse_binding()
    except (ImportError, OSError) as e:
        _send(control, {"error": f"mfusepy or libfuse not found ({e})"})
        return
    logging.getLogger("fuse").addHandler(logging.NullHandler())
    logging.getLogger("fuse").propagate = False
    fs = OutputFS(spool_dir, objects_path, fuse.fuse_version_major)
    for sock in workers:
        threading.Thread(target=_serve_worker, args=(fs, sock), daemon=True).start()

    def watch() -> None:
        if fs.ready.wait(MOUNT_TIMEOUT_SECONDS):
            _send(control, {"ready": True, "libfuse": fs.libfuse, "writeback": fs.writeback})
            control.recv(4096)  # returns on "shutdown", or with b"" when grit died
        _unmount(mount)

    threading.Thread(target=watch, daemon=True).start()
    options = {"foreground": True, "nothreads": True, "fsname": "grit", "subtype": "grit"}
    if fs.libfuse == 2:
        # No writeback cache: each write() of the script is a request. big_writes
        # and max_write make them up to 128 KiB; atomic_o_trunc: O_TRUNC reaches
        # open(), where re-creating a name emits it. direct_io: writes skip the
        # page cache (measured here: 170 -> 440 MB/s); mmap then fails with
        # ENODEV, which a write-only filesystem could not serve anyway.
        options.update(big_writes=True, max_write=131072, atomic_o_trunc=True, direct_io=True)
    if shutil.which("fusermount") or shutil.which("fusermount3"):
        options["auto_unmount"] = True  # fusermount unmounts even if this process is killed
    try:
        fuse.FUSE(fs, mount, encoding="latin-1", **options)
    except Exception as e:
        if not fs.ready.is_set():
            _send(control, {"error": f"mount failed: {e}"})


def _read_line(sock: "socket.socket") -> bytes:
    """One line, byte by byte: nothing after it is taken from the socket."""
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return line.strip()


def _serve_worker(fs: OutputFS, sock: "socket.socket") -> None:
    with sock, sock.makefile("rb") as requests:
        for line in requests:
            try:
                req = json.loads(line)
                if req["op"] == "begin":
                    reply: dict = {}
                elif req["op"] == "view":
                    fs.view(req["token"], req["index"])
                    reply = {}
                else:
                    reply = fs.end(req["token"], req["keep"])
                if req.get("next"):
                    fs.begin(req["next"])
            except Exception as e:  # answer, so the task fails and the run goes on
                reply = {"error": f"output filesystem error: {e!r}", "outputs": []}
            _send(sock, reply)


def _send(sock: "socket.socket", message: dict) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def libfuse_name() -> str:
    """The libfuse FUSE mode loads: FUSE_LIBRARY_PATH when set (the Nix package
    sets it), else libfuse3 where it loads (it offers the kernel's writeback
    cache), else libfuse2; GRIT_LIBFUSE=2 or 3 picks one. OSError if none loads."""
    import ctypes
    names = {"2": ["libfuse.so.2"], "3": ["libfuse3.so.3"]}.get(
        settings().libfuse, ["libfuse3.so.3", "libfuse.so.2"])
    if os.environ.get("FUSE_LIBRARY_PATH"):
        names = [os.environ["FUSE_LIBRARY_PATH"]]
    for name in names:  # by soname, as the dynamic loader finds it (no ldconfig run)
        try:
            ctypes.CDLL(name)
            return name
        except OSError:
            continue
    raise OSError(f"cannot load {' or '.join(names)}")


def fuse_binding() -> object:
    """mfusepy on libfuse_name(), in the FUSE server process only: mfusepy reads
    FUSE_LIBRARY_PATH when imported, and grit's own environment, which scripts
    and later runs in the same process inherit, stays as it was."""
    os.environ["FUSE_LIBRARY_PATH"] = libfuse_name()
    import mfusepy
    return mfusepy


class FuseServer:
    """grit's handle on the FUSE server process. It is forked when the run
    starts, while grit is small (it shares grit's memory as it was then), and
    mounts when the first task needs it (mount_now)."""

    def __init__(self, run_dir: str, workers: int, objects_path: str) -> None:
        if not os.path.exists("/dev/fuse"):  # the binding loads in the server, at mount
            raise FuseUnavailable("/dev/fuse does not exist")
        self.run_dir = run_dir
        import socket

        self.mount = os.path.join(run_dir, "mnt")
        self.spool_dir = os.path.join(run_dir, "spool")
        for folder in (self.mount, self.spool_dir):  # left by the server of an earlier
            if os.path.isdir(folder) and not os.path.ismount(folder):  # -watch round
                shutil.rmtree(folder)
        os.mkdir(self.mount, 0o700)
        os.mkdir(self.spool_dir, 0o700)
        pairs = [socket.socketpair() for _ in range(workers + 1)]
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:  # the server process
            os._exit(self._child(run_dir, pairs, objects_path))
        for ours, theirs in pairs:
            theirs.close()
        self.control = pairs[0][0]
        self._free = [p[0] for p in pairs[1:]]
        self._pool_lock = threading.Lock()
        self._local = threading.local()

    def mount_now(self) -> None:
        """Mount and wait for the server to answer; FuseUnavailable if it cannot."""
        self.control.settimeout(MOUNT_TIMEOUT_SECONDS)
        with contextlib.suppress(OSError):
            self.control.sendall(b"mount\n")
        try:
            reply = json.loads(self.control.makefile("rb").readline() or b"{}")
        except (OSError, ValueError):
            reply = {}
        self.control.settimeout(None)
        self.libfuse, self.writeback = reply.get("libfuse"), reply.get("writeback")
        if not reply.get("ready"):
            self.close()
            detail = _last_line(os.path.join(self.run_dir, "fuse.log"))
            why = reply.get("error") or "no answer from the trial mount"
            raise FuseUnavailable(f"{why}{': ' + detail if detail else ''}")

    @staticmethod
    def check() -> None:
        """FuseUnavailable if FUSE surely cannot be used here (no binding or
        libfuse, no /dev/fuse); whether mounting is allowed shows when it mounts."""
        try:
            libfuse_name()
            if importlib.util.find_spec("mfusepy") is None:
                raise ImportError("no module named 'mfusepy'")
        except (ImportError, OSError) as e:
            raise FuseUnavailable(f"mfusepy or libfuse not found ({e})") from None
        if not os.path.exists("/dev/fuse"):
            raise FuseUnavailable("/dev/fuse does not exist")

    @staticmethod
    def _child(run_dir: str, pairs: list, objects_path: str) -> int:
        try:
            os.setsid()  # out of the terminal's process group: Ctrl-C is grit's to handle
            keep = {p[1].fileno() for p in pairs}
            for fd in map(int, os.listdir("/proc/self/fd")):
                if fd > 2 and fd not in keep:
                    with contextlib.suppress(OSError):
                        os.close(fd)  # the run lock above all: it must die with grit
            log = os.open(os.path.join(run_dir, "fuse.log"), os.O_WRONLY | os.O_CREAT, 0o600)
            os.dup2(log, 1)
            os.dup2(log, 2)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            # Nor SIGTERM (scancel's, to every process of a job): the mount
            # goes when grit says so or dies, never under a running script.
            # Ignored, it is also not one libfuse's handler takes over.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            _fuse_server(os.path.join(run_dir, "mnt"), os.path.join(run_dir, "spool"),
                         pairs[0][1], [p[1] for p in pairs[1:]], objects_path)
            return 0
        except BaseException:
            return 1

    def request_begin(self) -> str:
        """A registered task directory name for this worker thread's next task."""
        token = getattr(self._local, "next", None)
        if token is None:
            self.request({"op": "begin"})
            token = self._local.next
        self._local.next = None
        return token

    def request(self, message: dict, register_next: bool = True) -> dict:
        """Send a request on this worker thread's own connection; each request
        (but a view) also registers a fresh, unguessable directory for the
        worker's next task."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            with self._pool_lock:
                sock = self._free.pop()
            conn = self._local.conn = (sock, sock.makefile("rb"))
        if register_next:
            self._local.next = message["next"] = os.urandom(12).hex()
        _send(conn[0], message)
        line = conn[1].readline()
        if not line:
            raise OSError("the FUSE server process has stopped")
        return json.loads(line)

    def close(self) -> None:
        """Unmount and wait for the server to exit (killing it if it hangs).
        A failed mount closed it already: then nothing is left to do."""
        pid, self.pid = self.pid, 0
        if not pid:
            return
        with contextlib.suppress(OSError):
            self.control.sendall(b"shutdown\n")
        deadline = time.monotonic() + MOUNT_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
            time.sleep(0.002)
        _kill_group(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        _unmount(self.mount)


class FuseCapture:
    """$OUTPUT_DIR as a task's directory in the run's FUSE mount. Starting it
    mounts (FuseUnavailable if FUSE cannot be used); leaving it unmounts."""

    mode = "fuse"

    def __init__(self, server: FuseServer) -> None:
        self.server = server
        server.mount_now()
        how = "writeback cache" if self.server.writeback else "no writeback cache"
        self.description = (f"fuse (libfuse{self.server.libfuse}, {how}), mounted at "
                            f"{self.server.mount}")

    def __enter__(self) -> "FuseCapture":
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.close()  # every script has ended by now: unmount

    def prepare(self, slot: str, task_id: int) -> str:
        """The task's directory: the one this worker's previous request registered
        (each "end" also registers the next), so a task costs one round trip."""
        token = self.server.request_begin()
        return os.path.join(self.server.mount, token)

    def inputs(self, slot: str, out: str, tree: list[tuple[str, Output]],
               store: ObjectStore) -> str:
        """Served by the FUSE server straight from the object store: the worker
        writes an index, the server reads it; nothing is copied."""
        index = os.path.join(slot, "input-index")
        with open(index, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.writelines(f"{path}\t{r.hash}\t{r.size}\n" for path, r in tree)
        token = os.path.basename(out)
        reply = self.server.request({"op": "view", "token": token, "index": index},
                                    register_next=False)
        if reply.get("error"):
            raise OSError(reply["error"])
        return f"{out}.in"

    def collect(self, out: str, store: ObjectStore) -> list[Output]:
        """Store what the server emitted: a large spool file by a rename (the
        server hashed it in order), a small one's bytes in LMDB."""
        reply = self.server.request({"op": "end", "token": os.path.basename(out), "keep": True})
        if reply["error"]:
            raise OutputError(reply["error"])
        outputs = []
        for item in reply["outputs"]:
            outputs.append(Output(item["name"], item["hash"], item["size"]))
            if "data" in item:
                store.put(bytes.fromhex(item["data"]))
            elif os.path.getsize(item["spool"]) != item["size"]:
                raise OutputError(f"output {item['name']!r}: its spool file is incomplete")
            elif item["size"] >= FILE_MIN_BYTES:
                store.adopt(item["spool"], item["hash"])
            else:
                store.put_file(item["spool"], move=True)
        return outputs

    def discard(self, out: str) -> str | None:
        """Drop the task's outputs; returns the first output it was refused, if any."""
        reply = self.server.request({"op": "end", "token": os.path.basename(out), "keep": False})
        return reply["error"]


def fuse_demanded(mode: str) -> None:
    """-output-mode fuse where FUSE surely cannot work: say so before the run starts."""
    if mode == "fuse":
        try:
            FuseServer.check()
        except FuseUnavailable as e:
            raise GritError(f"-output-mode fuse: FUSE cannot be used here: {e}") from None


def fork_fuse_server(mode: str, run_dir: str, workers: int,
                     objects_path: str) -> tuple[FuseServer | None, str]:
    """The FUSE server, forked and not yet mounted (unless `-output-mode dir`);
    or None and why FUSE cannot be used."""
    if mode == "dir":
        return None, ""
    try:
        return FuseServer(run_dir, workers, objects_path), ""
    except FuseUnavailable as e:
        return None, str(e)


def open_capture(mode: str, server: FuseServer | None, unavailable: str,
                 console: Console, store: ObjectStore) -> OutputCapture:
    """The capture `-output-mode` asks for: FUSE where it can be used (auto, fuse),
    else plain directories, saying why once."""
    if server is not None:
        try:
            return FuseCapture(server)
        except FuseUnavailable as e:
            unavailable = str(e)
    if mode == "fuse":
        raise GritError(f"-output-mode fuse: FUSE cannot be used here: {unavailable}")
    capture = DirCapture(store)
    if mode == "auto":
        capture.description = (f"FUSE is not available ({unavailable}); using plain output "
                               "directories, where rewriting one name in a loop yields only "
                               "its last content")
        console.info(f"notice: {capture.description}")
    return capture


# =============================================================================
# Task execution
# =============================================================================
# Executors run tasks somewhere and hand back TaskResults. LocalExecutor runs
# scripts here: input copies, process groups, timeouts, logs, and the output
# capture. Knows the object store; never the metadata or the schedule.

STDERR_TAIL_BYTES = 2000  # of a failed task's stderr, searched for its last line
ERROR_LINE_CHARS = 300  # of that line, kept as the task's error
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # colors in a script's stderr
# How long scripts get to exit after SIGTERM before SIGKILL.
TERMINATE_GRACE_SECONDS = 2.0

# Worker threads per -parallel slot: -parallel bounds the scripts running at once,
# and the extra workers prepare inputs and collect outputs meanwhile, so grit's
# own per-task work overlaps the scripts instead of leaving a slot idle.
WORKERS_PER_SCRIPT = 2

def own_peak_rss() -> int:
    """This process's peak resident set, bytes: what Linux counts into a
    script's at its exec. /proc's VmHWM, not getrusage's, which also holds
    what the process that started grit had before grit's exec (pytest's, a
    shell's)."""
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# Where tasks run: a result's node (on Slurm the node's name, several of which
# may share one machine).
NODE = os.environ.get("SLURMD_NODENAME") or os.uname().nodename


# Below this much free space a task failure is reported as probably disk-full.
DISK_FULL_BYTES = 1024 * 1024


def disk_is_full(path: str, writing: int = 0) -> bool:
    """Whether the disk holding path has too little room left (for `writing`
    more bytes: a failed write of many may leave some room)."""
    try:
        return shutil.disk_usage(path).free < DISK_FULL_BYTES + writing
    except OSError:
        return False


class TaskTimeout(Exception):
    """A task ran past its step's (or the run's) timeout."""


class Executor:
    """Runs tasks somewhere and hands back their results, outputs already in the
    object store. The scheduler needs nothing else: LocalExecutor runs scripts
    on this machine; an executor for a cluster can take its place. It is a
    context manager that owns what it needs (scratch space, output capture).
    A subclass registered in EXECUTORS is chosen by -executor NAME."""

    settings: type | None = None  # the dataclass of its manifest table, [NAME]
    flags: dict[str, tuple[str, str]] = {}  # its -run flags: name -> (metavar, help)
    capacity: int = 1  # most tasks in flight at once
    queues: bool = False  # a task submitted waits in a queue (-verbose: "queued", not "start")
    output_mode_used: str = ""  # fuse or dir once known (the run table records it)

    @classmethod
    def for_run(cls, opts: RunOptions, manifest: Manifest, db: Database,
                console: Console) -> "Executor":
        """The executor of one -run (by default: its class called with these)."""
        return cls(opts, manifest, db, console)  # type: ignore[call-arg]

    @classmethod
    def plan(cls, plan: list[dict], manifest: Manifest, opts: RunOptions) -> None:
        """-dry-run: add to each step's entry what this executor would do with its
        tasks (a key of data, and lines of text under "notes")."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def submit(self, spec: TaskSpec) -> "concurrent.futures.Future[TaskResult]":
        """Start a task; returns at once."""
        raise NotImplementedError

    def cancel(self) -> None:
        """Stop everything; tasks not finished end as interrupted and stay pending.
        How to stop them (signals, a cluster's cancel command) is the executor's."""

    def running(self) -> collections.Counter:
        """Tasks running now, per step name (for the progress line)."""
        return collections.Counter()


@dataclass
class _Launch:
    """A script waiting for a slot; whichever thread frees one starts it."""

    spec: TaskSpec
    env: dict
    files: list
    # Held until the script started (or grit gave up on it): a plain lock,
    # as an Event costs a Condition per task.
    started: "threading.Lock" = field(default_factory=threading.Lock)
    pid: int | None = None       # None once started: grit is stopping
    error: OSError | None = None  # posix_spawn failed


@dataclass
class _Slot:
    """A worker thread's scratch directory, its open log files and its open
    input file (-1: none yet) with that file's (st_dev, st_ino)."""

    path: str
    stdout: io.FileIO
    stderr: io.FileIO
    input: int = -1
    input_id: tuple[int, int] = (0, 0)


class LocalExecutor(Executor):
    """The Executor that runs each task's script on this machine.

    Worker threads (WORKERS_PER_SCRIPT per -parallel slot) copy inputs, run
    scripts and collect outputs; at most -parallel scripts run at once, and
    the thread that sees one exit starts the next waiting one itself.
    """

    def __init__(self, db: Database, console: Console, parallel: int, output_mode: str = "auto",
                 timeout: float = 0) -> None:
        self.db = db
        self.workroot = db.tmp_path
        self.console = console
        self.output_mode = output_mode
        self.capacity = parallel * WORKERS_PER_SCRIPT
        self.timeout = timeout  # -timeout: seconds for steps without their own; 0 = no limit
        self.shell = shutil.which("sh") or "/bin/sh"
        self._running: dict[int, tuple[int, str]] = {}  # task id -> (process group, step)
        self._lock = threading.Lock()
        self._stopping = False
        self._own_peak = 0  # grit's peak RSS as last read (_note_peak)
        self._local = threading.local()
        self._slots = 0
        self.parallel = parallel
        self._free = parallel  # script slots (-parallel) not in use; a task takes its cpus
        self._waiting: collections.deque[_Launch] = collections.deque()  # for a slot
        self._environ = dict(os.environ)  # copied once: os.environ decodes on every copy
        self.on_start: Callable[[TaskSpec], None] | None = None  # called as a script starts
        self._overlays = os.geteuid() == 0  # until a mount is refused

    @classmethod
    def for_run(cls, opts: RunOptions, manifest: Manifest, db: Database,
                console: Console) -> "LocalExecutor":
        return cls(db, console, opts.parallel or os.cpu_count() or 1, opts.output_mode,
                   opts.timeout)

    def __enter__(self) -> "LocalExecutor":
        fuse_demanded(self.output_mode)
        self.capture: OutputCapture | None = None  # started with the first task
        self.store = self.db.objects
        # Forked now, before grit grows and before any thread starts; mounted at
        # the first task.
        self._server, self._unavailable = fork_fuse_server(
            self.output_mode, self.workroot, self.capacity, self.db.objects_path)
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()  # (spec, future); None: stop
        self._workers: list[threading.Thread] = []  # started with the first task
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        if kind is not None:  # the run failed: stop what runs rather than wait for it
            self.cancel()
        for _ in self._workers:
            self._tasks.put(None)
        for worker in self._workers:
            worker.join()
        if self.capture:
            self.capture.__exit__(kind, *exc)
        elif self._server:  # no task ran: the server never mounted
            self._server.close()

    def submit(self, spec: TaskSpec) -> "concurrent.futures.Future[TaskResult]":
        if self.capture is None:
            self._start_capture()
            self._workers = [threading.Thread(target=self._work, name=f"grit-task-{i}", daemon=True)
                             for i in range(self.capacity)]
            for worker in self._workers:
                worker.start()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._tasks.put((spec, future))
        return future

    def _work(self) -> None:
        """A worker thread: runs tasks in the order submitted until told to stop
        (a ThreadPoolExecutor cost 25 Python calls a task more)."""
        while True:
            item = self._tasks.get()
            if item is None:
                slot = getattr(self._local, "slot", None)
                if slot and slot.input >= 0:
                    os.close(slot.input)
                return
            item[1].set_result(self.run(item[0]))

    def _start_capture(self) -> None:
        """The output capture, at the first task: a run with nothing to do mounts
        nothing."""
        self.capture = open_capture(self.output_mode, self._server, self._unavailable,
                                    self.console, self.store)
        self.capture.__enter__()
        self.output_mode_used = self.capture.mode
        self.console.detail(f"output mode: {self.capture.description}")

    def cancel(self) -> None:
        """SIGTERM to running scripts now; SIGKILL to those still running after
        TERMINATE_GRACE_SECONDS (a script may ignore or trap SIGTERM)."""
        if self._stopping:
            return
        self._terminate_all(signal.SIGTERM)
        kill = threading.Timer(TERMINATE_GRACE_SECONDS, self._terminate_all, (signal.SIGKILL,))
        kill.daemon = True
        kill.start()

    def _slot(self) -> "_Slot":
        """This worker thread's scratch directory. Its files are rewritten in
        place by each task rather than created and deleted: file creation
        after many deletions is slow on some filesystems (ext4 without a
        journal scans recently freed inodes)."""
        slot = getattr(self._local, "slot", None)
        if slot is None:
            with self._lock:
                self._slots += 1
                path = os.path.join(self.workroot, f"worker-{self._slots}")
            shutil.rmtree(path, ignore_errors=True)  # an earlier -watch round's executor's
            os.mkdir(path, 0o700)
            # The logs stay open from task to task: scripts see them only as
            # their stdout and stderr, never by path.
            slot = self._local.slot = _Slot(
                path, *(io.FileIO(open_private(os.path.join(path, name)), "r+")
                        for name in ("stdout", "stderr")))
        return slot

    def run(self, spec: TaskSpec) -> TaskResult:
        try:
            result = self._run_in(spec, self._slot())
        except Exception as e:  # disk full, damaged object, …: this task fails, the run goes on
            result = TaskResult(spec.task_id, error=f"grit could not run the task: {e}",
                                started_at=utc_now())
        if result.error:
            self._note_full_disk(result)
        return result

    def _note_full_disk(self, result: TaskResult) -> None:
        """A full disk shows up as EIO from LMDB, or as a script failing with an
        empty log (its stderr file is on that disk too): say so plainly."""
        note = f" [the disk holding {self.workroot} is full]"
        if note not in result.error and disk_is_full(self.workroot):
            result.error += note

    def _run_in(self, spec: TaskSpec, slot: "_Slot") -> TaskResult:
        result = TaskResult(spec.task_id, started_at=utc_now(), node=NODE)
        started = time.monotonic()
        input_file = self._write_input(spec, slot) if spec.input_hash else ""
        out = self.capture.prepare(slot.path, spec.task_id)
        try:
            self._run_script(spec, slot, out, input_file, result, started)
        except BaseException:  # a timeout, or grit's own error: what the script
            self.capture.discard(out)  # wrote must not reach the worker's next task
            raise
        finally:
            if input_file == f"{slot.path}/in/input":
                self._drop_overlay(slot.path)
        return result

    def _run_script(self, spec: TaskSpec, slot: "_Slot", out: str, input_file: str,
                    result: TaskResult, started: float) -> None:
        """Run the task's script in `out` and fill in `result`: its outputs
        collected, or why it failed (its outputs discarded)."""
        input_dir, input_list = self._gather(spec, slot.path, out)
        env = dict(self._environ, INPUT_FILE=input_file, INPUT_DIR=input_dir,
                   INPUT_LIST=input_list, OUTPUT_DIR=out, GRIT_STEP=spec.step,
                   GRIT_TASK_ID=str(spec.task_id), GRIT_ATTEMPT=str(spec.attempt),
                   GRIT_INPUT_NAME=spec.input_name,
                   GRIT_INPUT_HASH=spec.input_hash, GRIT_PREVIOUS_START=spec.previous_start)
        log_out, log_err = slot.stdout, slot.stderr
        log_out.seek(0)
        log_err.seek(0)
        spawn = self._spawn_streaming if self.console.verbose else self._spawn_and_wait
        timed_out = ""  # a task killed at its timeout keeps its start, duration and logs
        try:
            status = spawn(spec, env, log_out.fileno(), log_err.fileno(), result)
        except TaskTimeout as e:
            status, timed_out = -signal.SIGKILL, str(e)
        out_size, err_size = truncate_here(log_out.fileno()), truncate_here(log_err.fileno())
        result.duration = time.monotonic() - started
        if status is None:
            result.interrupted = True
            self.capture.discard(out)
            return
        result.exit_code = status
        try:
            if status == 0:
                result.outputs = self.capture.collect(out, self.store)
            else:
                result.error = (timed_out or describe_exit(status)) + last_stderr_line(log_err)
                self._note_full_disk(result)  # before discarding frees the space
                # An output refused while the script ran explains its failure best.
                problem = self.capture.discard(out)
                if problem:
                    result.error = f"{problem} ({result.error})"
        except OutputError as e:
            result.error = str(e)
            self.capture.discard(out)
        except OSError as e:
            result.error = f"cannot collect outputs: {e}"
            self.capture.discard(out)
        result.stdout_hash = self._keep_log(log_out, out_size)
        result.stderr_hash = self._keep_log(log_err, err_size)

    def _write_input(self, spec: TaskSpec, slot: _Slot) -> str:
        """$INPUT_FILE: a large object beneath an overlay or placed
        (ObjectStore.place), a small one's bytes written into the worker's
        reused input file."""
        path = f"{slot.path}/input"
        data = self.store.small(spec.input_hash)
        if data is None and os.path.exists(self.store.file_path(spec.input_hash)):
            if self._overlay_input(spec.input_hash, slot.path):
                return f"{slot.path}/in/input"
            self.store.place(spec.input_hash, path)
            return path
        fd, size = self._input_file(slot, path)
        offset = 0
        for block in (data,) if data is not None else self.store.open(spec.input_hash):
            _pwrite_all(fd, block, offset)
            offset += len(block)
        if size > offset:
            os.ftruncate(fd, offset)
        return path

    @staticmethod
    def _input_file(slot: _Slot, path: str) -> tuple[int, int]:
        """The worker's input file, open, and its size: kept open from task to
        task while it stays our one-link 0600 file (a script may have removed,
        replaced, linked or chmod-ed it: then a new one)."""
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(path, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == slot.input_id and st.st_nlink == 1 and \
                    st.st_mode == stat.S_IFREG | 0o600:
                return slot.input, st.st_size
        if slot.input >= 0:
            os.close(slot.input)
        slot.input = open_private(path)
        st = os.fstat(slot.input)
        slot.input_id = (st.st_dev, st.st_ino)
        return slot.input, st.st_size

    def _overlay_input(self, digest: str, slot: str) -> bool:
        """Root's $INPUT_FILE of a large object without a copy, where the store
        would copy it: the object (hard-linked) beneath an overlay whose upper
        layer takes whatever the script writes, removes or renames there (the
        file is copied up whole at its first write). False where the store
        would not copy, or where mounting is refused (copies from then on)."""
        if not self._overlays or self.store.placing != "copy":
            return False
        self._drop_overlay(slot)  # what a task that failed before its script left
        layers = [os.path.join(slot, name) for name in ("in-lower", "in-upper", "in-work", "in")]
        for layer in layers:
            os.makedirs(layer, 0o700, exist_ok=True)
        os.link(self.store.file_path(digest), os.path.join(layers[0], "input"))
        self._overlays = mount_overlay(*layers)
        if not self._overlays:
            self._drop_overlay(slot)
        return self._overlays

    @staticmethod
    def _drop_overlay(slot: str) -> None:
        """After the task: unmount its input overlay and empty its layers."""
        merged = os.path.join(slot, "in")
        if os.path.ismount(merged):
            _unmount(merged, fuse=False)
        for layer in ("in-lower", "in-upper"):
            shutil.rmtree(os.path.join(slot, layer), ignore_errors=True)

    def _gather(self, spec: TaskSpec, slot: str, out: str) -> tuple[str, str]:
        """A gather task's $INPUT_DIR and $INPUT_LIST ("" for other tasks)."""
        if spec.gathered is None:
            return "", ""
        tree = input_tree(spec.gathered)
        top = self.capture.inputs(slot, out, tree, self.store)
        listing = os.path.join(slot, "input-list")
        with os.fdopen(open_private(listing), "w", encoding="utf-8",
                       errors="surrogateescape") as f:
            f.writelines(f"{r.name}\t{top}/{path}\n" for path, r in tree)
            f.flush()
            truncate_here(f.fileno())
        return top, listing

    def _spawn_and_wait(self, spec: TaskSpec, env: dict, fd_out: int, fd_err: int,
                        result: TaskResult) -> int | None:
        """Exit status (negative: killed by that signal), or None if grit
        stopped it; what the script used goes into `result`."""
        files = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                 (os.POSIX_SPAWN_DUP2, fd_out, 1), (os.POSIX_SPAWN_DUP2, fd_err, 2)]
        launch = _Launch(spec, env, files)
        launch.started.acquire()
        with self._lock:
            if self._stopping:
                return None
            self._waiting.append(launch)
            self._hand_on()
        launch.started.acquire()
        if launch.error:
            raise launch.error
        if launch.pid is None:
            return None  # grit is stopping
        if self.on_start:
            self.on_start(spec)
        return self._wait_for(launch.pid, spec, result)

    def _slots_for(self, spec: TaskSpec) -> int:
        return min(spec.cpus, self.parallel)  # a task wanting more than -parallel runs alone

    def _hand_on(self) -> None:
        """Start waiting scripts, in order, while their slots (-parallel, one per
        cpu a task needs) are free. Call with self._lock held. The thread that
        saw a script exit starts the next one itself: handing that to a thread
        that has to wake up first cost 185 us a task (bench)."""
        while self._waiting and not self._stopping:
            need = self._slots_for(self._waiting[0].spec)
            if need > self._free:
                return
            launch = self._waiting.popleft()
            self._free -= need
            try:
                # posix_spawn (vfork) costs a fraction of subprocess.Popen.
                # setsid gives the script its own process group; SIGPIPE and
                # SIGXFSZ, which Python ignores, and SIGIO, which grit ignores,
                # are restored as a shell has them.
                launch.pid = os.posix_spawn(
                    self.shell, ["sh", "-c", launch.spec.script], launch.env,
                    file_actions=launch.files, setsid=True,
                    setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGIO))
            except OSError as e:
                self._free += need
                launch.error = e
                launch.started.release()
                continue
            self._running[launch.spec.task_id] = (launch.pid, launch.spec.step)
            launch.started.release()

    def _wait_for(self, pid: int, spec: TaskSpec, result: TaskResult) -> int | None:
        timeout = spec.timeout or self.timeout
        fired: list[bool] = []

        def time_out() -> None:
            fired.append(True)  # before the kill, so the exit is read as a timeout
            _kill_group(pid, signal.SIGKILL)

        timer = threading.Timer(timeout, time_out) if timeout else None
        if timer:
            timer.start()
        try:
            # Wait without reaping, so the process group id cannot be reused
            # before we kill what the script left running in it.
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            with self._lock:
                self._free += self._slots_for(spec)
                self._hand_on()
            if timer:
                timer.cancel()
            _kill_group(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            status = os.waitstatus_to_exitcode(status)
            result.cpu_user, result.cpu_system = usage.ru_utime, usage.ru_stime
            self._note_peak(result, usage.ru_maxrss * 1024)  # Linux counts kilobytes
        finally:
            with self._lock:
                self._running.pop(spec.task_id, None)
        if self._stopping and status != 0:
            return None
        if fired and status != 0:
            raise TaskTimeout(f"timed out after {timeout:g} s (its process group was killed)")
        return status

    def _note_peak(self, result: TaskResult, peak: int) -> None:
        """The script's peak RSS if above grit's own, else that it was under
        grit's. Grit's only grows, so a value read earlier bounds it from
        below: /proc is read again (11 us) only when a peak exceeds that."""
        if peak > self._own_peak:
            self._own_peak = own_peak_rss()
        if peak > self._own_peak:
            result.peak_rss = peak
        else:
            result.rss_under = self._own_peak

    def _terminate_all(self, sig: int) -> None:
        """Stop starting scripts and signal the process groups of those running."""
        with self._lock:
            self._stopping = True
            groups = [pgid for pgid, _ in self._running.values()]
            for launch in self._waiting:
                launch.started.release()  # pid None: not started
            self._waiting.clear()
        for pgid in groups:
            _kill_group(pgid, sig)

    def running(self) -> collections.Counter:
        """How many scripts are running now, per step name."""
        with self._lock:
            return collections.Counter(step for _, step in self._running.values())

    def _keep_log(self, log: IO[bytes], size: int) -> str | None:
        if size == 0:
            return None
        if size >= FILE_MIN_BYTES:
            return self.store.put_file(f"/proc/self/fd/{log.fileno()}")[0]
        return self.store.put(os.pread(log.fileno(), size, 0))[0]

    def _spawn_streaming(self, spec: TaskSpec, env: dict, fd_out: int, fd_err: int,
                         result: TaskResult) -> int | None:
        """_spawn_and_wait for -verbose: the script writes into pipes, and a
        thread per pipe copies what arrives into its log and shows it, line by line."""
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(2)]
        stop = threading.Event()
        tees = [threading.Thread(target=self._tee, args=(r, log, f"  [{spec.step} #{spec.task_id} "
                                                         f"{label}]", stop), daemon=True)
                for (r, _), log, label in zip(pipes, (fd_out, fd_err), ("stdout", "stderr"))]
        for tee in tees:
            tee.start()
        try:
            return self._spawn_and_wait(spec, env, pipes[0][1], pipes[1][1], result)
        finally:
            for _, w in pipes:
                os.close(w)
            for tee in tees:  # a process the script left outside its group may hold a pipe
                tee.join(RELEASE_GRACE_SECONDS)
            stop.set()
            for tee in tees:
                tee.join()

    def _tee(self, pipe: int, log: int, prefix: str, stop: threading.Event) -> None:
        partial = b""
        while not stop.is_set():
            if not select.select([pipe], [], [], 0.1)[0]:
                continue
            data = os.read(pipe, 65536)
            if not data:
                break
            view = memoryview(data)
            while view:
                view = view[os.write(log, view):]
            *lines, partial = (partial + data).split(b"\n")
            for line in lines:
                self.console.detail(f"{prefix} {line.decode('utf-8', 'replace')}")
        if partial:
            self.console.detail(f"{prefix} {partial.decode('utf-8', 'replace')}")
        os.close(pipe)


EXECUTORS["local"] = LocalExecutor


def open_private(path: str) -> int:
    """Open `path` for reading and writing at offset 0, as a 0600 regular file
    of ours; the caller truncates it to what it wrote (see truncate_here).

    Scratch files are reused from task to task; if a script replaced one with
    a symlink or something else, it is removed rather than followed. They are
    not opened with O_TRUNC: freeing a file's blocks only to allocate them again
    cost 169 us a task here, overwriting then truncating 7 us.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError:  # ELOOP (a symlink), EISDIR, ...
        fd = -1
    if fd >= 0:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            if stat.S_IMODE(st.st_mode) != 0o600:
                os.fchmod(fd, 0o600)
            return fd
        os.close(fd)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)
    return os.open(path, flags | os.O_EXCL, 0o600)


def truncate_here(fd: int) -> int:
    """Cut a reused scratch file at the current offset, the end of what was
    written this time (for a log, the script's own writes through the shared
    file description), and return it. Only when it is longer: ftruncate costs
    even when it changes nothing (77 us on ext4 here, against 1 us for fstat)."""
    here = os.lseek(fd, 0, os.SEEK_CUR)
    if os.fstat(fd).st_size > here:
        os.ftruncate(fd, here)
    return here


def describe_exit(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


def last_stderr_line(log: IO[bytes]) -> str:
    """": " and the last line of a failed script's stderr that says something
    (progress meters, colors and blank lines left out), or "" if none;
    -log shows the rest."""
    log.seek(max(0, os.fstat(log.fileno()).st_size - STDERR_TAIL_BYTES))
    for line in reversed(re.split(r"[\r\n]", log.read().decode("utf-8", "replace"))):
        line = ANSI_ESCAPE.sub("", line).strip()
        if line:  # a long line keeps both ends: a path first, the reason last
            half = ERROR_LINE_CHARS // 2
            return ": " + (line if len(line) <= ERROR_LINE_CHARS else
                           f"{line[:half]} … {line[-half:]}")
    return ""


def error_line(error: str) -> str:
    """A stored error as one line. Databases before schema 3 kept the whole
    stderr tail; its last line says most."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    if len(lines) <= 1:
        return error.strip()
    return f"{lines[0].split(': ', 1)[0]}: {lines[-1]}"


# =============================================================================
# Node workers
# =============================================================================
# How a task runs on another machine: the coordinator writes a job folder
# (tasks.json: the tasks as specs in chunks; inputs.pack: their small input
# objects; large ones as files named by hash), and `grit -worker FOLDER` runs
# one chunk there with a LocalExecutor over a scratch database, leaving a
# result record per task (its TaskResult as a JSON line, then its small
# objects) in batch files in FOLDER/records for the coordinator to ingest.
# Done with its chunk, an element takes further tasks the coordinator hands it
# (FOLDER/more/K-N.json and .pack, N = 1, 2, ...), waiting MORE_WAIT_SECONDS
# for each: one start-up serves several rounds and steps. A remote executor
# only moves folders and starts workers.

RECORD_INTERVAL = 0.2  # seconds between looks for new result records (a listing per job)
MORE_WAIT_SECONDS = 2.0  # an element done with its tasks waits this long for more

# Objects smaller than this travel inside one file: a job's input pack, a batch
# of results. Creating a file cost 0.2-0.9 ms here (on NFS a round trip to the
# server), so not one per object; larger ones go as files named by hash.
INLINE_BYTES = 1024 * 1024


def json_form(task: TaskSpec | TaskResult) -> dict:
    """A TaskSpec's or TaskResult's fields as JSON values: asdict() without its
    deep copy of every value (20 Python calls a task)."""
    data = {name: getattr(task, name) for name in task.__dataclass_fields__}
    for key in ("gathered", "outputs"):
        if data.get(key) is not None:
            data[key] = [{"name": o.name, "hash": o.hash, "size": o.size} for o in data[key]]
    return data


def spec_from_json(data: dict) -> TaskSpec:
    """A TaskSpec from its json_form()."""
    gathered = data.pop("gathered")
    return TaskSpec(**data, gathered=None if gathered is None else [Output(**o) for o in gathered])


def result_from_json(data: dict) -> TaskResult:
    """A TaskResult from its json_form() (and whatever the record adds)."""
    fields = {k: data[k] for k in TaskResult.__dataclass_fields__}
    return TaskResult(**dict(fields, outputs=[Output(**o) for o in data["outputs"]]))


def export_object(store: ObjectStore, digest: str, folder: str) -> None:
    """An object as the file folder/HASH, unless there already: a large one
    linked where the folder is on the store's filesystem, else copied."""
    path, source = os.path.join(folder, digest), store.file_path(digest)
    if os.path.exists(path):
        return
    with contextlib.suppress(OSError):  # small (no file), or another filesystem
        os.link(source, path)
        return
    write_atomically(path, lambda f: f.writelines(store.open(digest)))


def task_hashes(spec: TaskSpec) -> list[str]:
    """The objects a task reads."""
    return [spec.input_hash] * bool(spec.input_hash) + [o.hash for o in spec.gathered or ()]


def result_hashes(result: TaskResult) -> list[str]:
    """The objects a task made: outputs and logs."""
    return [o.hash for o in result.outputs] + [h for h in (result.stdout_hash,
                                                           result.stderr_hash) if h]


def pack_index(store: ObjectStore, digests: Iterable[str], big_dir: str) -> dict[str, list[int]]:
    """Where pack_objects puts each small object: [offset, size] in the pack.
    Objects of INLINE_BYTES or more go to big_dir/HASH instead, now."""
    index: dict[str, list[int]] = {}
    offset = 0
    for digest in dict.fromkeys(digests):
        size = store.size(digest)
        if size < INLINE_BYTES:
            index[digest] = [offset, size]
            offset += size
        else:
            export_object(store, digest, big_dir)
    return index


def pack_objects(store: ObjectStore, index: dict[str, list[int]], f: IO[bytes]) -> None:
    for digest in index:
        f.writelines(store.open(digest))


def unpack_object(store: ObjectStore, digest: str, pack: IO[bytes], base: int,
                  index: dict[str, list[int]], big_dir: str, move: bool = False) -> str:
    """An object from a pack (at base + its offset) or from big_dir into the
    store (moved there with `move`), its hash checked: "", or what went wrong."""
    if store.has(digest):
        return ""
    try:
        if digest in index:
            offset, size = index[digest]
            pack.seek(base + offset)
            stored, _ = store.put(pack.read(size))
        else:
            stored, _ = store.put_file(os.path.join(big_dir, digest), move)
    except OSError as e:
        return f"object {digest[:12]} unreadable in the work dir ({e.strerror})"
    return "" if stored == digest else \
        f"object {digest[:12]} arrived as {stored[:12]} (damaged on the way)"


# An element writes the results of the tasks that ended at most this often,
# all in one file: creating a file cost 0.2-0.9 ms here (on NFS a round trip).
BATCH_SECONDS = RECORD_INTERVAL / 2


def batch_number(name: str) -> tuple[int, int]:
    """(K, S) of a records/K-S.batch file's name; (-1, -1) for other names."""
    k, _, number = name.removesuffix(".batch").partition("-")
    if name.endswith(".batch") and k.isdigit() and number.isdigit():
        return int(k), int(number)
    return -1, -1


def read_records(f: IO[bytes]) -> Iterator[tuple[dict, int]]:
    """The records of a batch file: each one's JSON line and the offset of its
    small objects, which follow it (their "pack" index counts from there)."""
    while True:
        line = f.readline()
        if not line:
            return
        data = json.loads(line)
        base = f.tell()
        yield data, base
        f.seek(base + sum(size for _, size in data["pack"].values()))


def recorded_tasks(records: str, element: int = -1) -> list[int]:
    """The tasks whose results a job's records/ holds (one element's, or all)."""
    tasks: list[int] = []
    for name in os.listdir(records):
        k, _ = batch_number(name)
        if k >= 0 and element in (-1, k):
            with contextlib.suppress(OSError, ValueError), \
                    open(os.path.join(records, name), "rb") as f:
                tasks += [data["task_id"] for data, _ in read_records(f)]
    return tasks


class ResultBatches:
    """An element's result records, written a batch at a time as
    records/K-S.batch (K the element, S = 1, 2, ...): per task its TaskResult
    as a JSON line, then the bytes of its small objects (its large ones go
    first, as files). The coordinator looks the next S up by name. A batch is
    written to a temporary file and linked into place, so a name is never
    written twice, even by an element Slurm started again."""

    def __init__(self, store: ObjectStore, records: str, element: int) -> None:
        self.store, self.records, self.element = store, records, element
        self.pending: list[bytes] = []
        self.since = 0.0  # when the oldest pending record was added (monotonic)
        # tasks with a record: what an element Slurm started again skips
        self.done = set(recorded_tasks(records, element))
        self.number = max((n for k, n in map(batch_number, os.listdir(records)) if k == element),
                          default=0)  # of the last batch written

    def add(self, result: TaskResult, mode: str) -> None:
        index = pack_index(self.store, result_hashes(result),
                           os.path.join(os.path.dirname(self.records), "objects"))
        record = io.BytesIO()
        record.write(json.dumps(dict(json_form(result), mode=mode, node=NODE,
                                     pack=index)).encode() + b"\n")
        pack_objects(self.store, index, record)
        if not self.pending:
            self.since = time.monotonic()
        self.pending.append(record.getvalue())
        self.done.add(result.task_id)

    def due(self) -> float | None:
        """Seconds until the pending records are due to be written (None: none pending)."""
        if not self.pending:
            return None
        return max(0.0, self.since + BATCH_SECONDS - time.monotonic())

    def write(self) -> None:
        if not self.pending:
            return
        tmp = os.path.join(self.records, f".{self.element}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.writelines(self.pending)
        while True:
            self.number += 1
            path = os.path.join(self.records, f"{self.element}-{self.number}.batch")
            try:
                os.link(tmp, path)
                os.unlink(tmp)
            except FileExistsError:
                continue  # a listing that lagged hid it from us
            except OSError:  # no hard links here
                os.rename(tmp, path)
            break
        self.pending = []


def cmd_worker(folder: str, console: Console) -> int:
    """-worker FOLDER: this array element's chunk of tasks (SLURM_ARRAY_TASK_ID),
    then the further tasks handed to it, run by a LocalExecutor here over a
    scratch database; their results go into FOLDER/records a batch at a time."""
    with open(os.path.join(folder, "tasks.json"), encoding="utf-8") as f:
        plan = json.load(f)
    element = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    records = os.path.join(folder, "records")
    scratch = tempfile.mkdtemp(prefix="grit-worker-")
    # For the coordinator: this element's node, then each task as its script starts.
    started = open(os.path.join(records, f"started-{element}"), "a", buffering=1,
                   encoding="utf-8")
    started.write(f"node {NODE}\n")
    lock = threading.Lock()

    def tell(spec: TaskSpec) -> None:
        with lock:
            started.write(f"{spec.task_id}\n")
    try:
        with Database.for_run(os.path.join(scratch, "db"), console) as db, \
                LocalExecutor(db, console, plan["cpus"], plan["output_mode"],
                              plan["timeout"]) as executor:
            executor.on_start = tell
            db.objects.hold = True  # a scratch store: its small objects need not reach disk
            # An element Slurm started again skips the tasks its batches hold.
            batches = ResultBatches(db.objects, records, element)
            specs = [spec_from_json(t) for t in plan["chunks"][element]]
            pack_path = os.path.join(folder, "inputs.pack")
            for more in itertools.count(1):
                specs = [s for s in specs if s.task_id not in batches.done]
                with open(pack_path, "rb") as pack:
                    if not run_chunk(db.objects, executor, specs, plan, pack, batches):
                        break  # told to stop
                handful = take_more(folder, element, more) if plan.get("more") else None
                if handful is None:
                    break
                plan = dict(plan, **handful)
                specs = [spec_from_json(t) for t in plan["chunks"][0]]
                pack_path = os.path.join(folder, "more", f"{element}-{more}.pack")
    finally:
        started.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return EXIT_OK


def take_more(folder: str, element: int, more: int) -> dict | None:
    """The element's more-th handful of further tasks ({"chunks": [specs], "pack":
    index}), waiting up to MORE_WAIT_SECONDS for the coordinator to hand it; None
    once this worker (or the coordinator, the run being over) closed that slot
    by creating it empty. The slot is a name both create exclusively: the
    coordinator by link(), this worker by O_EXCL, so only one of them wins."""
    slot = os.path.join(folder, "more", f"{element}-{more}.json")
    deadline = time.monotonic() + MORE_WAIT_SECONDS
    while True:
        try:
            with open(slot, "rb") as f:
                text = f.read()
            return json.loads(text) if text else None
        except FileNotFoundError:
            if not os.path.isdir(os.path.dirname(slot)):
                return None  # the job folder is gone: the run is over
        except (OSError, ValueError):
            return None
        if time.monotonic() >= deadline and close_slot(slot):
            return None
        time.sleep(RECORD_INTERVAL / 2)


# How long a worker whose script died of SIGTERM waits for its own (scancel's).
STOP_GRACE_SECONDS = 1.0


def run_chunk(store: ObjectStore, executor: LocalExecutor, specs: list[TaskSpec], plan: dict,
              pack: IO[bytes], batches: ResultBatches) -> bool:
    """Run these tasks, recording each; False if the worker was told to stop."""
    # scancel signals the scripts too: one that dies of it once this worker
    # was told to stop is interrupted (it stays pending), not failed.
    stopping = threading.Event()
    finished: queue.SimpleQueue = queue.SimpleQueue()  # futures, as their tasks end
    with stop_on_signals(lambda: (stopping.set(), executor.cancel())):
        running = 0
        for spec in specs:
            problem = load_inputs(store, spec, plan, pack)
            if problem:
                batches.add(TaskResult(spec.task_id, error=problem, started_at=utc_now()), "")
            else:
                if spec.gathered is not None:
                    store.sync()  # the FUSE server reads a gather task's inputs from the store
                executor.submit(spec).add_done_callback(finished.put)
                running += 1
        while running:
            try:
                result = finished.get(timeout=batches.due()).result()
            except queue.Empty:
                batches.write()
                continue
            running -= 1
            if result.exit_code == -signal.SIGTERM and not stopping.is_set():
                # scancel signals every process of the job: the script's TERM
                # may come before this worker's own, which makes it interrupted
                stopping.wait(STOP_GRACE_SECONDS)
            if result.ok or not stopping.is_set():
                batches.add(result, executor.capture.description)
            if stopping.is_set():
                batches.write()  # before Slurm's KILL
        batches.write()
    return not stopping.is_set()


def load_inputs(store: ObjectStore, spec: TaskSpec, plan: dict, pack: IO[bytes]) -> str:
    """A task's inputs from the job's pack (or the work dir) into the scratch
    store, each hash checked: "", or what went wrong."""
    for digest in task_hashes(spec):
        problem = unpack_object(store, digest, pack, 0, plan["pack"], plan["objects"])
        if problem:
            return f"input {problem}"
    return ""


# =============================================================================
# Slurm executor
# =============================================================================
# -executor slurm: a dispatch round's tasks of one step go into a job folder
# (Node workers) on the shared work dir, run by one array job whose elements
# each run `grit -worker FOLDER` over a chunk. One poller thread submits,
# ingests results (each object's hash checked as it goes into the store) and asks
# squeue about the whole run now and then. Job folders are in the database
# (slurm_job), so a run after a kill -9 adopts them.

ELEMENT_SECONDS = 60.0  # an element runs about this long once a step's durations are known
ELEMENT_LEAST_SECONDS = 2.0  # and at least this long: its start-up costs about a second
# A step's new tasks wait while one of its elements has not started (the
# cluster is full): they join the next job instead of making many small ones.
HOLD_SECONDS = 30.0
SUBMIT_SETTLE_SECONDS = 0.05  # the scheduler hands over a round's tasks in a burst
SBATCH_TRIES = 6  # a busy controller gets 1 + 2 + 4 + 8 + 16 s
SBATCH_TRANSIENT = re.compile(r"temporarily unavailable|timed? ?out|try again|Unable to contact",
                              re.IGNORECASE)
CANCEL_WAIT_SECONDS = 30.0  # after scancel: most to wait for records and an empty squeue
SLURM_CAPACITY = 100_000  # tasks handed to Slurm at once (each step's parallel still caps)
# States of a job that has not ended; any other state (COMPLETED, FAILED,
# TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, CANCELLED, ...) is final.
SLURM_ALIVE = {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "REQUEUED",
               "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}
# Final states of an element whose tasks are not to blame (its node died, it was
# preempted) and GONE (squeue no longer knows it): its tasks without a result run
# again in a new job, without counting an attempt, at most LOST_MAX times.
SLURM_LOST = {"NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "GONE"}
LOST_MAX = 3
REQUEUED_GRACE_SECONDS = 1.0
# What slurmstepd writes last into an element's output, by the state it ended in.
SLURM_LAST_WORDS = [(r"CANCELLED AT \S+ DUE TO TIME LIMIT", "TIMEOUT"),
                    (r"CANCELLED AT \S+ DUE TO NODE FAIL", "NODE_FAIL"),
                    (r"CANCELLED AT \S+ DUE TO PREEMPTION", "PREEMPTED"),
                    (r"CANCELLED AT \S+ \*\*\*", "CANCELLED"),
                    (r"oom.kill event", "OUT_OF_MEMORY")]
# Reasons a job pends that waiting never clears: it is cancelled, its tasks fail.
SLURM_NEVER_RUNS = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit",
                    "BadConstraints", "InvalidAccount", "InvalidQOS", "QOSMaxCpuPerJobLimit",
                    "QOSMaxMemoryPerJob", "QOSMaxWallDurationPerJobLimit"}


def chunk_size(definition: StepDef, tasks: int, slots: int, mean: float | None) -> int:
    """Tasks per array element: the step's batch; else spread over `slots`
    elements (the free ones of -parallel), each running about ELEMENT_SECONDS
    (at least ELEMENT_LEAST_SECONDS) when the step's mean task duration is known."""
    if definition.batch:
        return definition.batch
    spread = max(1, -(-tasks // slots))
    if not mean:
        return spread
    longest = max(1, int(ELEMENT_SECONDS / mean))
    shortest = max(1, int(ELEMENT_LEAST_SECONDS / mean))
    return min(longest, max(shortest, spread))


def sbatch_options(definition: StepDef, run_timeout: float, chunk: int) -> list[str]:
    """A step's resources as sbatch options. --time: each task's time (else its
    timeout, else -timeout) times the chunk, in whole minutes (Slurm's unit)."""
    each = definition.time or definition.timeout or run_timeout
    options = [f"--cpus-per-task={definition.cpus}"]
    options += [f"--time={int(-(-each * chunk // 60))}"] * bool(each)
    options += [f"--mem={definition.mem}"] * bool(definition.mem)
    options += [f"--partition={definition.partition}"] * bool(definition.partition)
    return options + list(definition.sbatch)


def array_indices(text: str) -> list[int]:
    """squeue's %K: "3", or a pending rest like "0-9%4" or "2,5-7"."""
    indices: list[int] = []
    for part in text.split("%")[0].split(","):
        first, _, last = part.partition("-")
        if first.isdigit():
            indices.extend(range(int(first), int(last or first) + 1))
    return indices


def slurm_command(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise GritError(f"-executor slurm: {argv[0]} not found: Slurm's client commands must "
                        "be on PATH") from None
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 1, "", f"{argv[0]} timed out")


# -parallel with -executor slurm when sinfo cannot say how many CPUs the cluster has.
SLURM_PARALLEL_FALLBACK = 100


def cluster_cpus(console: Console) -> int:
    """CPUs of the cluster's nodes (-parallel's default with -executor slurm)."""
    out = slurm_command(["sinfo", "-h", "-N", "-o", "%N|%c"])
    nodes = dict(line.split("|", 1) for line in out.stdout.split() if "|" in line)
    cpus = sum(int(c) for c in nodes.values() if c.isdigit())
    if not cpus:
        problem = (out.stderr.strip().splitlines() or ["no nodes"])[-1]
        console.warn(f"sinfo cannot say how many CPUs the cluster has ({problem}): "
                     f"-parallel {SLURM_PARALLEL_FALLBACK}")
    return cpus or SLURM_PARALLEL_FALLBACK


def squeue_elements(selector: str) -> tuple[dict[str, dict[int, tuple[str, str]]],
                                           dict[str, str], str]:
    """One squeue over the jobs `selector` picks: each element's (state, pending
    reason) by Slurm job id and index; each job's id by its --comment (grit's job
    folder name); and why squeue did not answer ("" when it did). Jobs Slurm
    purged (MinJobAge) are absent."""
    done = slurm_command(["squeue", "-h", "-t", "all", selector, "-o", "%F|%K|%T|%r|%k"])
    if done.returncode != 0 and "Invalid job id" not in done.stderr:  # (every one purged)
        return {}, {}, (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    seen: dict[str, dict[int, tuple[str, str]]] = {}
    ids: dict[str, str] = {}
    for line in done.stdout.splitlines():
        fields = line.split("|", 4)
        if len(fields) == 5:
            job_id, indices, state, reason, comment = fields
            ids[comment] = job_id
            for index in array_indices(indices):
                seen.setdefault(job_id, {})[index] = (state, reason)
    return seen, ids, ""


@dataclass
class _Element:
    """One element of an array job: its chunk of tasks, as squeue last saw it."""

    tasks: list[int]
    state: str = "PENDING"
    ended: float = 0.0  # when squeue first showed it ended or gone (monotonic); 0: not
    started: bool = False
    left: int = -1  # its tasks without a result yet
    read: int = 0  # bytes of its started-K file read (-verbose)
    node: str = ""
    requeued: bool = False  # Slurm queued it again (its node failed): grit cancelled it
    more: int = 0  # handfuls of further tasks handed to it (more/K-N.json, N <= more)
    closed: bool = False  # its worker took no more (it closed its next slot)
    batches: int = 0  # its records/K-S.batch ingested for S = 1 .. batches (later ones too, maybe)
    last: float = 0.0  # when its last result came (monotonic)

    def __post_init__(self) -> None:
        self.left = len(self.tasks)


@dataclass
class _Job:
    """An array job of one step: its folder on the work dir and its elements."""

    name: str
    folder: str
    step: str
    elements: list[_Element]
    slurm_id: str = ""
    throttle: int = 0  # most of its elements Slurm runs at once (its share of -parallel)
    adopted: bool = False  # submitted by an earlier run
    never_runs: str = ""  # a pending reason that never clears
    recorded: set[str] = field(default_factory=set)  # record files ingested
    options: list[str] | None = None  # its sbatch options if its elements take further tasks


def slurm_work_dir(opts: RunOptions, manifest: Manifest) -> str:
    """-work-dir, else [slurm] work_dir (relative to the manifest), else
    grit-work beside the manifest: project folders are shared on clusters."""
    if "work_dir" in opts.executor_flags:
        return os.path.abspath(opts.executor_flags["work_dir"])
    base = os.path.dirname(os.path.abspath(manifest.path))
    return os.path.join(base, manifest.executors["slurm"].work_dir  # type: ignore[attr-defined]
                        or "grit-work")


# How nodes run grit.py: imported from its path (sys.argv[1]), its main() called.
LAUNCH = ("import importlib.util as u, sys; s = u.spec_from_file_location('grit', sys.argv.pop(1)); "
          "m = sys.modules['grit'] = u.module_from_spec(s); s.loader.exec_module(m); "
          "sys.exit(m.main())")


@dataclass
class SlurmSettings:
    """The manifest's [slurm] table, besides the defaults of the steps' scheduling keys."""

    command: str = ""  # how a node runs grit; "" = found by grit (README: Running on Slurm)
    work_dir: str = ""  # the shared work dir; "" = grit-work beside the manifest


class SlurmExecutor(Executor):
    """The Executor that runs tasks as Slurm array jobs (see the section's head).

    Futures of tasks resolve from result records; a task's record is the only
    word on it that survives Slurm purging finished jobs (MinJobAge).
    """

    settings = SlurmSettings
    queues = True
    flags = {"work-dir": ("DIR", "with -executor slurm: the folder shared with the nodes "
                                 "(default: grit-work beside the manifest)")}

    def __init__(self, opts: RunOptions, manifest: Manifest, db: Database,
                 console: Console) -> None:
        self.db = db
        self.console = console
        self.steps = {d.name: d for d in manifest.steps}
        # most array elements of the run in flight
        self.parallel = opts.parallel or cluster_cpus(console)
        self.capacity = SLURM_CAPACITY
        self.work = os.path.join(slurm_work_dir(opts, manifest),
                                 hashlib.sha256(db.path.encode()).hexdigest()[:12])
        self.output_mode = opts.output_mode
        self.timeout = opts.timeout
        self.durations = db.meta.mean_durations()  # step -> mean seconds a task, learnt
        self.command = manifest.executors["slurm"].command  # type: ignore[attr-defined]
        self.job_name = "grit-" + os.path.basename(self.work)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._waiting: list[TaskSpec] = []  # submitted, not yet in a job
        self._last_submit = 0.0
        self._held_since: dict[str, float] = {}  # step -> when its waiting tasks began to wait
        self._futures: dict[int, concurrent.futures.Future] = {}
        self._specs: dict[int, TaskSpec] = {}  # tasks asked for and not finished
        self._lost: collections.Counter = collections.Counter()  # task -> times its element was lost
        self._where: dict[int, tuple[_Job, int]] = {}  # task -> its job and element
        self._early: dict[int, TaskResult] = {}  # adopted jobs' results not yet asked for
        self._jobs: dict[str, _Job] = {}  # jobs with tasks to come
        self._ended: list[_Job] = []  # removed at exit, once the scheduler committed
        self._cancel = threading.Event()
        self._broken = ""  # why the poller stopped, if it failed
        self._closing = False
        self._warned: set[str] = set()
        self._serial = itertools.count(1)
        self.ending = False  # see end_earlier_jobs()

    # -- the seam ----------------------------------------------------------------

    @classmethod
    def plan(cls, plan: list[dict], manifest: Manifest, opts: RunOptions) -> None:
        """The array job each step's tasks would go to now."""
        parallel = opts.parallel or cluster_cpus(Console(0))
        db = Database(opts.db)
        durations = db.meta.mean_durations() if os.path.isfile(db.metadata_path) else {}
        db.close()
        for entry in (e for e in plan if e["tasks"]):
            definition = manifest.step(entry["name"])
            size = chunk_size(definition, entry["tasks"], parallel,
                              durations.get(definition.name))
            job = {"elements": -(-entry["tasks"] // size), "batch": size,
                   "sbatch": sbatch_options(definition, opts.timeout, size)}
            entry["slurm_job"] = job
            entry.setdefault("notes", []).append(
                f"an array job of {job['elements']} element(s) of up to {size} task(s): "
                f"sbatch {' '.join(job['sbatch'])}")

    def __enter__(self) -> "SlurmExecutor":
        for folder in ("jobs", "objects"):
            os.makedirs(os.path.join(self.work, folder), exist_ok=True)
        self.command = self.command or self._default_command()
        self.console.detail(f"slurm: work dir {self.work}; nodes run grit as: {self.command}")
        self.store = self.db.objects
        self.book = self.db.slurm_jobs()
        self._adopt()
        self._thread = threading.Thread(target=self._poll, name="grit-slurm", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        if kind is not None:
            self.cancel()
        self._closing = True
        self._wake.set()
        self._thread.join()
        leftover = [j for j in self._jobs.values() if j.slurm_id]  # adopted, never asked for
        if leftover:
            slurm_command(["scancel", *(j.slurm_id for j in leftover)])
        self._close_idle(run_over=True)
        for job in self._ended + list(self._jobs.values()):
            shutil.rmtree(job.folder, ignore_errors=True)
            self.book.remove(job.name)
        if not self.book.all():
            shutil.rmtree(os.path.join(self.work, "objects"), ignore_errors=True)
        self.book.close()

    def submit(self, spec: TaskSpec) -> "concurrent.futures.Future[TaskResult]":
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._cancel.is_set() or self._broken:
                future.set_result(TaskResult(spec.task_id, error=self._broken or None,
                                             interrupted=not self._broken))
                return future
            if spec.task_id in self._early:
                future.set_result(self._early.pop(spec.task_id))
                return future
            self._futures[spec.task_id] = future
            self._specs[spec.task_id] = spec
            if spec.task_id not in self._where:  # else an adopted job runs it
                self._waiting.append(spec)
            self._last_submit = time.monotonic()
        self._wake.set()
        return future

    def cancel(self) -> None:
        """One scancel for the run's jobs; the poller waits for their records."""
        self._cancel.set()
        self._wake.set()

    def running(self) -> collections.Counter:
        """Tasks still to finish in elements that started, per step."""
        counts: collections.Counter = collections.Counter()
        for job in list(self._jobs.values()):
            counts[job.step] += sum(e.left for e in job.elements
                                    if e.started or e.state == "RUNNING")
        return counts

    @classmethod
    def end_earlier_jobs(cls, opts: RunOptions, manifest: Manifest, db: Database,
                         console: Console) -> dict[int, TaskResult]:
        """Before a run on another executor: the jobs an earlier -executor slurm
        run left (killed) are cancelled and the tasks their elements finished
        taken in (returned by task), so no task runs in two places at once."""
        jobs = db.meta.slurm_jobs()
        if not jobs:
            return {}
        if not shutil.which("scancel"):
            raise GritError(f"{len(jobs)} Slurm job(s) of an earlier -executor slurm run may "
                            "still be running, and Slurm's commands are not on PATH here to "
                            "cancel them: run where they are (-executor slurm adopts them)")
        slurm = cls(dataclasses.replace(opts, parallel=opts.parallel or 1), manifest, db, console)
        slurm.ending = True
        with slurm:
            tasks = [t for job in [*slurm._jobs.values(), *slurm._ended]
                     for e in job.elements for t in e.tasks]
            slurm.cancel()
            slurm._thread.join()
        # A failure may be the cancel's doing (a script whose mount went first): it runs here
        results = {t: slurm._early[t] for t in db.meta.pending_among(
            t for t, result in slurm._early.items() if result.ok)}
        console.info(f"slurm: {slurm.adopted} job(s) of an earlier -executor slurm run: took in "
                     f"{len(results)} finished task(s), cancelled the rest; "
                     f"{len(db.meta.pending_among(tasks)) - len(results)} of their task(s) "
                     "run here")
        return results

    # -- starting ----------------------------------------------------------------

    def _default_command(self) -> str:
        """grit.pyz copied into the work dir (nodes need python3), or this Python
        importing this grit (its path must be the same on the nodes): imported,
        not run as a script, Python keeps it compiled (0.1 s an element)."""
        here = os.path.dirname(os.path.abspath(__file__))
        if os.path.isfile(here):  # running from a zipapp
            target = os.path.join(os.path.dirname(self.work), "grit.pyz")
            if not os.path.exists(target) or not filecmp.cmp(here, target, shallow=False):
                with open(here, "rb") as pyz:
                    write_atomically(target, lambda f: shutil.copyfileobj(pyz, f))
            return f"python3 {shlex.quote(target)}"
        return f"{shlex.quote(sys.executable)} -c {shlex.quote(LAUNCH)} " \
               f"{shlex.quote(os.path.abspath(__file__))}"

    def _adopt(self) -> None:
        """Jobs an earlier run left (killed): their tasks are not submitted again."""
        for row in self.book.all():
            try:
                with open(os.path.join(row["folder"], "tasks.json"), encoding="utf-8") as f:
                    chunks = json.load(f)["chunks"]
            except (OSError, ValueError):  # never submitted, or its folder is gone
                self.book.remove(row["name"])
                continue
            job = _Job(row["name"], row["folder"], row["step"],
                       [_Element([t["task_id"] for t in chunk]) for chunk in chunks],
                       row["slurm_id"] or "", adopted=True)
            for k, element in enumerate(job.elements):  # and the tasks handed on since
                for handful in itertools.count(1):
                    try:
                        with open(os.path.join(job.folder, "more", f"{k}-{handful}.json"),
                                  "rb") as f:
                            text = f.read()
                    except OSError:
                        break
                    if not text:
                        break
                    element.tasks += [t["task_id"] for t in json.loads(text)["chunks"][0]]
                    element.more, element.left = handful, len(element.tasks)
            self._add(job)
        self.adopted = len(self._jobs)
        if self._jobs:
            self._collect()
            self._squeue()
            if not self.ending:
                self.console.info(f"slurm: adopted {self.adopted} job(s) of an earlier run; "
                                  f"{len(self._where)} of their task(s) still to finish")

    def _add(self, job: _Job) -> None:
        self._jobs[job.name] = job
        with self._lock:
            for k, element in enumerate(job.elements):
                for task in element.tasks:
                    self._where[task] = (job, k)

    # -- the poller ----------------------------------------------------------------

    def _poll(self) -> None:
        last_squeue = time.monotonic()
        try:
            while not self._cancel.is_set():
                self._wake.wait(RECORD_INTERVAL)
                self._wake.clear()
                if self._cancel.is_set():
                    break
                self._raise_throttles()
                self._submit_waiting()
                self._close_idle()
                self._collect()
                # squeue for the whole run at most every GRIT_SLURM_POLL seconds (Slurm
                # asks programs not to poll it in loops); records tell that tasks finished.
                if self._jobs and time.monotonic() - last_squeue >= settings().slurm_poll:
                    self._squeue()
                    last_squeue = time.monotonic()
                self._give_up_lost()
                if self._closing and not self._waiting:
                    return
            self._cancel_jobs()
        except Exception as e:  # a bug or an unforeseen answer: fail the tasks, not hang
            with self._lock:
                self._broken = f"grit's Slurm poller failed: {e!r}"
            self._fail_all(self._broken)

    def _submit_waiting(self) -> None:
        """One job per step for the tasks waiting, unless the step holds them."""
        deadline = time.monotonic() + RECORD_INTERVAL  # a burst ends, or this much is taken
        while time.monotonic() - self._last_submit < SUBMIT_SETTLE_SECONDS \
                and time.monotonic() < deadline:
            time.sleep(SUBMIT_SETTLE_SECONDS)
        with self._lock:
            specs, self._waiting = self._waiting, []
        by_step: dict[tuple[str, int], list[TaskSpec]] = {}  # an attempt may need more
        for spec in specs:
            by_step.setdefault((spec.step, spec.attempt), []).append(spec)
        for (step, attempt), group in by_step.items():
            definition = self.steps[step].for_attempt(attempt)
            group = self._hand_over(definition, group)
            if not group:
                continue
            if self._holds(step):
                with self._lock:
                    self._waiting += group
            else:
                self._held_since.pop(step, None)
                self._submit_job(definition, group)

    def _hand_over(self, definition: StepDef, specs: list[TaskSpec]) -> list[TaskSpec]:
        """Tasks for elements that already run, rather than a new job and its
        start-up (a second or more): elements done with their tasks and still
        waiting for more, and, while -parallel has no free slot, busy ones (they
        take them once done with their own), evenly. Only between jobs asking
        Slurm for the same resources, without a time limit or a step's batch.
        Returns the tasks no element took."""
        options = self._takes_more(definition)
        if not options:
            return specs
        now = time.monotonic()
        idle = [(job, k) for job in self._ended + list(self._jobs.values())
                if job.options == options for k, e in enumerate(job.elements)
                if not (e.left or e.closed or e.ended) and now - e.last < MORE_WAIT_SECONDS / 2]
        busy = [(job, k) for job in self._jobs.values() if job.options == options
                for k, e in enumerate(job.elements)
                if e.left and not (e.ended or e.requeued or e.closed)]
        free = self.parallel - self._in_flight() - len(idle)  # slots a new job would take
        takers = idle + (busy if free <= 0 else [])
        total = len(specs) + sum(job.elements[k].left for job, k in takers)
        for job, k in sorted(takers, key=lambda t: t[0].elements[t[1]].left):
            share = -(-total // (len(takers) + max(0, free))) - job.elements[k].left
            if share > 0 and specs and self._give(job, k, specs[:share]):
                specs = specs[share:]
        return specs

    def _takes_more(self, definition: StepDef) -> list[str] | None:
        """The sbatch options that a job's elements must share with a step to take
        its tasks; None if this step's elements take no further tasks (its batch
        is the user's word; a time limit is its chunk's)."""
        options = sbatch_options(definition, self.timeout, 1)
        if definition.batch or any(o.startswith("--time") for o in options):
            return None
        return options

    def _close_idle(self, run_over: bool = False) -> None:
        """Elements done with their tasks leave at once (their next slot closed)
        once the run is over, or while other elements of the run wait to start:
        those want the CPUs."""
        if not run_over and not any(e.left and not e.started for job in self._jobs.values()
                                    for e in job.elements):
            return
        now = time.monotonic()
        for job in self._ended + list(self._jobs.values()):
            for k, element in enumerate(job.elements):
                if job.options and not (element.left or element.closed) and \
                        now - element.last < MORE_WAIT_SECONDS:
                    element.closed = True  # by this, or already by its worker
                    close_slot(os.path.join(job.folder, "more", f"{k}-{element.more + 1}.json"))

    def _give(self, job: _Job, k: int, specs: list[TaskSpec]) -> bool:
        """Hand tasks to element k: their inputs' pack, then its next slot
        (more/K-N.json, linked: if the worker closed that slot, it is not taken)."""
        element = job.elements[k]
        base = os.path.join(job.folder, "more", f"{k}-{element.more + 1}")
        try:
            index = pack_index(self.store, (d for s in specs for d in task_hashes(s)),
                               os.path.join(self.work, "objects"))
            with open(base + ".pack", "wb") as pack:
                pack_objects(self.store, index, pack)
            plan = {"chunks": [[json_form(s) for s in specs]], "pack": index}
            write_atomically(base + ".next", lambda f: f.write(json.dumps(plan).encode()))
            os.link(base + ".next", base + ".json")
        except FileExistsError:
            element.closed = True
            return False
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(base + ".next")
        element.more += 1
        with self._lock:
            element.tasks += [s.task_id for s in specs]
            element.left += len(specs)
            for s in specs:
                self._where[s.task_id] = (job, k)
            if job in self._ended:
                self._ended.remove(job)
                self._jobs[job.name] = job
        self.book.more_tasks(job.name, len(specs))
        self.console.detail(f"slurm: job {job.slurm_id}_{k} takes {len(specs)} more task(s) "
                            f"of {specs[0].step}")
        return True

    def _in_flight(self) -> int:
        """Elements that run or may run now: each job's unfinished ones, up to its throttle."""
        return sum(min(job.throttle or len(job.elements), sum(1 for e in job.elements if e.left))
                   for job in self._jobs.values())

    def _holds(self, step: str) -> bool:
        """Whether a step's waiting tasks wait: while the run's elements fill
        -parallel (its cap), or, at most HOLD_SECONDS, while one of the step's
        elements has not started (they join one bigger job)."""
        if self._in_flight() >= self.parallel:
            return True
        queued = any(job.step == step and e.left and not e.started and e.state == "PENDING"
                     for job in self._jobs.values() for e in job.elements)
        since = self._held_since.setdefault(step, time.monotonic())
        return queued and time.monotonic() - since < HOLD_SECONDS

    def _raise_throttles(self) -> None:
        """Slots of -parallel that elements freed go first to jobs whose elements
        wait behind their throttle (scontrol raises it), oldest job first."""
        free = self.parallel - self._in_flight()
        for job in list(self._jobs.values()):
            more = min(free, sum(1 for e in job.elements if e.left) - job.throttle)
            if more <= 0 or not job.slurm_id or not job.throttle:
                continue
            done = slurm_command(["scontrol", "update", f"JobId={job.slurm_id}",
                                  f"ArrayTaskThrottle={job.throttle + more}"])
            if done.returncode == 0:
                job.throttle += more
                free -= more

    def _submit_job(self, definition: StepDef, specs: list[TaskSpec]) -> None:
        size = chunk_size(definition, len(specs), max(1, self.parallel - self._in_flight()),
                          self.durations.get(definition.name))
        chunks = [specs[i:i + size] for i in range(0, len(specs), size)]
        name = f"{definition.name}.{os.getpid()}.{time.time_ns() // 1000 % 10**9}." \
               f"{next(self._serial)}"
        folder = os.path.join(self.work, "jobs", name)
        job = _Job(name, folder, definition.name, [_Element([s.task_id for s in c])
                                                   for c in chunks],
                   throttle=max(1, self.parallel - self._in_flight()),
                   options=self._takes_more(definition))
        try:
            for sub in ("records", "objects", "more"):
                os.makedirs(os.path.join(folder, sub))
            big_dir = os.path.join(self.work, "objects")  # shared by jobs: big inputs once
            index = pack_index(self.store, (d for s in specs for d in task_hashes(s)), big_dir)
            with open(os.path.join(folder, "inputs.pack"), "wb") as pack:
                pack_objects(self.store, index, pack)
            plan = {"chunks": [[json_form(s) for s in c] for c in chunks], "pack": index,
                    "objects": big_dir, "cpus": definition.cpus, "more": bool(job.options),
                    "output_mode": self.output_mode, "timeout": self.timeout}
            write_atomically(os.path.join(folder, "tasks.json"),
                             lambda f: f.write(json.dumps(plan).encode()))
        except OSError as e:
            self._fail([s.task_id for s in specs], f"cannot write the job folder {folder}: {e}")
            return
        self.book.add(name, folder, definition.name, len(specs), len(chunks))
        self._add(job)
        try:
            job.slurm_id = self._sbatch(job, definition, size)
        except GritError as e:
            if not self._cancel.is_set():  # else its tasks end interrupted, not failed
                self._drop(job, str(e))
            return
        self.book.submitted(name, job.slurm_id)
        self.console.detail(f"slurm: job {job.slurm_id}: {definition.name}, {len(specs)} "
                            f"task(s) in {len(chunks)} element(s) of up to {size}")

    def _sbatch_argv(self, job: _Job, definition: StepDef, chunk: int) -> list[str]:
        count = len(job.elements)
        return ["sbatch", "--parsable", f"--job-name={self.job_name}", f"--comment={job.name}",
                f"--array=0-{count - 1}" + (f"%{job.throttle}" if count > job.throttle else ""),
                f"--output={job.folder}/element-%a.out",
                *sbatch_options(definition, self.timeout, chunk),
                "--wrap", f"exec {self.command} -worker {shlex.quote(job.folder)}"]

    def _sbatch(self, job: _Job, definition: StepDef, chunk: int) -> str:
        argv = self._sbatch_argv(job, definition, chunk)
        for attempt in range(SBATCH_TRIES):
            done = slurm_command(argv)
            if done.returncode == 0:
                return done.stdout.strip().split(";")[0]
            problem = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            if not SBATCH_TRANSIENT.search(problem) or attempt == SBATCH_TRIES - 1 \
                    or self._cancel.wait(2 ** attempt):
                raise GritError(f"sbatch failed: {problem}")
            self.console.detail(f"slurm: sbatch: {problem}; trying again")
        raise AssertionError("unreachable")

    # -- results -------------------------------------------------------------------

    def _collect(self) -> None:
        """Ingest the result records that appeared: those a listing of the job's
        records/ shows, and those looked up by name. A network filesystem may
        serve a cached listing for a minute (NFS's acdirmax, sshfs's
        dcache_timeout); the lookup of a new name asks the server."""
        for job in list(self._jobs.values()):
            records = os.path.join(job.folder, "records")
            try:
                names = os.listdir(records)
            except FileNotFoundError:
                continue
            for name in names + self._looked_up(job, records):
                if name in job.recorded:
                    continue
                job.recorded.add(name)
                k, number = batch_number(name)
                if 0 <= k < len(job.elements):
                    for result in self._ingest(job, name):
                        self._finish(result)
                elif name.startswith("started-") and name[8:].isdigit():  # first sign of life
                    job.elements[int(name[8:])].started = True
            if self.console.verbose:
                self._tell_starts(job)

    def _looked_up(self, job: _Job, records: str) -> list[str]:
        """The records that exist of those an element would write next: its
        started-K while it may be starting, else its next batches."""
        found, may_start = [], job.throttle or len(job.elements)
        for k, element in enumerate(job.elements):
            if not element.left:
                continue
            if not element.started:
                may_start -= 1
                if may_start >= 0 and os.path.exists(os.path.join(records, f"started-{k}")):
                    found.append(f"started-{k}")
                continue
            while f"{k}-{element.batches + 1}.batch" in job.recorded:
                element.batches += 1
            number = element.batches + 1
            while os.path.exists(os.path.join(records, f"{k}-{number}.batch")):
                found.append(f"{k}-{number}.batch")  # _collect skips one it took already
                number += 1
        return found

    def _tell_starts(self, job: _Job) -> None:
        """-verbose: "start" for each task an element's worker started since the last look."""
        for k, element in enumerate(job.elements):
            if not element.started or not element.left:
                continue
            with contextlib.suppress(OSError), \
                    open(os.path.join(job.folder, "records", f"started-{k}"), "rb") as f:
                f.seek(element.read)
                lines = f.read().split(b"\n")[:-1]  # whole lines only
                element.read += sum(len(line) + 1 for line in lines)
                for line in lines:
                    if line.startswith(b"node "):
                        element.node = line[5:].decode(errors="replace")
                    elif line.isdigit():  # a task of its own step, or one handed on
                        spec = self._specs.get(int(line))
                        self.console.detail(f"start task {int(line)} "
                                            f"{spec.step if spec else job.step} on "
                                            f"{element.node} (Slurm job {job.slurm_id}_{k})")

    def _ingest(self, job: _Job, name: str) -> list[TaskResult]:
        """A batch of results: each task's record, its objects into the store.
        Tasks of an unreadable one stay without a result: they run again or
        fail when their element ends (_give_up_lost)."""
        path, results = os.path.join(job.folder, "records", name), []
        try:
            with open(path, "rb") as f:
                for data, base in read_records(f):
                    results.append(self._result(job, data, f, base))
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.console.warn(f"slurm: unreadable result records {path}: {e}")
        return results

    def _result(self, job: _Job, data: dict, f: IO[bytes], base: int) -> TaskResult:
        """One record of a batch: the task's result, its objects stored."""
        result = result_from_json(data)
        self._note_mode(data["mode"], data["node"])
        for digest in result_hashes(result):
            problem = unpack_object(self.store, digest, f, base, data["pack"],
                                    os.path.join(job.folder, "objects"), move=True)
            if problem:  # changed on the way: the task fails, nothing is recorded
                return TaskResult(result.task_id, error=f"a result {problem}",
                                  started_at=result.started_at, duration=result.duration)
        return result

    def _note_mode(self, mode: str, node: str) -> None:
        if "not available" in mode and mode not in self._warned:
            self._warned.add(mode)
            self.console.warn(f"on node {node}: {mode}")

    def _finish(self, result: TaskResult) -> None:
        with self._lock:
            job = self._release(result.task_id)
            future = self._futures.pop(result.task_id, None)
            self._specs.pop(result.task_id, None)
            if future is not None:
                future.set_result(result)
            else:
                self._early[result.task_id] = result
        if job is not None and result.ok and result.duration:
            mean = self.durations.get(job.step)
            self.durations[job.step] = result.duration if mean is None else \
                0.9 * mean + 0.1 * result.duration

    def _release(self, task: int) -> _Job | None:
        """A task no job needs to run any more; a job with none left is ended.
        Call with self._lock held."""
        job, k = self._where.pop(task, (None, 0))
        if job is None:
            return None
        job.elements[k].left -= 1
        job.elements[k].started = True
        job.elements[k].last = time.monotonic()
        if not any(e.left for e in job.elements):
            self._jobs.pop(job.name, None)
            self._ended.append(job)
        return job

    def _fail(self, tasks: Iterable[int], error: str) -> None:
        for task in tasks:
            self._finish(TaskResult(task, error=error, started_at=utc_now()))

    def _drop(self, job: _Job, error: str) -> None:
        """Fail a job's tasks that have no result."""
        with self._lock:
            tasks = [t for e in job.elements for t in e.tasks if t in self._where]
        self._fail(tasks, error)

    def _fail_all(self, error: str) -> None:
        for job in list(self._jobs.values()):
            self._drop(job, error)
        with self._lock:
            waiting, self._waiting = self._waiting, []
        self._fail([s.task_id for s in waiting], error)

    # -- what squeue says ------------------------------------------------------------

    def _squeue(self) -> None:
        """One squeue for the whole run: each element's state, or its absence."""
        seen, ids, problem = squeue_elements(f"--name={self.job_name}")
        if problem:  # the controller is busy or down: conclude nothing
            self.console.detail(f"slurm: squeue: {problem}")
            return
        now = time.monotonic()
        counts = {}
        for job in list(self._jobs.values()):
            if not job.slurm_id and job.name in ids:  # killed before its id was written
                job.slurm_id = ids[job.name]
                self.book.submitted(job.name, job.slurm_id)
            states = seen.get(job.slurm_id, {})
            for k, element in enumerate(job.elements):
                element.state, reason = states.get(k, ("GONE", ""))
                if element.state not in SLURM_ALIVE:
                    element.ended = element.ended or now
                elif element.state == "PENDING" and reason in SLURM_NEVER_RUNS:
                    job.never_runs = reason
                elif element.state == "PENDING" and reason == "BeginTime" and element.left \
                        and not element.requeued:
                    # Requeued after a node failure: Slurm holds it back ~2 minutes;
                    # a new job runs its tasks sooner (grit never asks for --begin).
                    element.requeued = True
                    element.ended = now  # (it ends by grit's hand: no need to see it gone)
                    slurm_command(["scancel", f"{job.slurm_id}_{k}"])
            counts[job.name] = (sum(e.state == "PENDING" for e in job.elements),
                                sum(e.state == "RUNNING" for e in job.elements))
        self.book.states(counts)

    def _give_up_lost(self) -> None:
        """Fail (or, for an adopted job that vanished, submit again) the tasks of
        elements that ended without records, once GRIT_SLURM_GRACE seconds passed
        after squeue showed them ended or gone (a network filesystem's attribute
        cache may hold records back); cancel jobs that can never start."""
        now = time.monotonic()
        for job in list(self._jobs.values()):
            if job.never_runs:
                slurm_command(["scancel", job.slurm_id])
                self._drop(job, f"Slurm cannot run job {job.slurm_id}: {job.never_runs} (it asks "
                                "for more than the partition's nodes have; cancelled)")
                continue
            for k, element in enumerate(job.elements):
                # An element grit cancelled as requeued wrote its records before its
                # node failed: they are seen by name already (see _collect).
                grace = REQUEUED_GRACE_SECONDS if element.requeued else settings().slurm_grace
                if not element.left or not element.ended or now - element.ended < grace:
                    continue
                self._collect()
                lost = [t for t in element.tasks if t in self._where]
                if lost:
                    self._lost_element(job, k, lost)

    def _lost_element(self, job: _Job, k: int, tasks: list[int]) -> None:
        """An element ended without a result for these tasks: they run again in
        a new job if its node or Slurm is to blame (up to LOST_MAX times), else
        they fail; one line either way."""
        element = job.elements[k]
        tail = _last_line(os.path.join(job.folder, f"element-{k}.out"))
        state = "REQUEUED" if element.requeued else element.state
        if state == "GONE":  # purged from squeue before grit looked: its last words say
            state = next((s for pattern, s in SLURM_LAST_WORDS if re.search(pattern, tail)),
                         state)
        what = f"Slurm job {job.slurm_id}_{k} ended {state}"
        again = [t for t in tasks if self._lost[t] < LOST_MAX]
        if state in SLURM_LOST | {"REQUEUED"} and len(again) == len(tasks):
            self.console.warn(f"{what}: its {len(tasks)} task(s) without a result run again "
                              "in a new job" + (f" ({tail})" if tail else ""))
            self._lost.update(tasks)
            self._resubmit(tasks)
            return
        if state in SLURM_LOST:
            what += f", its tasks' element lost {LOST_MAX + 1} times"
        self.console.error(f"{what}: its {len(tasks)} task(s) failed" + (f": {tail}" if tail else ""))
        for task in tasks:
            self._finish(TaskResult(task, error=f"{what} without a result for this task"
                                    + (f": {tail}" if tail else ""), started_at=utc_now(),
                                    told=True))

    def _resubmit(self, tasks: list[int]) -> None:
        """Tasks whose element was lost: asked for already, they are submitted
        again now; not yet asked for (an adopted job's), when they are."""
        with self._lock:
            for task in tasks:
                self._release(task)
                if task in self._specs:
                    self._waiting.append(self._specs.pop(task))

    # -- stopping ----------------------------------------------------------------------

    def _cancel_jobs(self) -> None:
        """Ctrl-C: scancel the run's jobs, take the records of tasks that finished
        meanwhile, wait (bounded) until squeue shows none of them; every other
        task ends interrupted (it stays pending)."""
        ids = [job.slurm_id for job in self._jobs.values() if job.slurm_id]
        if ids:  # (elements of ended jobs waiting for more end by themselves)
            slurm_command(["scancel", *ids])
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS
        while ids and time.monotonic() < deadline:
            time.sleep(1.0)  # squeue once a second while waiting, not in a tight loop
            self._collect()
            left = slurm_command(["squeue", "-h", f"--name={self.job_name}", "-o", "%F"])
            if left.returncode == 0 and not left.stdout.strip():
                break
        self._collect()
        with self._lock:
            futures, self._futures = self._futures, {}
            self._waiting.clear()
            self._where.clear()
        for task, future in futures.items():
            future.set_result(TaskResult(task, interrupted=True))
        self._ended += self._jobs.values()
        self._jobs.clear()


EXECUTORS["slurm"] = SlurmExecutor


def slurm_present(jobs: list[dict]) -> str:
    """-status: each job's elements queued and running now (one squeue), and its
    results written ("results") and whether all are ("finished"); or, where
    squeue does not answer, why ("" when it did)."""
    for job in jobs:
        with contextlib.suppress(OSError):
            job["results"] = len(recorded_tasks(os.path.join(job["folder"], "records")))
        job["finished"] = job.get("results", 0) >= job["tasks"]
    ids = [job["slurm_id"] for job in jobs if job["slurm_id"]]
    if not ids:
        return ""
    if not shutil.which("squeue"):
        return "squeue is not on PATH"
    seen, _, problem = squeue_elements(f"--jobs={','.join(ids)}")
    if problem:
        return problem
    now = utc_now()
    for job in jobs:
        states = collections.Counter(state for state, _ in seen.get(job["slurm_id"], {}).values())
        job["queued"], job["running"] = states["PENDING"], states["RUNNING"] + states["COMPLETING"]
        job["looked_at"] = now
    return ""


# =============================================================================
# Scheduler
# =============================================================================
# Which task runs when: pending tasks to the executor, finished ones committed
# in batches, new resources into tasks, progress. Sees only a Database and an
# Executor.

# Tasks read from the database per step at a time: bounds memory when a new
# step version has millions of tasks to do.
QUEUE_BATCH = 1000
PROGRESS_INTERVAL = 0.2  # seconds between live progress updates
RATE_WINDOW_SECONDS = 10.0  # the progress line's rate is over this recent window

# Failure lines a run prints in normal mode; then one line says how many more
# (-verbose prints every one; -status lists them all).
FAILURES_SHOWN = 20

# Longest a finished task waits for its commit while other work keeps every
# worker busy; batching amortises the transaction and the LMDB sync.
COMMIT_INTERVAL = 0.05


@dataclass
class StepState:
    """In-memory scheduling state of one step version in this run."""

    step: StepVersion
    queue: collections.deque = field(default_factory=collections.deque)
    loaded_upto: int = 0       # highest task id read into the queue
    exhausted: bool = False    # no pending task beyond loaded_upto
    running: int = 0
    done: int = 0
    failed: int = 0
    pending: int = 0           # known tasks not finished yet (more may come from outputs)
    settled: bool = False      # a gather step: it took its inputs at a barrier this run
    changes: int = 0           # a gather step: times its input set changed this run


@dataclass
class RunSummary:
    """What a run did, for its last line and exit status."""

    tasks: int = 0  # finished
    failed: int = 0
    resources: int = 0
    interrupted: bool = False
    not_imported: int = 0  # source files that could not be read
    started: int = 0  # tasks (and further tries) handed to the executor
    known: int = 0  # outputs already known: early cutoff, nothing downstream to do


class Scheduler:
    """Runs tasks as soon as their input resources are committed.

    It takes pending tasks from the Database, hands them to the Executor (up
    to its capacity and each step's `parallel`), commits each batch of finished
    tasks in one transaction (every task's outputs with its status), then turns
    the new resources into tasks. It starts no process and sends no signal:
    how tasks run and stop is the executor's business.
    """

    def __init__(self, db: Database, executor: Executor, steps: list[StepVersion],
                 console: Console, start: str | None = None,
                 earlier: dict[int, TaskResult] | None = None, retries: int = 0,
                 retry_failed: bool = True) -> None:
        self.db = db
        self.retry_failed = retry_failed  # failed tasks of earlier runs run again
        self.retries = retries  # -retries: for steps that do not set theirs
        self.earlier = earlier or {}  # results of tasks another executor ran (settled Slurm jobs)
        # record() syncs the objects before the rows that name them, and a task
        # reads only recorded ones: small objects can wait for that sync.
        db.objects.hold = True
        self.executor = executor
        self.console = console
        self.all_steps = steps
        self.position = {s.id: i for i, s in enumerate(steps)}  # manifest order
        self.start = start
        self.states: dict[int, StepState] = {}
        self._order: list[StepState] = []  # the states, downstream steps first
        self.summary = RunSummary()
        self.produced: dict[str, set[str]] = {}  # step name -> resource names (for -start)
        self._stop = threading.Event()
        self._done: queue.SimpleQueue = queue.SimpleQueue()  # futures as they finish
        self.fatal = ""  # why the run had to stop, if it had to
        self._last_progress = 0.0
        self._rate_window: collections.deque = collections.deque()  # (time, tasks finished)
        self._warned_waiting: set[str] = set()  # gather steps that wait for left-out steps
        self.attempts: list[tuple[TaskResult, int]] = []  # failed tries, to record
        self.cycled: collections.Counter = collections.Counter()  # step -> tasks in a cycle

    def request_stop(self) -> None:
        """Start nothing more and cancel what runs; finished tasks are still committed."""
        if not self._stop.is_set():
            self._stop.set()
            self.executor.cancel()

    # -- which steps run -----------------------------------------------------

    def _activate(self, step: StepVersion) -> None:
        if step.id in self.states:
            return
        retried = self.db.meta.retry_failed(step.id) if self.retry_failed else 0
        if retried:
            self.console.detail(f"{step.name}: retrying {retried} failed task(s)")
        self.states[step.id] = StepState(step, pending=self.db.meta.count_tasks(step.id, "pending"))

    def _activate_downstream(self) -> None:
        """With -start: activate steps fed, transitively, by active steps' outputs."""
        wanted = steps_fed_by([s.definition for s in self.all_steps],
                              {s.step.name for s in self.states.values()},
                              lambda name: self.produced.get(name, set()))
        for step in self.all_steps:
            if step.name in wanted and step.id not in self.states:
                self.console.detail(f"{step.name}: downstream of -start, activated")
                self._activate(step)

    # -- the loop --------------------------------------------------------------

    def run(self, active: list[StepVersion]) -> RunSummary:
        for step in active:
            self._activate(step)
        if self.start:
            self.produced = {s.name: self.db.meta.names_produced_by(s.name) for s in self.all_steps}
            self._activate_downstream()
        self.db.meta.live.take_new_tasks()  # counted by _activate already
        running: dict[concurrent.futures.Future, tuple[StepState, TaskSpec]] = {}
        finished: list[tuple[TaskResult, StepState]] = []
        last_commit = time.monotonic()
        while True:
            if not self._stop.is_set():
                self._dispatch(running)
            # Commit when the executor would otherwise idle waiting for the new
            # resources, or after COMMIT_INTERVAL: many tasks per transaction
            # (and per object sync) when throughput is high, no wait when not.
            idle = len(running) < self.executor.capacity
            if finished and (idle or time.monotonic() - last_commit >= COMMIT_INTERVAL):
                self._commit_or_stop(finished)
                finished = []
                last_commit = time.monotonic()
                continue
            if not running:
                if not self._stop.is_set() and not self.fatal and self._settle_gather():
                    continue
                break
            for future in self._finished_futures():
                state, spec = running.pop(future)
                result = future.result()
                again = self._try_again(spec, result, state)
                if again:
                    running[self._submit(again, state)] = (state, again)
                    continue
                state.running -= 1
                finished.append((result, state))
            self._show_progress()
        self.console.end_progress()
        if self.fatal:
            raise GritError(self.fatal)
        self.summary.interrupted = self._stop.is_set()
        return self.summary

    def _finished_futures(self) -> list[concurrent.futures.Future]:
        """The futures done since the last call, waiting up to PROGRESS_INTERVAL
        for the first. Each future puts itself in a queue when done: waiting on
        all running futures at every turn cost 0.1 ms a task (bench/budget.py)."""
        done: list[concurrent.futures.Future] = []
        try:
            done.append(self._done.get(timeout=PROGRESS_INTERVAL))
            while True:
                done.append(self._done.get_nowait())
        except queue.Empty:
            return done

    def _commit_or_stop(self, finished: list[tuple[TaskResult, StepState]]) -> None:
        """Commit; if the database cannot take it (disk full, I/O error), stop the
        run: those tasks stay pending and run again next time."""
        if self.fatal:
            return
        try:
            self._commit(finished)
        except (sqlite3.Error, OSError) as e:
            writing = sum(o.size for r, _ in finished for o in r.outputs)
            full = f" [the disk holding {self.db.path} is full]" \
                if disk_is_full(self.db.path, writing) else ""
            self.fatal = f"cannot record finished tasks ({e}){full}; stopped the run, the " \
                         "unrecorded tasks run again next time"
            self.request_stop()

    def _dispatch(self, running: dict[concurrent.futures.Future, tuple[StepState, TaskSpec]]
                  ) -> None:
        capacity = self.executor.capacity
        if len(running) >= capacity:
            return
        if len(self._order) != len(self.states):
            # Downstream steps first: results reach the end of the pipeline
            # sooner and the queue of intermediate resources stays short.
            self._order = sorted(self.states.values(), key=lambda s: -self.position[s.step.id])
        for state in self._order:
            if state.step.definition.gather and not state.settled:
                continue  # a task from before the barrier may hold a stale set
            cap = state.step.definition.parallel or sys.maxsize  # the step's own parallel
            while len(running) < capacity and state.running < cap:
                if not state.queue and not self._refill(state):
                    break
                spec = state.queue.popleft()
                state.running += 1
                running[self._submit(spec, state)] = (state, spec)

    def _settle_gather(self) -> bool:
        """The barrier: nothing runs or waits, so each gather step (in manifest
        order) takes the live resources it matches now. True when that made
        work: a task to run, or known outputs live again with tasks after them."""
        gathers = sorted((s for s in self.states.values() if s.step.definition.gather),
                         key=lambda s: self.position[s.step.id])
        for state in gathers:
            if self._waiting_upstream(state):
                continue
            first = not state.settled
            found = self.db.meta.settle(state.step)
            state.settled = True
            self._note_new_tasks()
            changed = found.outcome in ("new", "seen before")
            if changed or first:
                self.console.detail(f"{state.step.name}: gathers {found.inputs} live input(s), "
                                    f"{GATHER_TEXT[found.outcome]}"
                                    + (f" (task {found.task_id})" if found.task_id else ""))
            if changed:
                state.changes += 1
                if state.changes > len(gathers):
                    self.fatal = (f"gather step {quote(state.step.name)} is in a cycle: what it "
                                  "made changed its own inputs again; a gather step runs over "
                                  "everything that can feed it, so it cannot feed itself")
                    return False
            if changed or first:
                return True
        return False

    def _waiting_upstream(self, state: StepState) -> bool:
        """Steps this run leaves out (-step, -start) still have tasks to run:
        a gather step waits for them rather than take a set they would change."""
        if state.step.name in self._warned_waiting:
            return True
        others = self.db.meta.steps_pending(exclude=[s for s in self.states])
        if others:
            self._warned_waiting.add(state.step.name)
            self.console.warn(f"step {quote(state.step.name)} is waiting for upstream: "
                              f"{', '.join(others)} have pending tasks this run leaves out")
        return bool(others)

    def _submit(self, spec: TaskSpec, state: StepState) -> concurrent.futures.Future:
        limit = state.step.definition.cycle_limit
        if spec.task_id in self.earlier:
            future = concurrent.futures.Future()
            future.set_result(self.earlier.pop(spec.task_id))
        elif spec.passes > limit:  # a cycle that does not converge: stop this chain
            future = failed_at_once(spec, f"a chain of resources reached step "
                                          f"{quote(spec.step)} {spec.passes} times, more than "
                                          f"its cycle_limit ({limit}): a cycle that does not "
                                          "converge?")
        else:
            self.cycled[spec.step] += spec.passes > 1
            if self.console.verbose:
                self.console.detail(("queued" if self.executor.queues else "start") +
                                    f" task {spec.task_id} {spec.step}"
                                    + (f" on {spec.input_name} {spec.input_hash[:12]}"
                                       if spec.input_hash else
                                       f" over {len(spec.gathered)} gathered input(s)"
                                       if spec.gathered is not None else " (seed)"))
            future = self.executor.submit(spec)
            self.summary.started += 1
        future.add_done_callback(self._done.put)
        return future

    def _try_again(self, spec: TaskSpec, result: TaskResult, state: StepState) -> TaskSpec | None:
        """A failed task's next attempt, while its step's retries allow one; the
        failed attempt is recorded with the next commit (-log shows it)."""
        definition = state.step.definition
        retries = definition.retries if definition.retries >= 0 else self.retries
        if result.ok or result.interrupted or spec.attempt > retries or self._stop.is_set():
            return None
        self.attempts.append((result, spec.attempt))
        if not result.told:  # else its element's line told it
            self.console.warn(f"task {spec.task_id} ({spec.step}) failed, attempt {spec.attempt} of "
                              f"{retries + 1}: {error_line(result.error or '')}; trying again")
        nxt = definition.for_attempt(spec.attempt + 1)
        return dataclasses.replace(spec, attempt=spec.attempt + 1, cpus=nxt.cpus)

    def _refill(self, state: StepState) -> bool:
        if state.exhausted:
            return False
        batch = self.db.meta.pending(state.step, state.loaded_upto, QUEUE_BATCH)
        if len(batch) < QUEUE_BATCH:
            state.exhausted = True
        if batch:
            state.loaded_upto = batch[-1].task_id
            state.queue.extend(batch)
        return bool(batch)

    def _commit(self, finished: list[tuple[TaskResult, StepState]]) -> None:
        """Record finished tasks in one transaction; interrupted ones stay pending."""
        results = [(r, s) for r, s in finished if not r.interrupted]
        if not results and not self.attempts:
            return
        with self.db.meta.transaction():
            created = self.db.record([r for r, _ in results], self.attempts)
            self.attempts = []
            for (result, state), new in zip(results, created):
                self.summary.resources += new
                self.summary.tasks += 1
                self.summary.known += len(result.outputs) - new if result.ok else 0
                self._report(result, state, new)
                if self.start and result.ok:
                    self.produced.setdefault(state.step.name, set()).update(
                        o.name for o in result.outputs)
            if self.start:
                self._activate_downstream()
        self._note_new_tasks()

    def _report(self, result: TaskResult, state: StepState, created: int) -> None:
        state.pending -= 1
        if result.ok:
            state.done += 1
            if self.console.verbose:
                outs = ", ".join(f"{o.name} ({o.size} B)" for o in result.outputs) or "no outputs"
                known = len(result.outputs) - created
                self.console.detail(f"done  task {result.task_id} {state.step.name} in "
                                    f"{result.duration:.2f}s: {outs}; {created} new resource(s)"
                                    + (f", {known} already known (early cutoff: no new work)"
                                       if known else ""))
        else:
            state.failed += 1
            self.summary.failed += 1
            if not result.told and (self.summary.failed <= FAILURES_SHOWN
                                    or self.console.verbose):
                self.console.error(f"task {result.task_id} ({state.step.name}) failed: "
                                   f"{result.error}")

    def _note_new_tasks(self) -> None:
        """Tasks that the new live resources got: the active steps' are to run;
        queued tasks whose input stopped being live are dropped."""
        made, retired = self.db.meta.live.take_new_tasks()
        for state in self.states.values() if retired else ():
            kept = collections.deque(s for s in state.queue if s.task_id not in retired)
            state.pending -= len(state.queue) - len(kept)
            state.queue = kept
        for step_id, created in made.items():
            state = self.states.get(step_id)
            if state:
                state.exhausted = False
                state.pending += created
                self.console.detail(f"{state.step.name}: {created} new task(s) for "
                                    f"resources matching {list(state.step.definition.inputs)}")

    def _show_progress(self) -> None:
        now = time.monotonic()
        if now - self._last_progress < PROGRESS_INTERVAL:
            return
        self._last_progress = now
        parts = []
        scripts = self.executor.running()
        states = sorted(self.states.values(), key=lambda s: self.position[s.step.id])
        for state in states:
            part = f"{state.step.name} {state.done}/{state.done + state.failed + state.pending}"
            if scripts[state.step.name]:
                part += f", {scripts[state.step.name]} running"
            if state.failed:
                part += f", {state.failed} failed"
            parts.append(part)
        finished = self.summary.tasks
        self._rate_window.append((now, finished))
        while now - self._rate_window[0][0] > RATE_WINDOW_SECONDS:
            self._rate_window.popleft()
        then, before = self._rate_window[0]
        if now - then >= 1.0 and finished > before:
            rate = (finished - before) / (now - then)
            remaining = sum(s.pending for s in states)
            # Known tasks only: outputs not made yet may add downstream work.
            parts.append(f"{rate:.1f} tasks/s, ETA {format_duration(remaining / rate)}")
        self.console.progress(" | ".join(parts))


def steps_fed_by(steps: Sequence[StepDef], chosen: set[str],
                 produced: Callable[[str], set[str]]) -> set[str]:
    """`chosen` and the steps fed, transitively, by names that chosen steps
    produced: what -start runs. The run and -dry-run both ask this."""
    chosen = set(chosen)
    names = set().union(*(produced(n) for n in chosen))
    changed = True
    while changed:
        changed = False
        for d in steps:
            if d.name not in chosen and not d.is_seed and any(
                    matches_inputs(n, d.inputs) for n in names):
                chosen.add(d.name)
                names |= produced(d.name)
                changed = True
    return chosen


def gather_cycle(steps: Sequence[StepDef], produced: Callable[[str], set[str]]) -> list[str]:
    """A cycle through a gather step, as step names from it back to it, in the
    graph of what each step has produced so far feeding whose inputs; [] if none."""
    feeds = {d.name: [e.name for e in steps if not e.is_seed and any(
        matches_inputs(n, e.inputs) for n in produced(d.name))] for d in steps}
    for start in (d.name for d in steps if d.gather):
        paths = {start: [start]}
        stack = [start]
        while stack:
            here = stack.pop()
            for there in feeds[here]:
                if there == start:
                    return paths[here] + [start]
                if there not in paths:
                    paths[there] = paths[here] + [there]
                    stack.append(there)
    return []


def failed_at_once(spec: TaskSpec, error: str) -> concurrent.futures.Future:
    """The result of a task that fails without running."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_result(TaskResult(spec.task_id, error=error, started_at=utc_now()))
    return future


def format_duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


# =============================================================================
# Running a pipeline
# =============================================================================
# -run as a story (manifest, database, executor, scheduler) and -dry-run on the
# same rules. Uses the sections above, never sqlite3 or LMDB directly.

def selected_steps(manifest: Manifest, opts: RunOptions) -> list[str]:
    """The steps -start or -step name (checked against the manifest), else all.
    With -start, the steps downstream join as the run finds them."""
    if opts.start and opts.steps:
        raise GritError("use -start or -step, not both")
    if opts.start:
        return [manifest.step(opts.start).name]
    if opts.steps:
        return [manifest.step(n).name for n in dict.fromkeys(opts.steps)]
    return [d.name for d in manifest.steps]


def cmd_dry_run(opts: RunOptions, manifest: Manifest, selected: list[str]) -> int:
    plan = plan_run(opts, manifest, selected)
    EXECUTORS[opts.executor].plan(plan, manifest, opts)
    if opts.json:
        emit_json({"dry_run": True, "steps": plan, "tasks": sum(p["tasks"] for p in plan)})
    else:
        print_plan(plan)
    return EXIT_OK


def plan_run(opts: RunOptions, manifest: Manifest, selected: list[str]) -> list[dict]:
    """What a -run would start now, per step, and why: the run's own steps
    (registration, sources, reruns, retries, the gather barrier) taken on a
    copy of the metadata in memory, with files hashed but not stored."""
    meta = Metadata.copy_of(Database(opts.db).metadata_path)
    versions = register_steps(meta, manifest, Console(0))
    names = steps_fed_by(manifest.steps, set(selected), meta.names_produced_by) \
        if opts.start else set(selected)
    active = [v for v in versions if v.name in names]
    plan = {v.id: {"name": v.name, "version": v.version, "new_version": v.is_new} for v in active}
    reasons = {v.id: collections.Counter() for v in active}
    meta.live.take_new_tasks()
    for step in active:
        scan = start_root(meta, None, step, os.path.dirname(os.path.abspath(manifest.path)))
        made, _ = meta.live.take_new_tasks()
        if step.definition.files:
            plan[step.id]["source"] = {**asdict(scan), "tasks": {
                v.name: made[v.id] for v in active if made[v.id]}}
        for v in active:
            reasons[v.id]["new_resource"] += made[v.id]
        reasons[step.id]["rerun_always"] += scan is not None and not step.definition.files
    for step in active:
        reasons[step.id]["retry_failed"] += meta.retry_failed(step.id)
    for step in (v for v in active if v.definition.gather):
        plan[step.id]["gather"] = plan_gather(meta, step, active)
        made, _ = meta.live.take_new_tasks()  # a new set; or one seen before: outputs back
        for v in (v for v in active if not (v is step and step.is_new)):  # else: new_step…
            reasons[v.id]["new_input_set" if v is step else "new_resource"] += made[v.id]
    for step in active:
        waiting = plan[step.id].get("gather", {}).get("state") == GATHER_TEXT["waiting"]
        tasks = 0 if waiting else meta.count_tasks(step.id, "pending")
        first = "left_pending" if not step.is_new else "new_step_version" if step.version > 1 \
            else "new_step"
        reasons[step.id][first] += max(0, tasks - sum(reasons[step.id].values()))
        plan[step.id].update(tasks=tasks, reasons={} if waiting else {
            k: n for k, n in reasons[step.id].items() if n})
    meta.close()
    return list(plan.values())


def plan_gather(meta: Metadata, step: StepVersion, active: list[StepVersion]) -> dict:
    """A gather step at the barrier, as the run reaches it: it waits while any
    other step of the run (or one it leaves out) has tasks to run; else it
    takes its live inputs (a task when their set is new)."""
    if any(v.id != step.id and meta.count_tasks(v.id, "pending") for v in active) or \
            meta.steps_pending(exclude=[v.id for v in active]):
        return {"inputs": len(meta.live.gather_set(step.definition.inputs)),
                "state": GATHER_TEXT["waiting"]}
    found = meta.settle(step)
    return {"inputs": found.inputs, "state": GATHER_TEXT[found.outcome]}


REASON_TEXT = {"new_step": "new step", "new_step_version": "new step version",
               "new_input_set": "a new set of inputs to gather",
               "new_resource": "new resource(s)", "retry_failed": "failed task(s) to retry",
               "rerun_always": "rerun = \"always\"",
               "left_pending": "left pending by an earlier run"}


def print_plan(plan: list[dict]) -> None:
    print("dry run: nothing is run or written")
    width = max([len(p["name"]) for p in plan] + [4])
    for p in plan:
        why = ", ".join(f"{n} {REASON_TEXT[k]}" for k, n in p["reasons"].items())
        version = f"v{p['version']}" + (" (new)" if p["new_version"] else "")
        print(f"{p['name']:<{width}}  {version:<8}  {p['tasks']:>7} task(s)"
              + (f": {why}" if why else ""))
        if "source" in p:
            src = p["source"]
            after = ", ".join(f"{step} {n} task(s)" for step, n in src["tasks"].items())
            print(f"{p['name']}: {src['new']} new, {src['changed']} changed, {src['gone']} gone"
                  + (f" → {after}" if after else ""))
        for note in p.get("notes", ()):
            print(f"{p['name']}: {note}")
        if "gather" in p:
            print(f"{p['name']}: gather over {p['gather']['inputs']} live input(s): "
                  f"{p['gather']['state']}")
    total = sum(p["tasks"] for p in plan)
    print(f"{total} task(s) would start; their outputs may make more work downstream")


def run_once(opts: RunOptions, manifest: Manifest, selected: list[str], db: Database,
             executor: Executor, earlier: dict[int, TaskResult], console: Console,
             again: bool = False) -> int:
    """One run, recorded in the run table; its exit status. `again`: a round of
    -watch after the first, which leaves failed tasks be (their input or step
    changing makes new ones)."""
    started = time.monotonic()
    db.meta.start_run(opts.command, opts.executor, opts.output_mode)
    summary, status, mode = RunSummary(), EXIT_USAGE, opts.output_mode
    try:
        summary = run_steps(opts, manifest, selected, db, executor, earlier, console,
                            retry_failed=not again)
        mode = executor.output_mode_used or mode
        status = report_run(summary, time.monotonic() - started, console)
    except GritError as e:
        status = e.exit_code
        raise
    except KeyboardInterrupt:
        status, summary.interrupted = EXIT_INTERRUPTED, True
        raise
    finally:
        db.meta.end_run(dict(started=summary.started, done=summary.tasks - summary.failed,
                             failed=summary.failed, known=summary.known,
                             resources=summary.resources, exit_status=status,
                             interrupted=int(summary.interrupted)), mode)
    return status


def run_steps(opts: RunOptions, manifest: Manifest, selected: list[str], db: Database,
              executor: Executor, earlier: dict[int, TaskResult], console: Console,
              retry_failed: bool = True) -> RunSummary:
    """Register the steps, import the roots, run the scheduler until done."""
    versions = register_steps(db.meta, manifest, console)
    active = [v for v in versions if v.name in selected]
    left_out = [v.name for v in versions if v.definition.files and v not in active]
    if left_out:
        console.info(f"source step(s) {', '.join(left_out)} not walked: -step or -start "
                     "leaves them out, so changes to their files are not seen")
    not_imported = start_roots(db, active, manifest, console)
    scheduler = Scheduler(db, executor, versions, console, start=opts.start, earlier=earlier,
                          retries=opts.retries, retry_failed=retry_failed)
    with stop_on_signals(scheduler.request_stop):
        summary = scheduler.run(active)
    summary.not_imported = not_imported
    if not summary.interrupted:  # an interrupted run may not have reached a step yet
        warn_unmatched(db, scheduler, console)
    for step, n in scheduler.cycled.items():
        if n:
            console.info(f"step {quote(step)} consumed {n} resource(s) made by itself or a "
                         "step after it: a cycle, which stops when its outputs stop "
                         "changing or at cycle_limit")
    return summary


def check_gather_cycles(meta: Metadata, manifest: Manifest) -> None:
    """A gather step in a cycle (known from what steps produced before) is an error."""
    if any(d.gather for d in manifest.steps):
        cycle = gather_cycle(manifest.steps, meta.names_produced_by)
        if cycle:
            raise GritError(f"{manifest.path}: gather step {quote(cycle[0])} is in a cycle "
                            f"({' -> '.join(cycle)}): a gather step runs over everything "
                            "that can feed it, so it cannot feed itself")


def register_steps(meta: Metadata, manifest: Manifest, console: Console) -> list[StepVersion]:
    """The stored version of every step, new ones added; says which are new."""
    check_gather_cycles(meta, manifest)
    versions = meta.register(manifest.steps)
    console.info(f"manifest {manifest.path}: {len(manifest.steps)} step(s)")
    new = [f"{v.name} v{v.version}" for v in versions if v.is_new]
    console.info(f"registered {len(versions)} step(s)"
                 + (f"; new version: {', '.join(new)}" if new else ""))
    for v in versions:
        console.detail(f"step {v.name} v{v.version} (id {v.id}), inputs "
                       f"{list(v.definition.inputs) or '(seed)'}")
    return versions


def start_root(meta: Metadata, store: ObjectStore | None, step: StepVersion,
               base_dir: str) -> SourceScan | None:
    """A run's start at a root step: a source imports its new and changed files
    (what it found); a seed with rerun = "always" gets a new run, unless one is
    still to run (an empty scan); None: nothing to start."""
    if step.definition.files:
        return import_source(meta, store, step, base_dir)
    return SourceScan() if step.definition.rerun and meta.rerun_seed(step) else None


def start_roots(db: Database, active: list[StepVersion], manifest: Manifest,
                console: Console) -> int:
    """start_root for every step of the run; returns how many files failed to import."""
    failed = 0
    for step in active:
        scan = start_root(db.meta, db.objects, step, os.path.dirname(os.path.abspath(
            manifest.path)))
        if scan and step.definition.files:
            line = f"{step.name}: {scan.new} new, {scan.changed} changed, {scan.gone} gone"
            console.info(line) if scan.new or scan.changed or scan.gone else console.detail(line)
            for problem in scan.failed:
                console.error(problem)
            failed += len(scan.failed)
        elif scan:
            console.detail(f"{step.name}: a new run (rerun = \"always\")")
    return failed


def warn_unmatched(db: Database, scheduler: Scheduler, console: Console) -> None:
    for state in scheduler.states.values():
        step = state.step
        if not step.definition.is_seed and not db.meta.has_tasks(step.id):
            console.warn(f"step \"{step.name}\": no resource matches its inputs "
                         f"{list(step.definition.inputs)}")


def report_run(summary: RunSummary, elapsed: float, console: Console) -> int:
    """The run's last line, and its exit status."""
    if summary.interrupted:
        console.error(f"interrupted: {summary.tasks} task(s) finished; the rest stay "
                      "pending for the next -run")
        return EXIT_INTERRUPTED
    line = (f"{summary.tasks} task(s) run, {summary.failed} failed, "
            f"{summary.resources} resource(s) created in {elapsed:.2f}s"
            + (f"; {summary.not_imported} file(s) not imported" if summary.not_imported else ""))
    if summary.failed or summary.not_imported:
        if summary.failed > FAILURES_SHOWN and not console.verbose:
            console.error(f"{summary.failed - FAILURES_SHOWN} more failed task(s) not shown "
                          "(-status lists them, -log TASK shows one, -verbose shows all)")
        console.error(line)
        return EXIT_TASK_FAILED
    console.info(console.paint(line, "green") if summary.tasks else line)
    return EXIT_OK


# =============================================================================
# Watching files
# =============================================================================
# -run -watch: a run, then a wait for the source steps' files or the manifest
# to change, then another run, until Ctrl-C. What changed is not trusted from
# the events: each round's own source scan decides, so a missed or spurious
# event costs at most a no-op round. Uses the run of the section above; ends
# with -run's command, which runs once or watches.

SETTLE_SECONDS = 0.1  # a round starts after this long without a new change...
SETTLE_MOST_SECONDS = 2.0  # ...or this long after the first one (a long burst)
POLL_SECONDS = 2.0  # between looks where inotify cannot watch
# inotify(7): what a watched folder reports that could change what matches
IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_Q_OVERFLOW, IN_ISDIR = 0x400, 0x800, 0x4000, 0x40000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
              | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF)
INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, length of the name that follows


class WatchStopped(Exception):
    """Ctrl-C or SIGTERM while -run -watch waits."""


@dataclass
class WatchedFolder:
    path: str
    recursive: bool  # a pattern may match below it (a '/' or '**' after its fixed part)


def source_patterns(manifest: Manifest) -> list[str]:
    """The source steps' file patterns, as absolute paths."""
    base = os.path.dirname(os.path.abspath(manifest.path))
    return [os.path.normpath(os.path.join(base, p)) for s in manifest.steps for p in s.files]


def watched_folders(manifest: Manifest, db_path: str) -> list[WatchedFolder]:
    """The folders whose changes could change a run: each source pattern's fixed
    part (or its nearest existing parent, to see it made) and the manifest's."""
    base = os.path.dirname(os.path.abspath(manifest.path))
    found = {base: WatchedFolder(base, False)}
    for full in source_patterns(manifest):
        folder = fixed_prefix(full)
        deeper = "/" in full[len(folder):].strip("/") or "**" in full
        while not os.path.isdir(folder) and folder != "/":
            folder, deeper = os.path.dirname(folder), True
        known = found.get(folder)
        found[folder] = WatchedFolder(folder, deeper or bool(known and known.recursive))
    db = os.path.abspath(db_path)
    return [f for f in found.values() if not (f.path + "/").startswith(db + "/")]


class Inotify:
    """Linux's inotify through ctypes: a watch per folder (recursive ones:
    every folder below, folders made later included). Raises OSError where
    inotify is missing or a watch limit is hit; the caller polls instead."""

    def __init__(self, folders: list[WatchedFolder], manifest: Manifest, db_path: str) -> None:
        self.fd = _libc().inotify_init1(IN_NONBLOCK | IN_CLOEXEC)  # type: ignore[attr-defined]
        if self.fd < 0:
            raise OSError(ctypes_errno(), "inotify_init1")
        self.db = os.path.abspath(db_path) + "/"
        self.manifest_path = os.path.abspath(manifest.path)
        # as fnmatch patterns, where '*' crosses '/' too: "a/**/b" must match a/b
        self.patterns = [p.replace("/**/", "/*") for p in source_patterns(manifest)]
        self.folders: dict[int, tuple[str, bool]] = {}  # wd -> (path, recursive)
        try:
            for folder in folders:
                self.add(folder.path, folder.recursive)
        except OSError:
            os.close(self.fd)
            raise

    def add(self, path: str, recursive: bool) -> None:
        paths = [path] + ([os.path.join(top, d) for top, dirs, _ in os.walk(path) for d in dirs]
                          if recursive else [])
        for folder in paths:
            if (folder + "/").startswith(self.db):
                continue  # grit's own writes are not changes
            add_watch = _libc().inotify_add_watch  # type: ignore[attr-defined]
            wd = add_watch(self.fd, os.fsencode(folder), WATCH_MASK)
            if wd < 0:
                code = ctypes_errno()
                if code in (errno.ENOENT, errno.ENOTDIR):
                    continue  # gone meanwhile
                raise OSError(code, f"inotify_add_watch {folder}: {os.strerror(code)}")
            self.folders[wd] = (folder, recursive)

    def wait(self, timeout: float | None) -> int:
        """Changes seen within `timeout` seconds (None: until one comes)."""
        return self.changes() if select.select([self.fd], [], [], timeout)[0] else 0

    def changes(self) -> int:
        """The events waiting that could change what the patterns match (folders
        made below recursive ones get their watches too)."""
        count = 0
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return count
            offset = 0
            while offset < len(data):
                wd, mask, _, length = INOTIFY_EVENT.unpack_from(data, offset)
                name = data[offset + INOTIFY_EVENT.size:offset + INOTIFY_EVENT.size + length]
                offset += INOTIFY_EVENT.size + length
                folder, recursive = self.folders.get(wd, ("", False))
                path = os.path.join(folder, os.fsdecode(name.rstrip(b"\0")))
                if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO) and recursive:
                    self.add(path, True)
                # fnmatch's '*' also matches '/' and dot files: it errs towards a round
                count += bool(mask & (IN_ISDIR | IN_Q_OVERFLOW | IN_DELETE_SELF | IN_MOVE_SELF)
                              or path == self.manifest_path
                              or any(fnmatch.fnmatchcase(path, p) for p in self.patterns))

    def close(self) -> None:
        os.close(self.fd)


def ctypes_errno() -> int:
    import ctypes
    return ctypes.get_errno()


class Poller:
    """Where inotify cannot watch: the stat signatures of every file the
    patterns match, and the manifest's, compared every POLL_SECONDS."""

    def __init__(self, manifest: Manifest, interval: float) -> None:
        self.manifest = manifest
        self.interval = interval
        self.seen = self.look()

    def look(self) -> dict:
        base = os.path.dirname(os.path.abspath(self.manifest.path))
        found: dict = {}
        for step in self.manifest.steps:
            with contextlib.suppress(GritError):  # two files, one name: the run says so
                found.update({(step.name, name): sig for _, name, sig in
                              match_files(step, base)})
        with contextlib.suppress(OSError):
            found["manifest"] = stat_signature(os.stat(self.manifest.path))
        return found

    def wait(self, timeout: float | None) -> int:
        time.sleep(self.interval if timeout is None else min(timeout, self.interval))
        now = self.look()
        changed, self.seen = now != self.seen, now
        return int(changed)

    def close(self) -> None:
        pass


class Watch:
    """What -run -watch waits on: inotify over the watched folders, or a
    Poller (said once, with why)."""

    def __init__(self, manifest: Manifest, db_path: str, console: Console) -> None:
        self.console = console
        self.db_path = db_path
        self.polling_said = False
        self.folders: list[WatchedFolder] = []
        self.source: Inotify | Poller | None = None
        self.watch(manifest)

    def watch(self, manifest: Manifest) -> None:
        """(Re)start watching what this manifest's run depends on."""
        self.close()
        self.folders = watched_folders(manifest, self.db_path)
        interval = settings().watch_poll
        table = mounts()
        remote = [f.path for f in self.folders
                  if filesystem_type(f.path, table) in NETWORK_FILESYSTEMS]
        why = f"GRIT_WATCH_POLL is {interval:g}" if interval else \
            f"{remote[0]} is on a network filesystem, where inotify sees only this " \
            "machine's changes" if remote else ""
        if not why:
            try:
                self.source = Inotify(self.folders, manifest, self.db_path)
                return
            except (OSError, AttributeError) as e:  # AttributeError: a libc without inotify
                why = f"inotify cannot watch here ({e})"
        if not self.polling_said:
            self.console.info(f"-watch: {why}; looking for changes every "
                              f"{interval or POLL_SECONDS:g} s instead")
            self.polling_said = True
        self.source = Poller(manifest, interval or POLL_SECONDS)

    def what(self, files: int) -> str:
        folders = len(self.source.folders) if isinstance(self.source, Inotify) else \
            len(self.folders)  # polled: the tops of the trees
        return f"watching {files} file(s) in {folders} folder(s)"

    def next_change(self) -> None:
        """Wait for a change (those made during the last round are waiting
        already), then for the burst it starts to settle."""
        assert self.source is not None
        while not self.source.wait(None):
            pass
        first = last = time.monotonic()
        while True:
            now = time.monotonic()
            left = min(SETTLE_SECONDS - (now - last), SETTLE_MOST_SECONDS - (now - first))
            if left <= 0:
                return
            if self.source.wait(left):
                last = time.monotonic()

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


def watch_and_run(opts: RunOptions, manifest: Manifest, db: Database,
                  earlier: dict[int, TaskResult], console: Console) -> int:
    """Rounds of run_once until Ctrl-C or SIGTERM (exit 130), each after the
    files or the manifest changed; an executor serves the rounds of one
    manifest. A failed task does not stop the watch: it runs again when its
    input or its step changes."""
    def stop() -> None:
        raise WatchStopped

    watch, status = Watch(manifest, opts.db, console), None
    try:
        with stop_on_signals(stop):
            while status != EXIT_INTERRUPTED:
                with EXECUTORS[opts.executor].for_run(opts, manifest, db, console) as executor:
                    current = manifest
                    while status != EXIT_INTERRUPTED and manifest is current:
                        status = run_once(opts, manifest, selected_steps(manifest, opts), db,
                                          executor, {} if status is not None else earlier,
                                          console, again=status is not None)
                        if status != EXIT_INTERRUPTED:
                            files = db.meta.count_source_files(
                                [s.name for s in manifest.steps if s.files])
                            manifest = next_round(opts, manifest, watch, status, files, console)
    except WatchStopped:
        console.end_progress()
        console.error("interrupted: the watch stopped between runs")
        return EXIT_INTERRUPTED
    finally:
        watch.close()
    return status


def next_round(opts: RunOptions, manifest: Manifest, watch: Watch, status: int, files: int,
               console: Console) -> Manifest:
    """Say what is watched, wait for a change, and return the manifest as it
    is then: the same object if unchanged, or broken (said in one line)."""
    line = (f"{watch.what(files)}; last run {time.strftime('%H:%M:%S')}: "
            + ("ok" if status == EXIT_OK else f"exit status {status}"))
    console.progress(line) if console.tty else console.info(line)
    watch.next_change()
    try:
        new = load_manifest(opts.manifest)
        selected_steps(new, opts)  # -step and -start name steps it still has
    except GritError as e:
        console.error(f"{e} (the watch keeps the manifest it last read)")
        return manifest
    if new == manifest:
        return manifest
    watch.watch(new)
    return new


def cmd_run(opts: RunOptions, console: Console) -> int:
    manifest = load_manifest(opts.manifest)
    selected = selected_steps(manifest, opts)
    if opts.dry_run:
        if opts.watch:
            raise GritError("-watch goes with -run, not with -dry-run")
        return cmd_dry_run(opts, manifest, selected)
    if opts.json:
        raise GritError("-json goes with -run only together with -dry-run")
    with Database.for_run(opts.db, console) as db:
        earlier = {} if opts.executor == "slurm" else SlurmExecutor.end_earlier_jobs(
            opts, manifest, db, console)
        if opts.watch:
            return watch_and_run(opts, manifest, db, earlier, console)
        with EXECUTORS[opts.executor].for_run(opts, manifest, db, console) as executor:
            return run_once(opts, manifest, selected, db, executor, earlier, console)


# =============================================================================
# Inspecting a database
# =============================================================================
# -export, -export-hash, -export-tar, -status, -log, -lineage: what a database
# holds, read through the Database; nothing here changes it.

STATUS_NAMES_SHOWN = 20  # names and failed tasks listed by -status in text (-json lists all)
GATHERED_SHOWN = 10      # a gather task's inputs listed by -log and -lineage in text
LINEAGE_LIMIT = 10000    # most resources -lineage -descendants walks
LINEAGE_DEPTH = 100      # most links followed each way (a cycle can make long chains)
LINEAGE_GATHERED = 100   # a gather task's inputs -lineage includes (with their count)


def cmd_export(db_path: str, name: str, live_only: bool) -> int:
    """Resources named NAME, or whose names match it as a pattern, oldest first."""
    rows = Database.for_reading(db_path).meta.resources_matching(name, live_only)
    if not rows:
        raise NotFoundError(f"no {'live ' if live_only else ''}resource named {quote(name)} "
                            f"in {db_path}")
    sys.stdout.write("".join(f"{r['hash']}\t{r['name']}\t{r['created_at']}\n" for r in rows))
    return EXIT_OK


HASH_PREFIX_MIN = 8  # hex digits; shorter prefixes are too likely to be ambiguous


def is_hash_prefix(text: str) -> bool:
    return re.fullmatch(r"[0-9a-f]{%d,64}" % HASH_PREFIX_MIN, text.lower()) is not None


def check_hash_prefix(prefix: str, flag: str) -> str:
    prefix = prefix.lower()
    if not is_hash_prefix(prefix):
        raise GritError(f"{flag} needs a SHA-256 hash or a prefix of at least "
                        f"{HASH_PREFIX_MIN} hex digits, not {quote(prefix)}")
    return prefix


def one_object(hashes: list[str], prefix: str) -> list[str]:
    """Hashes a prefix matched, which must all be one object's."""
    if len(set(hashes)) > 1:
        raise NotFoundError(f"hash prefix {prefix} is ambiguous: give more digits")
    return hashes


def cmd_export_hash(db_path: str, prefix: str) -> int:
    prefix = check_hash_prefix(prefix, "-export-hash")
    db = Database.for_reading(db_path)
    found = one_object([r["hash"] for r in db.meta.resources_with_hash(prefix)
                        if not r["deleted_at"]], prefix)
    if not found:
        raise NotFoundError(f"no object with hash {prefix} in {db_path}")
    store = db.objects
    try:
        problem = store.check(found[0])  # a first pass: never emit damaged content
        if problem:
            raise GritError(f"object {found[0]} {problem}: database damaged (see -verify)")
        out = sys.stdout.buffer
        for chunk in store.open(found[0]):
            out.write(chunk)
        out.flush()
    finally:
        db.close()
    return EXIT_OK


def resources_for_hash(meta: Metadata, prefix: str, db_path: str, flag: str) -> list[dict]:
    """The resources (any name, deleted too) of the one object a hash prefix names."""
    rows = meta.resources_with_hash(check_hash_prefix(prefix, flag))
    if not rows:
        raise NotFoundError(f"no resource with hash {prefix} in {db_path}")
    one_object([r["hash"] for r in rows], prefix)
    return rows


def cmd_status(db_path: str, as_json: bool) -> int:
    db = Database.for_reading(db_path)
    meta = db.meta
    totals = meta.resource_totals()
    data = {"database": db.path, "run_in_progress": db.run_in_progress(),
            "size_bytes": db.sizes(), "steps": meta.step_counts(),
            "failed_tasks": meta.failed_tasks(), "slurm_jobs": meta.slurm_jobs(),
            "resources": {**totals, "names": meta.name_counts(),
                          "live_names": meta.name_counts(live_only=True)}}
    squeue_problem = slurm_present(data["slurm_jobs"])
    if as_json:
        emit_json(data)
        return EXIT_OK
    size, pid = data["size_bytes"], data["run_in_progress"]
    print(f"database {db.path}: {human_bytes(size['metadata'])} metadata, "
          f"{human_bytes(size['objects'])} objects; "
          + (f"a run is in progress (pid {pid})" if pid else "no run in progress"))
    steps = data["steps"]
    width = max([len(s["name"]) for s in steps] + [4])
    print(f"{'step':<{width}}  {'version':<9}  {'pending':>8} {'done':>8} {'failed':>8}")
    for s in steps:
        version = f"v{s['version']}" + ("" if s["latest"] else " (old)")
        t = s["tasks"]
        print(f"{s['name']:<{width}}  {version:<9}  {t['pending']:>8} {t['done']:>8} "
              f"{t['failed']:>8}" + (f"  gather: {s['gather']}" if "gather" in s else ""))
    for job in data["slurm_jobs"]:
        if job["finished"]:  # every result written: nothing to wait for
            continue
        when = "now" if not squeue_problem else (
            f"at grit's last look, {job['looked_at']}" if job["looked_at"] else
            f"at submission, {job['submitted_at']}")
        print(f"slurm job {job['slurm_id'] or '(not submitted)'}: {job['step']}, "
              f"{job['tasks']} task(s) in {job['elements']} element(s), {job.get('results', 0)} "
              f"result(s) written: {job['queued']} queued, {job['running']} running {when}"
              + (f" (squeue: {squeue_problem})" if squeue_problem else ""))
    failed = data["failed_tasks"]
    if failed:
        print("failed tasks (-log TASK shows one):")
        for f in failed[:STATUS_NAMES_SHOWN]:
            why = error_line(f["error"]) if f["error"] else ""
            old = "" if f["current"] else " (superseded, not retried)"
            print(f"  {f['task']:>8}  {f['step']} v{f['version']}{old}: {why[:100]}")
        if len(failed) > STATUS_NAMES_SHOWN:
            print(f"  … and {len(failed) - STATUS_NAMES_SHOWN} more (-status -json lists all)")
    names, live = data["resources"]["names"], data["resources"]["live_names"]
    print(f"resources: {totals['count']} in {len(names)} name(s), {totals['live']} live, "
          f"{totals['deleted']} deleted; {totals['objects']} object(s), "
          f"{human_bytes(totals['bytes'])}")
    for name, count in list(names.items())[:STATUS_NAMES_SHOWN]:
        print(f"  {count:>8}  {name}" + (f" ({live.get(name, 0)} live)"
                                         if live.get(name, 0) != count else ""))
    if len(names) > STATUS_NAMES_SHOWN:
        print(f"  … and {len(names) - STATUS_NAMES_SHOWN} more name(s) (-status -json lists all)")
    return EXIT_OK


def cmd_log(db_path: str, ref: str, as_json: bool) -> int:
    """A task by id, or the task that produced a resource (by hash)."""
    db = Database.for_reading(db_path)
    meta = db.meta
    if ref.isdigit() and len(ref) < HASH_PREFIX_MIN:
        task_id = int(ref)
    else:
        task_id = meta.producer(resources_for_hash(meta, ref, db_path, "-log")[0])
    task = meta.task(task_id) if task_id else None
    if task is None:
        raise NotFoundError(f"no task {ref} in {db_path}")
    store = db.objects
    task["attempts"] = meta.attempts(task_id)
    try:
        if as_json:
            for entry in [task, *task["attempts"]]:
                for label in ("stdout", "stderr"):
                    digest = entry.pop(f"{label}_hash")
                    entry[label] = b"".join(store.open(digest)).decode("utf-8", "replace") \
                        if digest else ""
            emit_json(task)
        else:
            print_task(task, store)
    finally:
        db.close()
    return EXIT_OK


def print_task(task: dict, store: "ObjectStore") -> None:
    """A task as text, each failed attempt before its last first; logs are
    streamed, never held whole."""
    for tried in task["attempts"]:
        print(f"task {task['task']}: {task['step']} v{task['version']}, attempt "
              f"{tried['attempt']} failed{how_it_ended(tried)}")
        print(f"error:  {tried['error']}")
        print(f"used:   {describe_usage(tried)}")
        print_logs(tried, store)
    attempt = f", attempt {len(task['attempts']) + 1}" if task["attempts"] else ""
    print(f"task {task['task']}: {task['step']} v{task['version']}{attempt}, {task['status']}"
          f"{how_it_ended(task)}")
    src = task["input"]
    if "gathered" in task:
        print_gathered(task["gathered"], len(task["gathered"]), "", task["task"])
    else:
        print(f"input:  {describe_resource(src)}" if src else "input:  none (a seed task)")
    for out in task["outputs"]:
        print(f"output: {describe_resource(out)}")
    if task["error"]:
        print(f"error:  {task['error']}")
    if task["status"] != "pending":
        print(f"used:   {describe_usage(task)}")
    print_logs(task, store)


def describe_usage(task: dict) -> str:
    """What a task's script used, as -log says it: CPU, peak RSS, where, which run."""
    if task["cpu_user"] is None:
        return "not measured (its script did not run or left no result, or an older " \
            "grit ran it)"
    rss = human_bytes(task["peak_rss"]) if task["peak_rss"] is not None else \
        f"under {human_bytes(task['rss_under'])} (grit's own; Linux cannot tell less)"
    return (f"CPU {task['cpu_user']:.2f} s user + {task['cpu_system']:.2f} s system, peak RSS "
            f"{rss}, on {task['node'] or 'an unknown host'}"
            + (f" (run {task['run_id']})" if task["run_id"] else ""))


def how_it_ended(task: dict) -> str:
    """", exit status 1 in 0.20 s (started ...)": what -log says after a task's status."""
    exit_text = "" if task["exit_code"] is None else f", {describe_exit(task['exit_code'])}"
    took = "" if task["duration"] is None else f" in {task['duration']:.2f} s"
    return f"{exit_text}{took}" + (f" (started {task['started_at']})" if task["started_at"] else "")


def print_logs(task: dict, store: "ObjectStore") -> None:
    for label in ("stdout", "stderr"):
        digest = task[f"{label}_hash"]
        print(f"--- {label} ({human_bytes(store.size(digest) if digest else 0)}) ---", flush=True)
        last = b"\n"
        for chunk in store.open(digest) if digest else ():
            sys.stdout.buffer.write(chunk)
            last = chunk[-1:]
        if last != b"\n":
            sys.stdout.buffer.write(b"\n")
        sys.stdout.buffer.flush()


def print_gathered(gathered: list[dict], count: int, pad: str, task_id: int) -> None:
    """A gather task's inputs (`count` of them): the first GATHERED_SHOWN, then how many more."""
    print(f"{pad}inputs: {count} gathered")
    for r in gathered[:GATHERED_SHOWN]:
        print(f"{pad}  {describe_resource(r)}")
    if count > GATHERED_SHOWN:
        print(f"{pad}  … and {count - GATHERED_SHOWN} more (-log {task_id} -json lists all)")


def describe_resource(r: dict) -> str:
    gone = f", deleted {r['deleted_at']}" if r["deleted_at"] else "" if r["live"] else ", not live"
    return f"{r['name']} {r['hash']} ({human_bytes(r['size'])}, resource {r['id']}{gone})"


def ancestry(meta: Metadata, resource: dict, cut: list[bool]) -> dict:
    """A resource and, link by link, the task, step version and input it came from
    (at most LINEAGE_DEPTH links; cut[0] says whether there were more)."""
    node: dict = {"resource": resource, "produced_by": None}
    link = node
    for links in range(LINEAGE_DEPTH + 1):
        if not link["resource"]["task"]:
            break
        if links == LINEAGE_DEPTH:
            cut[0] = True
            break
        task = meta.task(meta.producer(link["resource"]))  # type: ignore[arg-type]
        if task is None:
            break
        parent = {"resource": task["input"], "produced_by": None} if task["input"] else None
        link["produced_by"] = {"task": task["task"], "step": task["step"],
                               "version": task["version"], "input": parent}
        if "gathered" in task:  # many inputs: the chain ends here, with how many
            link["produced_by"]["gathered"] = task["gathered"][:LINEAGE_GATHERED]
            link["produced_by"]["gathered_count"] = len(task["gathered"])
            cut[0] = cut[0] or len(task["gathered"]) > LINEAGE_GATHERED
        if parent is None:
            break
        link = parent
    return node


def descendants(meta: Metadata, resource_id: int, budget: list[int], depth: int = 0) -> list[dict]:
    """The tasks that consumed a resource and what they made, recursively (at
    most LINEAGE_LIMIT resources, LINEAGE_DEPTH levels; budget[0] < 0 if cut)."""
    if depth == LINEAGE_DEPTH:
        budget[0] = min(budget[0], -1)
        return []
    found = []
    for consumer in meta.consumers(resource_id):
        outputs = []
        for out in consumer.pop("outputs"):
            budget[0] -= 1
            if budget[0] < 0:
                break
            outputs.append({"resource": out,
                            "consumed_by": descendants(meta, out["id"], budget, depth + 1)})
        found.append({**consumer, "outputs": outputs})
    return found


def print_ancestry(node: dict) -> None:
    depth = 0
    while node:
        pad = "  " * depth
        print(f"{pad}{describe_resource(node['resource'])}")
        made = node["produced_by"]
        if made is None:
            print(f"{pad}  made by: no task recorded")
            return
        origin = " from" if made["input"] else "" if "gathered" in made else ", a seed task"
        print(f"{pad}  made by task {made['task']} ({made['step']} v{made['version']}){origin}")
        if "gathered" in made:
            print_gathered(made["gathered"], made["gathered_count"], pad + "  ", made["task"])
        node, depth = made["input"], depth + 1


def print_descendants(consumers: list[dict], depth: int) -> None:
    for c in consumers:
        pad = "  " * depth
        print(f"{pad}task {c['task']} ({c['step']} v{c['version']}, {c['status']})"
              + (" made" if c["outputs"] else " made nothing new"))
        for out in c["outputs"]:
            print(f"{pad}  {describe_resource(out['resource'])}")
            print_descendants(out["consumed_by"], depth + 2)


def cmd_lineage(db_path: str, ref: str, with_descendants: bool, as_json: bool) -> int:
    meta = Database.for_reading(db_path).meta
    cut = [False]
    chains = [ancestry(meta, r, cut) for r in resources_for_hash(meta, ref, db_path, "-lineage")]
    budget = [LINEAGE_LIMIT]
    if with_descendants:
        for chain in chains:
            chain["consumed_by"] = descendants(meta, chain["resource"]["id"], budget)
    truncated = cut[0] or budget[0] < 0
    if as_json:
        emit_json({"lineage": chains, "truncated": truncated})
        return EXIT_OK
    for chain in chains:
        print_ancestry(chain)
        if with_descendants:
            print("descendants:" if chain["consumed_by"] else "descendants: none")
            print_descendants(chain["consumed_by"], 1)
    if truncated:
        print(f"(cut: at most {LINEAGE_DEPTH} links each way and {LINEAGE_LIMIT} descendants "
              "are shown)")
    return EXIT_OK


class _ObjectReader(io.RawIOBase):
    """An object's chunks as a file, hashed as read: tarfile copies from it."""

    def __init__(self, store: "ObjectStore", digest: str) -> None:
        self.digest = digest
        self.chunks = store.open(digest)
        self.hasher = hashlib.sha256()
        self.rest = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buf: "memoryview") -> int:  # type: ignore[override]
        if not self.rest:
            self.rest = next(self.chunks, b"")
            self.hasher.update(self.rest)
        n = min(len(buf), len(self.rest))
        buf[:n] = self.rest[:n]
        self.rest = self.rest[n:]
        return n


def cmd_export_tar(db_path: str, pattern: str, target: str, newest: bool, history: bool,
                   console: Console) -> int:
    """Resources as a tar stream: every one of the names matching `pattern` as
    NAME/HASH, or with -newest the newest of each as NAME."""
    db = Database.for_reading(db_path)
    meta = db.meta
    if newest:
        chosen = [(r, r["name"]) for r in meta.newest_per_name(pattern, not history)]
        left = len(meta.resources_matching(pattern, not history)) - len(chosen)
        if left:
            console.info(f"-newest leaves out {left} older resource(s) of the same name(s) "
                         "(without -newest each is NAME/HASH)")
    else:
        chosen = [(r, f"{r['name']}/{r['hash']}")
                  for r in meta.resources_matching(pattern, not history)]
    if not chosen:
        raise NotFoundError(f"no resource named {quote(pattern)} in {db_path}")
    partial = "" if target == "-" else f"{target}.partial"
    store = db.objects
    try:
        out = open(partial, "wb") if partial else sys.stdout.buffer
        try:
            write_tar(store, chosen, out)
            out.flush()
        finally:
            if partial:
                out.close()
        if partial:
            os.replace(partial, target)  # a complete archive, or none at all
    except KeyError as e:
        raise GritError(f"object {e.args[0]} is missing (see -verify); export stopped") from None
    except DamagedObject as e:
        raise GritError(f"{e} (see -verify); export stopped") from None
    except BrokenPipeError:
        raise  # the reader stopped early (`| head`): main() leaves quietly
    except OSError as e:
        raise GritError(f"cannot write {target}: {e.strerror or e}") from None
    finally:
        db.close()
        if partial and os.path.exists(partial):
            os.unlink(partial)
    console.info(f"exported {len(chosen)} resource(s) to {target if partial else 'stdout'}")
    return EXIT_OK


def write_tar(store: "ObjectStore", chosen: list[tuple[dict, str]], out: IO[bytes]) -> None:
    import tarfile

    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for resource, member in chosen:
            info = tarfile.TarInfo(member)
            info.size, info.mode = resource["size"], 0o644
            info.mtime = int(parse_utc(resource["created_at"]))
            reader = _ObjectReader(store, resource["hash"])
            tar.addfile(info, io.BufferedReader(reader, CHUNK_SIZE))
            if reader.hasher.hexdigest() != resource["hash"]:
                raise DamagedObject(f"object {resource['hash']} does not match its hash")


# =============================================================================
# Pictures of a run
# =============================================================================
# What runs did, for people: -runs (the history), -trace (a TSV row per task),
# -graph (the steps and what fed what, as DOT or Mermaid) and -report (one
# self-contained HTML file: no script, no request, inline CSS and SVG). Reads
# the metadata only.

REPORT_WIDTH = 960  # px of the timeline and the graph's viewBox
REPORT_LANE = 14  # px per timeline row
REPORT_LANES_MAX = 64  # more concurrent tasks than this share rows (the busiest shown)
REPORT_SLOWEST = 10
REPORT_FAILURES = 50
REPORT_BINS = 16  # bars of a step's duration histogram
GRAPH_NODE = (150, 44)  # px: a step's box in the report's graph
GRAPH_GAP = (70, 26)  # px between boxes: across, down


def chosen_run(meta: Metadata, number: int | None) -> dict:
    """The run -run N names (default: the last), or one clear error."""
    found = meta.runs(number or 0)
    if not found:
        raise NotFoundError("no run recorded yet: -runs lists runs (grit records them "
                            "from schema 10 on)" if not number else
                            f"no run {number}: -runs lists them")
    return found[0]


def described(db: Database, runs: list[dict]) -> list[dict]:
    """Runs with their "outcome" and "seconds" (None: no end recorded). Only
    the newest run can be running: while a grit holds the run lock."""
    newest = db.meta.runs(0)
    running = bool(newest and db.run_in_progress()) and newest[0]["id"]
    for run in runs:
        run["seconds"] = None if not run["finished_at"] else \
            parse_utc(run["finished_at"]) - parse_utc(run["started_at"])
        run["outcome"] = run_outcome(run, run["id"] == running)
    return runs


def run_outcome(run: dict, running: bool) -> str:
    if run["exit_status"] is None:
        return "running" if running else "killed (no end recorded)"
    if run["interrupted"]:
        return "interrupted"
    return "ok" if run["exit_status"] == 0 else f"failed (exit {run['exit_status']})"


def seconds_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s" if seconds < 60 \
        else format_duration(seconds)


def cmd_runs(db_path: str, as_json: bool) -> int:
    db = Database.for_reading(db_path)
    runs = described(db, db.meta.runs())
    db.close()
    if as_json:
        emit_json(runs)
        return EXIT_OK
    print(f"{'run':>4}  {'started':<24}  {'took':>8}  {'outcome':<16} {'executor':<8} "
          f"{'started':>7} {'done':>7} {'failed':>7} {'known':>7} {'new res':>7}  command")
    for run in runs:
        took = seconds_text(run["seconds"])
        print(f"{run['id']:>4}  {run['started_at']:<24}  {took:>8}  {run['outcome']:<16} "
              f"{run['executor']:<8} {run['started']:>7} {run['done']:>7} {run['failed']:>7} "
              f"{run['known']:>7} {run['resources']:>7}  grit {shlex.join(run['command'])}")
    return EXIT_OK


def cmd_trace(db_path: str, number: int | None) -> int:
    db = Database.for_reading(db_path)
    rows = db.meta.trace(chosen_run(db.meta, number)["id"])
    db.close()
    print("\t".join(TRACE_COLUMNS))
    for row in rows:
        print("\t".join("-" if v is None else f"{v:.3f}" if isinstance(v, float) else
                        re.sub(r"\s", " ", str(v)) for v in row.values()))
    return EXIT_OK


def cmd_graph(db_path: str, form: str) -> int:
    if form not in ("dot", "mermaid"):
        raise GritError(f"-graph takes dot or mermaid, not {quote(form)}")
    db = Database.for_reading(db_path)
    steps, edges = db.meta.step_graph()
    db.close()
    print("\n".join(graph_dot(steps, edges) if form == "dot" else graph_mermaid(steps, edges)))
    return EXIT_OK


# Step names are letters, digits, '_', '.' and '-': quoted, they need no escapes.
def graph_dot(steps: list[dict], edges: list[tuple[str, str, int]]) -> list[str]:
    shapes = {"seed": "invhouse", "source": "folder", "gather": "trapezium", "step": "box"}
    return (["digraph grit {", "  rankdir=LR;"]
            + [f'  "{s["name"]}" [shape={shapes[s["kind"]]}, label="{s["name"]}\\n{s["kind"]}"];'
               for s in steps]
            + [f'  "{a}" -> "{b}" [label="{n}"];' for a, b, n in edges] + ["}"])


def graph_mermaid(steps: list[dict], edges: list[tuple[str, str, int]]) -> list[str]:
    ids = {s["name"]: f"s{i}" for i, s in enumerate(steps)}
    return (["flowchart LR"] + [f'  {ids[s["name"]]}["{s["name"]} ({s["kind"]})"]' for s in steps]
            + [f"  {ids[a]} -->|{n}| {ids[b]}" for a, b, n in edges])


def cmd_report(db_path: str, target: str, number: int | None, console: Console) -> int:
    started = time.monotonic()
    db = Database.for_reading(db_path)
    try:
        run = described(db, [chosen_run(db.meta, number)])[0]
        tasks = db.meta.trace(run["id"])
        steps, edges = db.meta.step_graph()
        live = db.meta.made_by_run(run["id"])
    finally:
        db.close()
    page = report_html(run, tasks, steps, edges, live)
    try:
        write_atomically(target, lambda f: f.write(page.encode()))
    except OSError as e:
        raise GritError(f"cannot write {target}: {e.strerror or e}") from None
    console.info(f"report of run {run['id']} ({len(tasks)} task(s)) written to {target}: "
                 f"{human_bytes(len(page))} in {time.monotonic() - started:.2f}s")
    return EXIT_OK


def esc(value: object) -> str:
    import html
    return html.escape(str(value), quote=True)


def step_colours(names: Iterable[str]) -> dict[str, str]:
    """A hue per step, spread round the wheel (readable on both themes)."""
    names = list(dict.fromkeys(names))
    return {n: f"hsl({round(i * 360 / max(len(names), 1) + 210) % 360} 65% 50%)"
            for i, n in enumerate(names)}


def report_html(run: dict, tasks: list[dict], steps: list[dict],
                edges: list[tuple[str, str, int]], live: dict) -> str:
    colours = step_colours([s["name"] for s in steps] + [t["step"] for t in tasks])
    facts = [("started", run["started_at"]), ("took", seconds_text(run["seconds"])),
             ("outcome", run["outcome"]), ("executor", run["executor"]),
             ("output mode", run["output_mode"]), ("tasks started", run["started"]),
             ("done", run["done"]), ("failed", run["failed"]),
             ("outputs already known (early cutoff)", run["known"]),
             ("resources created", run["resources"])]
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
             f"<meta name=viewport content='width=device-width'>"
             f"<title>grit run {run['id']}</title><style>{REPORT_CSS}</style></head><body>",
             f"<h1>grit run {run['id']}</h1><p class=command><code>grit "
             f"{esc(shlex.join(run['command']))}</code></p><dl id=facts>"
             + "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in facts)
             + "</dl>",
             "<h2>Steps and what fed what</h2>", report_graph(steps, edges, tasks, colours),
             "<h2>Timeline</h2>", report_timeline(tasks, colours),
             "<h2>Per step</h2>", report_steps(tasks, colours),
             "<h2>Failures</h2>", report_failures(tasks),
             "<h2>Slowest tasks</h2>", report_slowest(tasks),
             "<h2>Live at the end</h2>", report_live(live),
             "</body></html>"]
    return "\n".join(parts)


REPORT_CSS = """
:root{color-scheme:light dark;--bg:#fff;--fg:#1b1f24;--muted:#59636e;--line:#d0d7de;--fail:#cf222e}
@media (prefers-color-scheme:dark){:root{--bg:#0d1117;--fg:#e6edf3;--muted:#9198a1;
--line:#3d444d;--fail:#ff7b72}}
body{background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,sans-serif;margin:2em auto;
max-width:1000px;padding:0 1em}
h1{margin-bottom:.2em}h2{border-bottom:1px solid var(--line);padding-bottom:.2em;margin-top:1.6em}
code{font-family:ui-monospace,monospace}.command{color:var(--muted)}
dl#facts{display:flex;flex-wrap:wrap;gap:.4em 1.6em}dl#facts div{min-width:7em}
dt{color:var(--muted);font-size:12px}dd{margin:0;font-weight:600}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.25em .5em;
border-bottom:1px solid var(--line);vertical-align:top}td:first-child{white-space:nowrap}
td.n,th.n{text-align:right;
font-variant-numeric:tabular-nums}
svg text{fill:var(--fg);font:12px system-ui,sans-serif}svg .muted{fill:var(--muted)}
svg .edge{stroke:var(--muted);fill:none}svg .node rect{fill:var(--bg);stroke-width:2}
svg .axis{stroke:var(--line)}.fail{color:var(--fail)}.swatch{display:inline-block;
width:.8em;height:.8em;border-radius:2px;margin-right:.3em}
@media print{body{max-width:none;margin:0}h2{break-after:avoid}svg,table{break-inside:avoid}}
"""


def stats(values: list[float]) -> tuple[float | None, float | None]:
    """Median and maximum (None for no values)."""
    if not values:
        return None, None
    ordered = sorted(values)
    return ordered[len(ordered) // 2], ordered[-1]


def graph_columns(names: list[str], edges: list[tuple[str, str, int]]) -> dict[str, int]:
    """Each step's column: its longest path from a root, found in at most
    len(names) rounds (a cycle stops growing there)."""
    column = {n: 0 for n in names}
    for _ in names:
        changed = False
        for a, b, _ in edges:
            if a != b and column[b] < column[a] + 1 <= len(names):
                column[b], changed = column[a] + 1, True
        if not changed:
            break
    return column


def report_graph(steps: list[dict], edges: list[tuple[str, str, int]], tasks: list[dict],
                 colours: dict[str, str]) -> str:
    """Steps in columns by their longest path from a root (edges back to an
    earlier column close a cycle and are drawn dashed)."""
    kinds = {s["name"]: s["kind"] for s in steps}  # edges join current steps only
    column = graph_columns(list(kinds), edges)
    rows: collections.Counter = collections.Counter()
    x, y = {}, {}
    for n in kinds:
        x[n] = 10 + column[n] * (GRAPH_NODE[0] + GRAPH_GAP[0])
        y[n] = 40 + rows[column[n]] * (GRAPH_NODE[1] + GRAPH_GAP[1])  # room for a loop above
        rows[column[n]] += 1
    counts = collections.Counter(t["step"] for t in tasks if t["attempt"] is None)
    width, height = GRAPH_NODE
    total_w = 20 + (max(column.values(), default=0) + 1) * (width + GRAPH_GAP[0])
    total_h = 60 + max(rows.values(), default=1) * (height + GRAPH_GAP[1])
    svg = [f"<svg id=graph viewBox='0 0 {total_w} {total_h}' width='{min(total_w, REPORT_WIDTH)}' "
           f"role=img aria-label='step graph'><defs><marker id=arrow viewBox='0 0 10 10' refX=10 "
           "refY=5 markerWidth=7 markerHeight=7 orient=auto-start-reverse>"
           "<path d='M0,0L10,5L0,10z' class=muted /></marker></defs>"]
    for a, b, n in edges:
        back = column[b] <= column[a]
        path, (lx, ly) = edge_path((x[a], y[a]), (x[b], y[b]), a == b, back)
        svg.append(f"<g class=edge-group data-from='{esc(a)}' data-to='{esc(b)}' data-count={n}>"
                   f"<path class=edge d='{path}' marker-end='url(#arrow)'"
                   + (" stroke-dasharray='5 4'" if back else "") + "/>"
                   f"<text x={lx:.0f} y={ly:.0f} text-anchor=middle class=muted>{n}</text></g>")
    for n, kind in kinds.items():
        svg.append(f"<g class=node data-step='{esc(n)}' data-kind={kind}>"
                   f"<title>{esc(n)}: {kind}, {counts[n]} task(s) this run</title>"
                   f"<rect x={x[n]} y={y[n]} width={width} height={height} rx=8 "
                   f"stroke='{colours.get(n, 'gray')}'"
                   + (" stroke-dasharray='4 3'" if kind != "step" else "") + "/>"
                   f"<text x={x[n] + 10} y={y[n] + 18}>{esc(n[:22])}</text>"
                   f"<text x={x[n] + 10} y={y[n] + 35} class=muted>{kind} · "
                   f"{counts[n]} task(s)</text></g>")
    return "".join(svg) + "</svg>"


def edge_path(a: tuple[float, float], b: tuple[float, float], loop: bool,
              back: bool) -> tuple[str, tuple[float, float]]:
    """An edge's SVG path between two nodes' corners, and where its label goes:
    a loop above a node, a curve below for an edge back, else left to right."""
    (ax, ay), (bx, by), (width, height) = a, b, GRAPH_NODE
    if loop:
        return (f"M{ax + width * .65},{ay} C{ax + width * .65},{ay - 30} "
                f"{ax + width * .35},{ay - 30} {ax + width * .35},{ay}"), (ax + width / 2, ay - 24)
    if back:
        return (f"M{ax + width / 2},{ay + height} C{ax + width / 2},{ay + height + 40} "
                f"{bx + width / 2},{by + height + 40} {bx + width / 2},{by + height}"), \
            ((ax + bx + width) / 2, max(ay, by) + height + 30)
    x1, y1, x2, y2 = ax + width, ay + height / 2, bx, by + height / 2
    half = GRAPH_GAP[0] / 2
    return f"M{x1},{y1} C{x1 + half},{y1} {x2 - half},{y2} {x2},{y2}", \
        ((x1 + x2) / 2, (y1 + y2) / 2 - 4)


def report_timeline(tasks: list[dict], colours: dict[str, str]) -> str:
    """One row per slot in use (a task takes the first row free at its start);
    marks closer than a pixel in a row merge into one that counts its tasks."""
    timed = sorted((parse_utc(t["started"]), t["wall"] or 0.0, t) for t in tasks
                   if t["started"])
    if not timed:
        return "<p>No task ran.</p>"
    begin = timed[0][0]
    end = max(s + w for s, w, _ in timed)
    scale = (REPORT_WIDTH - 60) / max(end - begin, 1e-3)
    lanes: list[float] = []  # when each row is free again
    marks: list[list] = []  # per row: [x0, x1, step, tasks, failed]
    rows: list[list[list]] = []
    for start, wall, task in timed:
        lane = next((i for i, free in enumerate(lanes) if free <= start), None)
        if lane is None:
            lane = len(lanes) if len(lanes) < REPORT_LANES_MAX else \
                min(range(len(lanes)), key=lanes.__getitem__)
            if lane == len(lanes):
                lanes.append(0.0)
                rows.append([])
        lanes[lane] = start + wall
        x0, x1 = (start - begin) * scale, (start + wall - begin) * scale
        failed = task["status"] == "failed"
        row = rows[lane]
        if row and row[-1][2] == task["step"] and x0 - row[-1][1] < 1 and x1 - row[-1][0] < 2 \
                and row[-1][4] == failed:
            row[-1][1] = max(row[-1][1], x1)
            row[-1][3] += 1
        else:
            row.append([x0, x1, task["step"], 1, failed])
    height = len(rows) * REPORT_LANE + 24
    svg = [f"<svg id=timeline viewBox='0 0 {REPORT_WIDTH} {height}' width='{REPORT_WIDTH}' "
           f"role=img aria-label='timeline of {len(tasks)} task(s)'>"]
    for i, row in enumerate(rows):
        for x0, x1, step, count, failed in row:
            what = f"{count} task(s)" if count > 1 else "1 task"
            svg.append(f"<rect class=mark data-step='{esc(step)}' data-tasks={count} "
                       f"x={50 + x0:.1f} y={i * REPORT_LANE + 2} width={max(x1 - x0, 1):.1f} "
                       f"height={REPORT_LANE - 3} fill='{colours[step]}'"
                       + (" stroke='red' stroke-width=1.5" if failed else "")
                       + f"><title>{esc(step)}: {what}" + (" failed" if failed else "")
                       + "</title></rect>")
    axis_y = len(rows) * REPORT_LANE + 4
    svg.append(f"<line class=axis x1=50 x2={REPORT_WIDTH - 10} y1={axis_y} y2={axis_y} />")
    for k in range(5):
        at = (end - begin) * k / 4
        svg.append(f"<text x={50 + at * scale:.0f} y={axis_y + 16} "
                   f"text-anchor={'end' if k == 4 else 'middle'} "
                   f"class=muted>{seconds_text(at) if end - begin < 60 else format_duration(at)}"
                   "</text>")
    svg.append(f"<text x=0 y=12 class=muted>{len(rows)} row(s)</text></svg>")
    legend = "".join(f"<span><i class=swatch style='background:{colours[s]}'></i>{esc(s)} </span>"
                     for s in dict.fromkeys(t["step"] for _, _, t in timed))
    return "".join(svg) + f"<p>{legend}</p>"


def histogram(values: list[float]) -> str:
    """A small inline bar chart of a step's task durations."""
    if len(values) < 2:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    bins = [0] * REPORT_BINS
    for v in values:
        bins[min(int((v - low) / span * REPORT_BINS), REPORT_BINS - 1)] += 1
    top = max(bins)
    bars = "".join(f"<rect x={i * 6} y={20 - 20 * n / top:.1f} width=5 height={20 * n / top:.1f} "
                   "class=muted />" for i, n in enumerate(bins) if n)
    return (f"<svg class=histogram width={REPORT_BINS * 6} height=20 role=img aria-label="
            f"'durations {format_duration(low)} to {format_duration(high)}'>{bars}</svg>")


def report_steps(tasks: list[dict], colours: dict[str, str]) -> str:
    def show(value: float | None, unit: str) -> str:
        if value is None:
            return "-"
        return human_bytes(value) if unit == "B" else seconds_text(value)
    by_step: dict[str, list[dict]] = {}
    for t in tasks:
        by_step.setdefault(t["step"], []).append(t)
    head = ("step", "tasks", "failed", "wall median", "wall max", "CPU median", "CPU max",
            "RSS median", "RSS max", "bytes in", "bytes out", "durations")
    rows = []
    for step, group in by_step.items():
        walls = [t["wall"] for t in group if t["wall"] is not None]
        cpus = [t["cpu_user"] + t["cpu_system"] for t in group if t["cpu_user"] is not None]
        rss = [t["rss"] for t in group if t["rss"] is not None]
        cells = [len(group), sum(t["status"] == "failed" for t in group),
                 *(show(v, "s") for v in stats(walls)), *(show(v, "s") for v in stats(cpus)),
                 *(show(v, "B") for v in stats(rss)),
                 human_bytes(sum(t["bytes_in"] or 0 for t in group)),
                 human_bytes(sum(t["bytes_out"] or 0 for t in group))]
        rows.append(f"<tr data-step='{esc(step)}'><td><i class=swatch style='background:"
                    f"{colours[step]}'></i>{esc(step)}</td>"
                    + "".join(f"<td class=n>{esc(c)}</td>" for c in cells)
                    + f"<td>{histogram(walls)}</td></tr>")
    unmeasured = sum(t["rss"] is None for t in tasks)
    note = (f"<p class=command>RSS: {unmeasured} task(s) stayed under grit's own peak "
            "(Linux counts a spawning process's peak into its child's) or were not measured; "
            "they are left out.</p>") if unmeasured else ""
    return ("<table id=steps><tr>" + "".join(f"<th{' class=n' if 0 < i < 11 else ''}>{h}</th>"
                                            for i, h in enumerate(head))
            + "</tr>" + "".join(rows) + "</table>" + note)


def report_failures(tasks: list[dict]) -> str:
    failed = [t for t in tasks if t["status"] == "failed"]
    if not failed:
        return "<p id=failures>None.</p>"
    rows = "".join(f"<tr class=failure data-task={t['task']}><td class=n>{t['task']}</td>"
                   f"<td>{esc(t['step'])}" + (f" (attempt {t['attempt']})" if t["attempt"] else "")
                   + f"</td><td class=fail>{esc(t['error'] or '')}</td></tr>"
                   for t in failed[:REPORT_FAILURES])
    more = f"<p>… and {len(failed) - REPORT_FAILURES} more (-trace lists all)</p>" \
        if len(failed) > REPORT_FAILURES else ""
    return (f"<table id=failures><tr><th class=n>task</th><th>step</th><th>error</th></tr>{rows}"
            f"</table>{more}")


def report_slowest(tasks: list[dict]) -> str:
    slow = sorted((t for t in tasks if t["wall"] is not None), key=lambda t: -t["wall"])
    rows = "".join(f"<tr><td class=n>{t['task']}</td><td>{esc(t['step'])}</td>"
                   f"<td>{esc(t['input'])}</td><td class=n>{seconds_text(t['wall'])}</td>"
                   f"<td>{esc(t['node'] or '')}</td></tr>" for t in slow[:REPORT_SLOWEST])
    return (f"<table id=slowest><tr><th class=n>task</th><th>step</th><th>input</th>"
            f"<th class=n>wall</th><th>node</th></tr>{rows}</table>")


def report_live(live: dict) -> str:
    rows = "".join(f"<tr><td>{esc(step)}</td><td class=n>{n_live}</td><td class=n>{n_old}</td>"
                   "</tr>" for step, (n_live, n_old) in live.items())
    return ("<p>Resources this run created, by the step that made them: live (what a clean run "
            "would make now) or superseded since.</p><table id=live><tr><th>step</th>"
            f"<th class=n>live</th><th class=n>superseded</th></tr>{rows}</table>")



# =============================================================================
# Managing a database
# =============================================================================
# -delete, -prune, -gc, -verify: what changes or checks a database's content
# outside a run, holding the run lock while it changes anything.

def delete_resources(db_path: str, pick: Callable[[Metadata], list[dict]], dry_run: bool,
                     console: Console) -> int:
    """Mark resources deleted and remove the objects nothing else refers to;
    report what was derived from them (kept: it is data in its own right)."""
    with Database.for_change(db_path) as db:
        meta = db.meta
        victims = pick(meta)
        budget = [LINEAGE_LIMIT]
        derived = sum(count_live(tree) for r in victims
                      for tree in descendants(meta, r["id"], budget))
        verb = "would delete" if dry_run else "deleted"
        # A dry run makes the same change, sees what it frees, and rolls it back.
        with meta.transaction(commit=not dry_run):
            meta.mark_deleted([r["id"] for r in victims])
            freed = unreferenced(meta, {r["hash"]: r["size"] for r in victims})
        if not dry_run:
            remove_objects(db, freed, console)
        for r in victims:
            console.detail(f"{verb} {describe_resource(r)}")
        console.info(f"{verb} {len(victims)} resource(s), {len(freed)} object(s) "
                     f"({human_bytes(sum(freed.values()))})"
                     + (f"; {derived} resource(s) derived from them are kept "
                        "(-lineage HASH -descendants shows them)" if derived else ""))
    return EXIT_OK


def count_live(consumer: dict) -> int:
    return sum(1 + sum(count_live(c) for c in out["consumed_by"])
               for out in consumer["outputs"] if not out["resource"]["deleted_at"])


def unreferenced(meta: Metadata, candidates: dict[str, int]) -> dict[str, int]:
    """Those of `candidates` (hash -> size) that no metadata refers to."""
    return {h: candidates[h] for h in sorted(set(candidates) - set(meta.referenced_hashes()))}


def remove_objects(db: Database, hashes: Iterable[str], console: Console) -> None:
    for digest in hashes:
        console.detail(f"removing object {digest}")
        db.objects.delete(digest)
    db.objects.sync()


def cmd_delete(db_path: str, ref: str, dry_run: bool, console: Console) -> int:
    """Delete one object's resources (by hash) or every resource of a name."""
    def pick(meta: Metadata) -> list[dict]:
        if is_hash_prefix(ref):
            found = [r for r in meta.resources_with_hash(ref.lower()) if not r["deleted_at"]]
            one_object([r["hash"] for r in found], ref)
            if found:
                return found
        found = meta.resources_named(ref)
        if not found:
            raise NotFoundError(f"no resource named or with hash {quote(ref)} in {db_path}")
        return found
    return delete_resources(db_path, pick, dry_run, console)


def cmd_prune(db_path: str, name: str, keep: int | None, dry_run: bool,
              console: Console) -> int:
    if keep is None or keep < 0:
        raise GritError("-prune NAME needs -keep N (how many of the newest to keep, 0 or more)")

    def pick(meta: Metadata) -> list[dict]:
        found = meta.resources_named(name)
        if not found:
            raise NotFoundError(f"no resource named {quote(name)} in {db_path}")
        return found[:max(0, len(found) - keep)]  # all but the newest `keep`
    return delete_resources(db_path, pick, dry_run, console)


def cmd_gc(db_path: str, retired: bool, console: Console) -> int:
    """Remove objects no resource or task log refers to (those of deleted
    resources, of tasks killed or failed after storing outputs), then give
    the free space back to the filesystem. With -retired, first delete the
    content of every resource that is not live. Holds the run lock."""
    with Database.for_change(db_path) as db:
        if retired:
            with db.meta.transaction():
                gone = db.meta.retired_resources()
                db.meta.mark_deleted([r["id"] for r in gone])
            console.info(f"deleted the content of {len(gone)} retired resource(s)")
        removed = unreferenced(db.meta, dict.fromkeys(db.objects.hashes(), 0))
        remove_objects(db, removed, console)
        before = db.lmdb_bytes
        compacted = compact_objects(db)
        after = db.lmdb_bytes
    console.info(f"removed {len(removed)} unreferenced object(s); object store "
                 + (f"compacted from {human_bytes(before)} to {human_bytes(after)}" if compacted
                    else f"{human_bytes(after)}, little free space: not compacted"))
    return EXIT_OK


def compact_objects(db: Database) -> bool:
    """Rewrite the LMDB file without its free pages, when they are worth it.
    The copy is made beside the store and swapped in by two renames; a crash
    at any point is completed or undone by the next lock holder."""
    try:
        if db.objects.free_bytes() < max(COMPACT_MIN_BYTES,
                                         db.lmdb_bytes * COMPACT_MIN_FRACTION):
            return False
        fresh = db.objects_path + ".compact"
        shutil.rmtree(fresh, ignore_errors=True)
        os.mkdir(fresh, 0o700)
        db.objects.copy_compacted(fresh)
    finally:
        db.close_objects()
    for name in os.listdir(fresh):
        fd = os.open(os.path.join(fresh, name), os.O_RDONLY)
        os.fchmod(fd, 0o600)
        os.fsync(fd)
        os.close(fd)
    os.rename(db.objects_path, db.objects_path + ".old")
    os.rename(fresh, db.objects_path)
    shutil.rmtree(db.objects_path + ".old")
    return True


# -gc compacts the object store when at least this much of it is free.
COMPACT_MIN_BYTES = 1024 * 1024

COMPACT_MIN_FRACTION = 0.1


def cmd_verify(db_path: str, console: Console) -> int:
    """Check the metadata's integrity and that every object it names is present
    and matches its hash. Problems go to stderr, one per line; exit 1 if any."""
    db = Database.for_reading(db_path)
    problems = [f"metadata: {p}" for p in db.meta.integrity_problems()]
    hashes = db.meta.referenced_hashes()
    for digest in hashes:
        problem = db.objects.check(digest)
        if problem:
            problems.append(f"object {digest} {problem}")
    db.close()
    for problem in problems:
        console.error(problem)
    summary = f"verified {len(hashes)} object(s): {len(problems)} problem(s)"
    if problems:
        console.error(summary)
        return EXIT_TASK_FAILED
    console.info(summary)
    return EXIT_OK


# =============================================================================
# CLI
# =============================================================================
# Flags to a command: one table of commands (flag, help, handler, the options
# that go with it) and one of options; the parser, the usage errors and the
# dispatch come from them.

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """Bad usage: one line (argparse would print the whole usage first)."""
        sys.stderr.write(f"grit: error: {message} (see grit --help)\n")
        sys.exit(EXIT_USAGE)


def run_options(args: argparse.Namespace) -> RunOptions:
    if not args.manifest:
        raise GritError("-run needs -manifest PATH")
    if args.parallel is not None and args.parallel < 1:
        raise GritError(f"-parallel must be 1 or more, not {args.parallel}")
    if not 0 <= args.timeout < float("inf"):
        raise GritError(f"-timeout must be 0 (no limit) or more seconds, not {args.timeout}")
    if args.retries < 0:
        raise GritError(f"-retries must be 0 or more, not {args.retries}")
    flags = {}
    for name, executor in EXECUTORS.items():  # an executor's own flags go with it alone
        for flag in executor.flags:
            value = getattr(args, flag.replace("-", "_"))
            if value is not None and name != args.executor:
                raise GritError(f"-{flag} goes with -executor {name}")
            if value is not None:
                flags[flag.replace("-", "_")] = value
    return RunOptions(args.manifest, args.db, args.parallel or 0, args.start, args.step,
                      args.output_mode, args.timeout, args.dry_run, args.json, args.executor,
                      flags, args.retries, args.command_line, args.watch)


@dataclass(frozen=True)
class Command:
    """A command (exactly one per call): its flag, its value ("" for a switch),
    its help, what it calls, and the options that go with it (and with no
    command that does not list them)."""

    flag: str
    value: str
    help: str
    handler: Callable[[argparse.Namespace, Console], int]
    options: tuple[str, ...] = ()


COMMANDS = (
    Command("run", "[N]", "execute the pipeline (-run N, with -trace or -report: which "
            "run, as -runs numbers them)", lambda a, c: cmd_run(run_options(a), c),
            ("dry-run", "json", "watch")),
    Command("export", "NAME", "list hash, name and created_at of each resource NAME",
            lambda a, c: cmd_export(a.db, a.export, a.live), ("live",)),
    Command("export-hash", "HASH", "write the object's bytes to stdout (unique prefix of 8+ "
            "hex digits)", lambda a, c: cmd_export_hash(a.db, a.export_hash)),
    Command("export-tar", "PATTERN FILE", "write the resources of matching names as a tar (FILE "
            "- is stdout), each as NAME/HASH, or with -newest the newest of each as NAME",
            lambda a, c: cmd_export_tar(a.db, *a.export_tar, a.newest, a.all, c),
            ("newest", "all")),
    Command("status", "", "tasks pending/done/failed per step version, resources per name, "
            "sizes", lambda a, c: cmd_status(a.db, a.json), ("json",)),
    Command("log", "TASK|HASH", "a task's stdout, stderr, exit status and input (by task id, "
            "or the task that produced a resource hash)",
            lambda a, c: cmd_log(a.db, a.log, a.json), ("json",)),
    Command("lineage", "HASH", "where a resource came from, back to the seed",
            lambda a, c: cmd_lineage(a.db, a.lineage, a.descendants, a.json),
            ("descendants", "json")),
    Command("delete", "HASH|NAME", "delete a resource by hash, or every resource of a name "
            "(records are kept)", lambda a, c: cmd_delete(a.db, a.delete, a.dry_run, c),
            ("dry-run",)),
    Command("prune", "NAME", "delete all but the newest -keep N resources of NAME",
            lambda a, c: cmd_prune(a.db, a.prune, a.keep, a.dry_run, c), ("keep", "dry-run")),
    Command("gc", "", "remove objects that nothing refers to, then compact the object store",
            lambda a, c: cmd_gc(a.db, a.retired, c), ("retired",)),
    Command("runs", "", "every -run recorded, newest first: when, how long, outcome, counts",
            lambda a, c: cmd_runs(a.db, a.json), ("json",)),
    Command("trace", "", "a TSV row per task of a run (default: the last): status, wall, "
            "CPU, peak RSS, bytes in and out, node", lambda a, c: cmd_trace(a.db, a.run_number)),
    Command("report", "FILE.html", "write one self-contained HTML page about a run (default: "
            "the last): step graph, timeline, per-step figures, failures",
            lambda a, c: cmd_report(a.db, a.report, a.run_number, c)),
    Command("graph", "[dot|mermaid]", "print the step graph (what fed what, with counts) as "
            "Graphviz DOT (default) or Mermaid", lambda a, c: cmd_graph(a.db, a.graph)),
    Command("verify", "", "check the database: metadata integrity, every object present and "
            "matching its hash", lambda a, c: cmd_verify(a.db, c)),
    Command("worker", "FOLDER", argparse.SUPPRESS,  # an array element, on a node
            lambda a, c: cmd_worker(a.worker, c)),
)
SWITCH = {"action": "store_true"}
# The options: argparse settings and help. One that a command lists goes with
# the commands that list it (its help says which); the others go with any.
OPTIONS: dict[str, dict] = {
    "manifest": dict(metavar="PATH", help="the TOML manifest (required for -run)"),
    "db": dict(metavar="DIR", default="./db", help="database directory (default ./db)"),
    "parallel": dict(metavar="N", type=int, help="most scripts running at once (default: "
                     "number of CPUs); with -executor slurm, most array elements of the run "
                     "at once (default: the cluster's CPUs)"),
    "start": dict(metavar="STEP", help="run STEP and the steps downstream of it"),
    "step": dict(metavar="STEP", action="append", default=[],
                 help="run only this step (repeatable)"),
    "dry-run": dict(SWITCH, help="what would be run or deleted, and why"),
    "watch": dict(SWITCH, help="after the run, run again whenever a source step's files or "
                  "the manifest change, until Ctrl-C"),
    "json": dict(SWITCH, help="JSON output (-run: with -dry-run)"),
    "descendants": dict(SWITCH, help="also what was made from it"),
    "keep": dict(metavar="N", type=int, help="how many of the newest to keep"),
    "newest": dict(SWITCH, help="only the newest of each name"),
    "all": dict(SWITCH, help="every resource ever made, not only the live ones"),
    "live": dict(SWITCH, help="only live resources (what a clean run would make now)"),
    "retired": dict(SWITCH, help="first delete the content of every resource that is not live"),
    "timeout": dict(metavar="SECONDS", type=float, default=0, help="kill a task after SECONDS "
                    "unless its step sets timeout (default: no limit)"),
    "retries": dict(metavar="N", type=int, default=0, help="run a failed task again up to N "
                    "times in the same run unless its step (or [slurm]) sets retries "
                    "(default 0)"),
    "executor": dict(metavar="NAME", default="local", help="where tasks run: local (this "
                     "machine, the default) or another registered executor"),
    "output-mode": dict(metavar="MODE", default="auto", choices=("auto", "fuse", "dir"),
                        help="how $OUTPUT_DIR captures files: auto, fuse, dir"),
    "verbose": dict(SWITCH, help="one line per task, script output, details"),
    "quiet": dict(SWITCH, help="errors only (wins over -verbose)"),
}


def owners(option: str) -> list[Command]:
    return [c for c in COMMANDS if option in c.options]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="grit", allow_abbrev=False, add_help=False,
        description="Run a TOML manifest of shell-script steps incrementally; every file a "
                    "script writes to $OUTPUT_DIR becomes a content-addressed resource.",
        epilog="Flags take one or two dashes, and -flag value or -flag=value.")
    group = p.add_argument_group("commands (exactly one)")
    for c in COMMANDS:
        values = tuple(c.value.split())
        kind = SWITCH if not values else dict(metavar=values[0]) if len(values) == 1 else \
            dict(metavar=values, nargs=len(values))
        if c.value.startswith("["):  # an optional value: the command alone gives its default
            kind = dict(metavar=c.value[1:-1], nargs="?", const=True)
        group.add_argument(f"-{c.flag}", f"--{c.flag}", help=c.help, **kind)
    group = p.add_argument_group("options")
    group.add_argument("-h", "-help", "--help", action="help", help="show this help and exit")
    for name, kind in OPTIONS.items():
        used = " or ".join(f"-{c.flag}" for c in owners(name))
        kind = dict(kind, help=f"with {used}: {kind['help']}" if used else kind["help"])
        kind.update(choices=tuple(EXECUTORS)) if name == "executor" else None
        group.add_argument(f"-{name}", f"--{name}", **kind)
    for executor in EXECUTORS.values():
        for name, (value, text) in executor.flags.items():
            group.add_argument(f"-{name}", f"--{name}", metavar=value, help=text)
    group.add_argument("-version", "--version", action="version", version=f"grit {__version__}")
    return p


def chosen_command(args: argparse.Namespace) -> Command:
    """The one command given, its options checked."""
    args.run_number = None  # -run N with -trace or -report: which run
    if isinstance(args.run, str):
        if not (args.trace or args.report):
            raise GritError(f"-run takes a run number only with -trace or -report, not "
                            f"{quote(args.run)}")
        if not args.run.isdigit() or int(args.run) < 1:
            raise GritError(f"-run N: N is a run number (see -runs), not {quote(args.run)}")
        args.run_number, args.run = int(args.run), None
    args.graph = "dot" if args.graph is True else args.graph
    given = [c for c in COMMANDS if getattr(args, c.flag.replace("-", "_")) not in (None, False)]
    if len(given) != 1:
        raise GritError("give exactly one of " + ", ".join(f"-{c.flag} {c.value}".strip()
                                                           for c in COMMANDS
                                                           if c.help != argparse.SUPPRESS)
                        + " (see grit --help)")
    for option in {o for c in COMMANDS for o in c.options}:
        if getattr(args, option.replace("-", "_")) not in (None, False) and \
                given[0] not in owners(option):
            raise GritError(f"-{option} goes with "
                            + " or ".join(f"-{c.flag}" for c in owners(option)))
    return given[0]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = list(sys.argv[1:] if argv is None else argv)
    console = Console(0 if args.quiet else 2 if args.verbose else 1)
    # still_written's lease probe: a writer opening the file in its instant
    # would send grit SIGIO, whose default is to terminate.
    signal.signal(signal.SIGIO, signal.SIG_IGN)
    try:
        settings()  # checked before anything starts
        return chosen_command(args).handler(args, console)
    except GritError as e:
        console.end_progress()
        console.error(str(e))
        return e.exit_code
    except sqlite3.Error as e:
        console.end_progress()
        console.error(f"database error: {e}")
        return EXIT_USAGE
    except BrokenPipeError:
        # stdout closed early (e.g. `| head`): not an error of grit's.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        console.end_progress()
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug or an unforeseen condition: one line, details on request
        console.end_progress()
        console.error(f"internal error: {e!r}" + ("" if args.verbose else
                                                  " (run with -verbose for the traceback)"))
        if args.verbose:
            import traceback
            traceback.print_exc()
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
